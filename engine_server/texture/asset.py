"""From an extracted surface and a colour field to the one :class:`TexturedMesh` a pipeline exports.

:func:`build_asset` is the finishing every pipeline shares (text, image, refine in full mode):

1. smooth the full-resolution surface, keeping its edges (:func:`~engine_server.geometry.surface.smooth_surface`);
2. decimate it to the face-count target (quadric, :func:`~engine_server.geometry.surface.decimate`);
3. unwrap the decimated mesh (xatlas);
4. bake, with supersampling and seam padding, the base colour read on the full-resolution
   surface and a tangent-space normal map of that surface onto the decimated one;
5. material: a dielectric (metallic 0) with :data:`ROUGHNESS`, since no prior gives roughness.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from engine_server.geometry.mesh_utils import dihedral_ratio, mesh_stats
from engine_server.geometry.surface import SmoothConfig, SurfaceProjector, decimate, smooth_surface
from engine_server.texture.bake import BakeConfig, ColorFn, bake_maps
from engine_server.texture.unwrap import UnwrapConfig, unwrap

logger = logging.getLogger(__name__)

ROUGHNESS = 0.8
"""roughnessFactor of generated assets: the priors we distil from are shaded diffuse (the bundled one
is pure Lambertian), so what they teach is a matte surface; 0.8 keeps a faint highlight in PBR viewers."""


@dataclass(frozen=True)
class AssetConfig:
    """How :func:`build_asset` finishes a surface; the pipelines fill it from their preset."""

    faces: int = 20000
    """Most triangles of the exported mesh (quadric decimation)."""
    texture_size: int = 1024
    """Base colour and normal map width and height in texels."""
    smooth: SmoothConfig | None = field(default_factory=SmoothConfig)
    """Feature-preserving smoothing of the full-resolution surface; None: none."""
    supersample: int | None = None
    """Bake samples per texel along each axis; None: 2 below 2048 texels a side, 1 from there (4M texels
    already sample the surface finely, and 2 x 2 would quadruple the longest step: ~3 min on 2 cores)."""

    def __post_init__(self) -> None:
        if self.faces < 4:
            raise ValueError(f"faces must be >= 4, got {self.faces}")
        if not 16 <= self.texture_size <= 8192:
            raise ValueError(f"texture_size must be in [16, 8192], got {self.texture_size}")


def default_supersample(texture_size: int) -> int:
    """Bake samples per texel along each axis for a map of ``texture_size``: 2 below 2048, else 1."""
    return 2 if texture_size < 2048 else 1


def build_asset(vertices: np.ndarray, faces: np.ndarray, color_fn: ColorFn, config: AssetConfig,
                device: str | torch.device | None = None):
    """Finish a full-resolution surface (V, 3), (F, 3) into a TexturedMesh; returns (mesh, report).

    ``color_fn`` maps (N, 3) float32 points (in the frame of ``vertices``, on ``device``) to RGB
    in [0, 1]. ``report`` (JSON-ready) has the faces requested and produced, the texture size,
    the full-resolution and produced face counts' dihedral ratios and seconds per step.
    """
    from engine_server.export import MaterialParams, TexturedMesh, smooth_normals

    seconds: dict[str, float] = {}
    t = time.perf_counter()
    v = np.asarray(vertices, dtype=np.float32)
    f = np.asarray(faces, dtype=np.int64)
    if config.smooth is not None:
        v = smooth_surface(v, f, config.smooth)
    seconds["smooth"] = time.perf_counter() - t
    t = time.perf_counter()
    low_v, low_f = decimate(v, f, config.faces)
    seconds["decimate"] = time.perf_counter() - t
    t = time.perf_counter()
    uv_mesh = unwrap(low_v, low_f, UnwrapConfig(texture_size=config.texture_size))
    seconds["unwrap"] = time.perf_counter() - t
    t = time.perf_counter()
    normals = smooth_normals(uv_mesh.vertices, uv_mesh.faces)
    surface = SurfaceProjector(v, f)
    supersample = config.supersample or default_supersample(config.texture_size)
    maps = bake_maps(uv_mesh, color_fn, BakeConfig(size=config.texture_size, supersample=supersample),
                     surface=surface, normals=normals, device=device)
    seconds["bake"] = time.perf_counter() - t
    mesh = TexturedMesh(
        vertices=uv_mesh.vertices, faces=uv_mesh.faces, uvs=uv_mesh.uvs, base_color=maps.base_color,
        normal_map=maps.normal_map,
        material=MaterialParams(metallic=0.0, roughness=ROUGHNESS), normals=normals.astype(np.float32),
    )
    report = {
        "faces_requested": int(config.faces),
        "faces_extracted": int(len(f)),
        "faces": int(len(low_f)),
        "texture_size": int(config.texture_size),
        "supersample": supersample,
        "dihedral_ratio": round(dihedral_ratio(low_v, low_f), 3),
        "closed": bool(mesh_stats(low_v, low_f).is_watertight),
        "seconds": {k: round(s, 3) for k, s in seconds.items()},
    }
    logger.info("asset: %d -> %d faces (target %d), %dx%d maps, dihedral ratio %.2f, %s", len(f), len(low_f),
                config.faces, config.texture_size, config.texture_size, report["dihedral_ratio"],
                ", ".join(f"{k} {s:.2f} s" for k, s in seconds.items()))
    return mesh, report
