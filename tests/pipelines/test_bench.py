"""``engine-server bench pipeline`` / ``bench draft``: what they measure, and their bad input."""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from engine_server.pipelines.bench import parse_variants


def test_variants_parse_to_preset_overrides_and_bad_ones_name_the_problem():
    assert parse_variants(["fast:coarse_steps=120,learning_rate=0.02", "two:views_per_step=2"]) == {
        "fast": {"coarse_steps": 120, "learning_rate": 0.02}, "two": {"views_per_step": 2}}
    with pytest.raises(ValueError, match="expected NAME:key=value"):
        parse_variants(["coarse_steps=120"])
    with pytest.raises(ValueError, match="is not key=value"):
        parse_variants(["x:coarse_steps"])
    with pytest.raises(ValueError, match="unknown preset option"):
        parse_variants(["x:steps=3"])
    with pytest.raises(ValueError, match="bake_samples must be 1 to 4"):
        parse_variants(["x:bake_samples=9"])


def test_cli_refuses_a_bad_variant_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "engine_server", "bench", "draft", "--variant", "x:nope=1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown preset option(s) nope" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_pipeline_bench_measures_the_whole_run_beside_its_stages():
    from engine_server.pipelines.bench import run

    result = run(argparse.Namespace(repeat=1, prompt=None))
    rows = {r["what"]: r for r in result["rows"]}
    stages = rows["draft run (sum of the stages)"]["ms"]
    measured = rows["draft run (measured, build to GLB)"]["ms"]
    assert stages > 0 and measured > 0
    assert any(k.startswith("  its coarse stage") for k in rows)
    # Mean buckets add up to the mean step, and the step means times the steps to the stage.
    buckets = sum(r["ms"] for k, r in rows.items() if k.startswith("step: ") and "total" not in k)
    assert buckets == pytest.approx(rows["step: total (mean)"]["ms"], rel=0.01, abs=0.5)
    coarse = next(r["ms"] for k, r in rows.items() if k.startswith("stage: coarse"))
    assert coarse == pytest.approx(200 * rows["step: total (mean)"]["ms"], rel=0.01)
