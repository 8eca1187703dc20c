from __future__ import annotations

import argparse

from engine_server.geometry.bench import run


def test_bench_rows_side_by_side():
    result = run(argparse.Namespace(repeat=1, json=None, resolutions=[8, 16]))
    rows = result["rows"]
    assert [(r["shape"], r["resolution"]) for r in rows] == [
        ("sphere", 8), ("torus", 8), ("sphere", 16), ("torus", 16)]
    for r in rows:
        assert r["marching_tets_s"] > 0 and r["skimage_marching_cubes_s"] > 0
        assert abs(r["ratio"] - r["marching_tets_s"] / r["skimage_marching_cubes_s"]) < 1e-12
        assert r["tets_triangles"] > r["mc_triangles"] > 0
    assert result["title"] and result["notes"]
