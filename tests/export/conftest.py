"""A small textured, deliberately asymmetric mesh shared by the export tests."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import trimesh

from engine_server.export import MaterialParams, TexturedMesh
from engine_server.texture import UnwrapConfig, UVMesh, bake_texture, unwrap

SCALE = np.array([0.5, 0.3, 0.2])
OFFSET = np.array([0.1, -0.2, 0.3])


def two_tone(p: torch.Tensor) -> torch.Tensor:
    """Red above z = OFFSET z (the top in Blender), green below; blue grows with x."""
    p = p.float()
    top = (p[:, 2:3] > float(OFFSET[2])).float()
    blue = ((p[:, 0:1] - float(OFFSET[0])) / 0.5 * 0.5 + 0.5).clamp(0, 1)
    return torch.cat([top, 1.0 - top, blue], dim=1)


@dataclass
class Textured:
    """A UV mesh, its baked texture, and how they were made."""

    mesh: UVMesh
    texture: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    colour_fn: object


@pytest.fixture(scope="session")
def textured() -> Textured:
    """An ellipsoid (extents 0.5, 0.3, 0.2) off the origin, so any axis swap or flip shows."""
    m = trimesh.creation.icosphere(subdivisions=2, radius=1.0)
    vertices = m.vertices * SCALE + OFFSET
    uv_mesh = unwrap(vertices, m.faces, UnwrapConfig(texture_size=128))
    return Textured(uv_mesh, bake_texture(uv_mesh, two_tone, size=128), SCALE, OFFSET, two_tone)


def bumpy_normal_map(size: int) -> np.ndarray:
    """(size, size, 3) uint8 tangent-space normal map of ripples (unit normals, +Z out, encoded n * 0.5 + 0.5)."""
    t = (np.arange(size) + 0.5) / size
    u, v = np.meshgrid(t, t)
    n = np.stack([0.4 * np.sin(8 * np.pi * u), 0.4 * np.sin(8 * np.pi * v), np.ones_like(u)], axis=-1)
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    return np.round((n * 0.5 + 0.5) * 255).astype(np.uint8)


MATERIAL = MaterialParams(metallic=0.25, roughness=0.6)
"""Factors unlike the defaults, so a reader that drops them shows."""


@pytest.fixture(scope="session")
def asset(textured) -> TexturedMesh:
    """The ellipsoid as an asset: base colour, a normal map and material factors."""
    m = textured.mesh
    return TexturedMesh(m.vertices, m.faces, m.uvs, textured.texture, normal_map=bumpy_normal_map(128),
                        material=MATERIAL)
