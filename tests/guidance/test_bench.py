"""The guidance benchmark runs and reports the agreed row keys (timings themselves are not asserted)."""
from __future__ import annotations

import argparse

from engine_server.guidance import bench


def test_bench_rows_on_the_tiny_config():
    args = argparse.Namespace(repeat=1, json=None, sizes="tiny", adapters="stable-diffusion")
    result = bench.run(args)
    assert result["title"]
    assert [(r["adapter"], r["mode"]) for r in result["rows"]] == [("stable-diffusion", "sds"),
                                                                   ("stable-diffusion", "vsd")]
    for row in result["rows"]:
        assert {"adapter", "mode", "step_ms", "denoiser_ms", "ratio"} <= set(row)
        assert row["step_ms"] > 0 and row["denoiser_ms"] > 0
        assert abs(row["ratio"] - row["step_ms"] / row["denoiser_ms"]) < 1e-9
    assert any("CUDA" in n or "cuda" in n for n in result["notes"]) or result["rows"][0]["device"].startswith("cuda")
