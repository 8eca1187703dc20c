"""``engine-server bench geometry``: marching tetrahedra against scikit-image's marching cubes.

What is timed, for both, on the same machine in the same run, interleaved: from the
SDF already sampled at the (R+1)^3 grid vertices to mesh vertices + faces out.

- ``marching_tets_s``: :func:`surface_tet_candidates` (dense mixed-sign cube test)
  then :func:`marching_tets` on the 6 R^3-tetrahedron lattice (the DMTet path);
- ``marching_tets_generic_s``: :func:`marching_tets` with no structural hint, i.e. a
  sign count over all 6 R^3 tetrahedra first (the path for arbitrary tet meshes);
- ``skimage_marching_cubes_s``: ``skimage.measure.marching_cubes`` (Lewiner) on the
  dense (R+1)^3 float32 volume (it also computes normals, which we do not).

The tet lattice (cached, built once) and the SDF sampling are outside the timers.
Torch runs on one CPU thread by default, as scikit-image does: a like-for-like
comparison, and one that a busy shared machine does not distort (oversubscribed
OpenMP threads slow torch down far more than a single-threaded C loop).
A tet grid cuts each cube into six tetrahedra, so it emits about twice as many
triangles as marching cubes at the same resolution; the counts are reported.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time

import numpy as np
import torch

from engine_server.geometry.marching_tets import marching_tets
from engine_server.geometry.shapes import sphere_sdf, torus_sdf
from engine_server.geometry.tet_grid import surface_tet_candidates, tet_grid

logger = logging.getLogger(__name__)

SHAPES = {
    "sphere": lambda p: sphere_sdf(p, radius=0.5),
    "torus": lambda p: torus_sdf(p, major=0.5, minor=0.2),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device) -> tuple[float, object]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def run(args: argparse.Namespace) -> dict:
    """Time extraction at each resolution and shape; returns {"title", "rows", "notes"}.

    Options read from ``args``: ``repeat``, ``resolutions`` (default [64, 128]),
    ``device`` (default cpu), ``threads`` (torch CPU threads, default 1 like scikit-image).
    """
    threads = int(getattr(args, "threads", None) or 1)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(args, threads)
    finally:
        torch.set_num_threads(previous)


def _run(args: argparse.Namespace, threads: int) -> dict:
    from skimage.measure import marching_cubes

    repeat = max(1, int(getattr(args, "repeat", 5)))
    resolutions = getattr(args, "resolutions", None) or [64, 128]
    device = torch.device(getattr(args, "device", None) or "cpu")
    rows = []
    for resolution in resolutions:
        vertices, tets = tet_grid(resolution, device=device)
        for shape, fn in SHAPES.items():
            sdf = fn(vertices)
            volume = sdf.reshape((resolution + 1,) * 3).cpu().numpy().astype(np.float32)
            spacing = (2.0 / resolution,) * 3

            def run_mc():
                return marching_cubes(volume, 0.0, spacing=spacing)

            def run_mt():
                return marching_tets(vertices, tets, sdf, candidates=surface_tet_candidates(sdf, resolution))

            def run_generic():
                return marching_tets(vertices, tets, sdf)

            for f in (run_mc, run_mt, run_generic):  # warm-up: allocator, caches, lazy imports
                f()
            times: dict[str, list[float]] = {"mc": [], "mt": [], "generic": []}
            outs = {}
            for _ in range(repeat):
                for key, f in (("mc", run_mc), ("mt", run_mt), ("generic", run_generic)):
                    t, outs[key] = _time(f, device)
                    times[key].append(t)
            mc_s = statistics.median(times["mc"])
            mt_s = statistics.median(times["mt"])
            generic_s = statistics.median(times["generic"])
            rows.append({
                "shape": shape,
                "resolution": resolution,
                "marching_tets_s": mt_s,
                "marching_tets_generic_s": generic_s,
                "skimage_marching_cubes_s": mc_s,
                "ratio": mt_s / mc_s,
                "ratio_generic": generic_s / mc_s,
                "tets_triangles": int(outs["mt"][1].shape[0]),
                "mc_triangles": int(len(outs["mc"][1])),
            })
            logger.info("bench geometry %s R=%d: tets %.4fs, generic %.4fs, skimage %.4fs",
                        shape, resolution, mt_s, generic_s, mc_s)
    notes = [
        f"median of {repeat} interleaved runs on {device}; torch limited to {threads} CPU thread(s), "
        "scikit-image is single-threaded; "
        "ratio = marching tets time / skimage time (lower is better).",
        "Timed: SDF samples on the grid -> vertices + faces. marching_tets_s uses the lattice's "
        "dense mixed-cube test to find surface tetrahedra; the generic path counts signs over all 6 R^3 tets.",
        "A tet lattice has 6 tetrahedra per cube, so it emits ~2x the triangles of marching cubes.",
    ]
    return {"title": "Geometry: marching tetrahedra vs scikit-image marching cubes", "rows": rows, "notes": notes}
