"""Benchmark of the finishing stages (``engine-server bench texture``): smooth, decimate, unwrap, bake, export.

The mesh is a marching-cubes surface of a bumpy sphere (irregular triangles, like a
marching-tets extraction) with about ``faces`` triangles (100k), finished as a pipeline
finishes an extraction (:func:`~engine_server.texture.asset.build_asset`'s steps, timed one
by one) to ``decimate_to`` faces (20k) with ``size`` x ``size`` maps (2048): base colour and
normal map, 2 x 2 samples per texel. The colour function is analytic, so the bake time is
the texture stage's own cost, not a field's; the draft coarse stage's time per step (the
bundled prior) is printed beside it for scale. Options read from ``args``: ``repeat``,
``faces``, ``decimate_to``, ``size``.
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

from engine_server.geometry.surface import SurfaceProjector, decimate, smooth_surface
from engine_server.texture.bake import BakeConfig, bake_maps
from engine_server.texture.unwrap import UnwrapConfig, unwrap

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


def coarse_step_seconds(steps: int = 6) -> float:
    """Seconds per coarse step of the draft preset with the bundled prior (warm-up and preview steps left out)."""
    from engine_server.pipelines.text_to_3d import TextTo3D, TextTo3DRequest

    marks: list[float] = []
    pipeline = TextTo3D(TextTo3DRequest(prompt="a blue sphere", overrides={"coarse_steps": steps + 2}),
                        progress=lambda event: marks.append(time.perf_counter()) if event.stage == "coarse" else None)
    pipeline.coarse()  # the last step also renders a preview: time the steps between the first and the last
    return (marks[-2] - marks[0]) / (len(marks) - 2)


def run(args: argparse.Namespace) -> dict:
    """Time each stage; returns {"title", "rows", "notes"} for the CLI's bench printer."""
    from engine_server.export import MaterialParams, TexturedMesh, export_mesh, smooth_normals

    repeat = int(getattr(args, "repeat", 1))
    extracted = int(getattr(args, "faces", 100_000))
    target = int(getattr(args, "decimate_to", 20_000))  # "target" is the bench name
    size = int(getattr(args, "size", 2048))
    vertices, faces = bumpy_sphere(extracted)
    rows: list[dict] = []

    def row(stage: str, seconds: float, **extra: object) -> None:
        rows.append({"stage": stage, "seconds": round(seconds, 3), **extra})

    t, smooth = _time(lambda: smooth_surface(vertices, faces), repeat)
    row("smooth (bilateral normal filtering)", t, faces=len(faces))
    t, (low_v, low_f) = _time(lambda: decimate(smooth, faces, target), repeat)
    row("decimate (quadric, fast-simplification)", t, faces=len(low_f))
    t, uv_mesh = _time(lambda: unwrap(low_v, low_f, UnwrapConfig(texture_size=size)), repeat)
    row("unwrap (xatlas)", t, faces=len(low_f), size=size)
    normals = smooth_normals(uv_mesh.vertices, uv_mesh.faces)
    t, surface = _time(lambda: SurfaceProjector(smooth, faces), repeat)
    row("projector (k-d tree of the full surface)", t, faces=len(faces))
    t, maps = _time(lambda: bake_maps(uv_mesh, _colour, BakeConfig(size=size), surface=surface, normals=normals),
                    repeat)
    row("bake colour + normal map (2x2 samples, padding)", t, faces=len(low_f), size=size)
    t, _ = _time(lambda: bake_maps(uv_mesh, _colour, BakeConfig(size=size)), repeat)
    row("bake colour only, on the decimated surface", t, faces=len(low_f), size=size)
    mesh = TexturedMesh(uv_mesh.vertices, uv_mesh.faces, uv_mesh.uvs, maps.base_color, maps.normal_map,
                        MaterialParams(), normals)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.glb"
        t, _ = _time(lambda: export_mesh(path, mesh), repeat)
        row("export GLB (2 PNG encodes + write)", t, bytes=path.stat().st_size)
    row("coarse stage, per step (draft, bundled prior)", coarse_step_seconds())
    return {
        "title": f"finishing: {len(faces)}-face extraction -> {target} faces, {size}x{size} colour + normal map",
        "rows": rows,
        "notes": [f"torch threads: {torch.get_num_threads()}; median of {repeat} run(s)",
                  "colour function is analytic: a real field's query time adds to the bakes"],
    }
