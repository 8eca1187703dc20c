"""Benchmark of the texture and export stages: unwrap, rasterize, bake, GLB write and read.

The mesh is a marching-cubes surface of a bumpy sphere (irregular triangles, like a
marching-tets mesh) with about ``--faces`` triangles; the colour function is analytic,
so the bake time is the texture stage's own cost, not a field's.
Options read from ``args``: ``repeat``, ``faces`` (20000), ``size`` (1024),
``xatlas_default`` (also time xatlas's default of one chart iteration; slow).
"""
from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from engine_server.export import export_glb, load_glb
from engine_server.texture.bake import BakeConfig, bake_texture, rasterize_uv
from engine_server.texture.unwrap import UnwrapConfig, UVMesh, unwrap

logger = logging.getLogger(__name__)


def bumpy_sphere(target_faces: int) -> tuple[np.ndarray, np.ndarray]:
    """(V, 3) float32 vertices in [-0.5, 0.5]^3 and (F, 3) int64 faces, F close to ``target_faces``."""
    from skimage.measure import marching_cubes

    def mesh(n: int) -> tuple[np.ndarray, np.ndarray]:
        g = np.linspace(-0.5, 0.5, n)
        x, y, z = np.meshgrid(g, g, g, indexing="ij")
        sdf = np.sqrt(x**2 + y**2 + z**2) - 0.35 - 0.05 * np.sin(9 * x) * np.sin(9 * y) * np.sin(9 * z)
        v, f, _, _ = marching_cubes(sdf, 0.0, spacing=(g[1] - g[0],) * 3)
        return (v - 0.5).astype(np.float32), f.astype(np.int64)

    _, f32 = mesh(32)
    n = max(8, int(round(32 * (target_faces / len(f32)) ** 0.5)))
    return mesh(n)


def _colour(p: torch.Tensor) -> torch.Tensor:
    return 0.5 + 0.5 * torch.sin(6.0 * p + torch.tensor([0.0, 2.0, 4.0], device=p.device))


def _time(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def run(args: argparse.Namespace) -> dict:
    """Time each stage; returns {"title", "rows", "notes"} for the CLI's bench printer."""
    repeat = int(getattr(args, "repeat", 3))
    target = int(getattr(args, "faces", 20000))
    size = int(getattr(args, "size", 1024))
    vertices, faces = bumpy_sphere(target)
    rows: list[dict] = []

    def row(stage: str, seconds: float, **extra: object) -> None:
        rows.append({"stage": stage, "faces": len(faces), "size": size, "seconds": round(seconds, 3), **extra})

    t, uv_mesh = _time(lambda: unwrap(vertices, faces, UnwrapConfig(texture_size=size)), repeat)
    assert isinstance(uv_mesh, UVMesh)
    row("unwrap (xatlas, max_iterations=0)", t, vertices_out=len(uv_mesh.vertices))
    if getattr(args, "xatlas_default", False):
        t, m1 = _time(lambda: unwrap(vertices, faces, UnwrapConfig(texture_size=size, max_iterations=1)), 1)
        row("unwrap (xatlas, max_iterations=1)", t, vertices_out=len(m1.vertices))
    t, raster = _time(lambda: rasterize_uv(uv_mesh, size), repeat)
    row("rasterize_uv", t, texels_on_surface=int(raster.mask.sum()))
    t, texture = _time(lambda: bake_texture(uv_mesh, _colour, BakeConfig(size=size)), repeat)
    row("bake_texture (raster + colour + dilate 8 + fill)", t)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.glb"
        t, _ = _time(lambda: export_glb(path, uv_mesh.vertices, uv_mesh.faces, uv_mesh.uvs, texture,
                                        sidecar={"bench": True}), repeat)
        row("export_glb (PNG encode + write)", t, glb_bytes=path.stat().st_size)
        t, _ = _time(lambda: load_glb(path), repeat)
        row("load_glb", t)
    return {
        "title": f"texture + export stages ({len(faces)} faces, {size}x{size} texture)",
        "rows": rows,
        "notes": [
            f"torch threads: {torch.get_num_threads()}; median of {repeat} run(s)",
            "colour function is analytic: a real field's query time adds to bake_texture",
        ],
    }
