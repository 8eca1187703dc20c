"""Run-time choice of rasterizer backend (shared registry: `kernels.registry`): portable PyTorch
everywhere, nvdiffrast on CUDA when importable.

A backend provides `RasterOps` (rasterize, interpolate, antialias) with the conventions
of `kernels.rasterize.reference`. Probing never raises, so importing `kernels` works on
any machine; asking for an unavailable backend by name does, with the reason.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from kernels.rasterize.reference import antialias_torch, interpolate_torch, rasterize_torch
from kernels.registry import Backend, BackendRegistry, BackendStatus, lazy_backend

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RasterOps:
    """What a rasterizer backend provides; inputs arrive checked, contiguous and on one device."""

    rasterize: Callable[[torch.Tensor, torch.Tensor, tuple[int, int]], torch.Tensor]
    """(clip (B, V, 4) float32, faces (F, 3) long, (H, W)) -> rast (B, H, W, 4)."""
    interpolate: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    """(attr (B or 1, V, C), rast (B, H, W, 4), faces (F, 3) long) -> (B, H, W, C)."""
    antialias: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    """(color (B, H, W, C), rast, clip (B, V, 4), faces (F, 3) long) -> (B, H, W, C)."""


REGISTRY: BackendRegistry[RasterOps] = BackendRegistry(
    "rasterizer", auto_order={"cuda": ("nvdiffrast", "torch"), "cpu": ("torch",)}
)


REGISTRY.register(
    Backend(
        name="torch",
        probe=lambda: BackendStatus(True, "portable PyTorch rasterizer", ("cpu", "cuda")),
        load=lambda: RasterOps(rasterize=rasterize_torch, interpolate=interpolate_torch, antialias=antialias_torch),
    )
)
REGISTRY.register(lazy_backend("nvdiffrast", "kernels.rasterize.nvdiffrast_backend"))


backend_names = REGISTRY.names
backend_status = REGISTRY.status


def get_ops(backend: str, device: torch.device) -> RasterOps:
    """The ops of `backend` ('auto' or a name) for tensors on `device`; a named one that cannot run
    raises BackendUnavailableError, `auto` skips (with a warning) one that fails to load."""
    return REGISTRY.load(backend, device)[1]
