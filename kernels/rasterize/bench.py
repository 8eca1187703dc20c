"""Rasterizer benchmark: forward and forward+backward time of rasterize + interpolate (+ antialias).

Options read from args: repeat (timed runs, median reported), backend ("auto"), device
("cpu" or "cuda"), sizes (comma-separated resolutions, default "64,128,256"),
subdivisions (comma-separated icosphere levels, default "3,5": 1280 and 20480 faces),
batch (cameras per call, default 1).
"""
from __future__ import annotations

import logging
import statistics
import time

import torch

from kernels.rasterize.backends import REGISTRY
from kernels.rasterize.ops import antialias, interpolate, rasterize
from kernels.rasterize.projection import perspective_projection, transform_vertices

logger = logging.getLogger(__name__)


def icosphere(subdivisions: int, radius: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertices (V, 3) float32 and faces (F, 3) long of an icosphere (20 * 4**subdivisions faces)."""
    import trimesh  # noqa: PLC0415  (benchmark-only dependency, already in the project)

    mesh = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    return torch.tensor(mesh.vertices, dtype=torch.float32), torch.tensor(mesh.faces, dtype=torch.int64)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, repeat: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def run(args) -> dict:
    repeat = max(1, int(getattr(args, "repeat", 5)))
    backend = getattr(args, "backend", "auto") or "auto"
    device = torch.device(getattr(args, "device", "cpu") or "cpu")
    sizes = [int(s) for s in str(getattr(args, "sizes", "64,128,256")).split(",")]
    levels = [int(s) for s in str(getattr(args, "subdivisions", "3,5")).split(",")]
    batch = int(getattr(args, "batch", 1))
    resolved = REGISTRY.resolve(backend, device)
    from engine_server.cameras import orbit_camera  # noqa: PLC0415  (the engine's camera convention)

    rows = []
    for level in levels:
        vertices, faces = icosphere(level)
        vertices, faces = vertices.to(device), faces.to(device)
        colors = torch.rand(vertices.shape[0], 3, device=device)
        c2w = torch.stack([orbit_camera(30 + 40 * b, 20, 2.0, 40.0, 1).c2w for b in range(batch)]).to(device)
        for size in sizes:
            mvp = perspective_projection(c2w, 40.0, 1.0)

            def forward(aa: bool, grad: bool) -> None:
                v = vertices.clone().requires_grad_(grad)
                c = colors.clone().requires_grad_(grad)
                clip = transform_vertices(v, mvp)
                rast = rasterize(clip, faces, (size, size), backend=resolved)
                img = interpolate(c, rast, faces, backend=resolved)
                if aa:
                    img = antialias(img, rast, clip, faces, backend=resolved)
                if grad:
                    img.square().sum().backward()

            with torch.no_grad():
                rast = rasterize(transform_vertices(vertices, mvp), faces, (size, size), backend=resolved)
            rows.append(
                {
                    "backend": resolved,
                    "device": device.type,
                    "faces": int(faces.shape[0]),
                    "res": size,
                    "batch": batch,
                    "covered_px": int((rast[..., 3] > 0).sum()),
                    "fwd_ms": round(_time(lambda: forward(False, False), repeat, device), 2),
                    "fwd_bwd_ms": round(_time(lambda: forward(False, True), repeat, device), 2),
                    "fwd_bwd_aa_ms": round(_time(lambda: forward(True, True), repeat, device), 2),
                }
            )
    return {
        "title": f"rasterize + interpolate (+ antialias), icosphere, median of {repeat}",
        "rows": rows,
        "notes": [
            f"torch threads: {torch.get_num_threads()}",
            "fwd: rasterize + interpolate of vertex colours; fwd_bwd: plus backward to vertices and colours;"
            " fwd_bwd_aa: with antialias.",
        ],
    }
