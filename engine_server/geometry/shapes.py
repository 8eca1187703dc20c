"""Analytic signed distance functions (negative inside) for tests, benchmarks and initialisation."""
from __future__ import annotations

import math

import torch


def sphere_sdf(points: torch.Tensor, radius: float = 0.5, center: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> torch.Tensor:
    """Exact SDF (N,) of a sphere at ``points`` (N, 3)."""
    c = torch.as_tensor(center, dtype=points.dtype, device=points.device)
    return (points - c).norm(dim=-1) - radius


def torus_sdf(points: torch.Tensor, major: float = 0.5, minor: float = 0.2) -> torch.Tensor:
    """Exact SDF (N,) of a torus around the z axis with radii ``major`` and ``minor``."""
    ring = points[:, :2].norm(dim=-1) - major
    return torch.stack([ring, points[:, 2]], -1).norm(dim=-1) - minor


def box_sdf(points: torch.Tensor, half_extent: float | tuple[float, float, float] = 0.5) -> torch.Tensor:
    """Exact SDF (N,) of an axis-aligned box centred at the origin."""
    h = torch.as_tensor(half_extent, dtype=points.dtype, device=points.device).expand(3)
    q = points.abs() - h
    return q.clamp(min=0).norm(dim=-1) + q.max(dim=-1).values.clamp(max=0)


def sphere_volume(radius: float) -> float:
    """Analytic volume of a sphere."""
    return 4.0 / 3.0 * math.pi * radius**3


def torus_volume(major: float, minor: float) -> float:
    """Analytic volume of a torus."""
    return 2.0 * math.pi**2 * major * minor**2
