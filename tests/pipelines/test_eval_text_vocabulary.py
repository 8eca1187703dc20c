"""Text to 3D on every shape of the bundled vocabulary keeps what it achieves (issue 23's evaluation, reduced).

One draft run per shape (its :data:`DEFAULT_COLORS` colour, seed 0) scored by
``engine_server.pipelines.evaluate_text`` against the procedural ground truth. The floors are
what the pipeline achieved when they were set (the card ``weights/TEXT_TO_3D.md`` has the
two-seed table) less a margin for run-to-run noise; they catch a regression per shape.
The issue's own bar, which not every shape meets yet, is a strict xfail: it flags the day it passes.
"""
from __future__ import annotations

import pytest
import torch

from engine_server.models.bundled.vocab import SHAPES
from engine_server.pipelines.evaluate_text import TARGETS, TextEvalConfig, evaluate, passes

pytestmark = pytest.mark.slow  # eleven draft runs: about eight minutes on two idle CPU cores

IOU_FLOOR: dict[str, float] = {
    "cube": 0.67, "sphere": 0.90, "cylinder": 0.75, "cone": 0.79, "torus": 0.89, "pyramid": 0.54,
    "mushroom": 0.85, "snowman": 0.81, "table": 0.64, "lamp": 0.71, "tree": 0.79,
}
"""Silhouette IoU at the held-out cameras achieved with seed 0 (the card: 0.724, 0.948, 0.806, 0.842, 0.940, 0.590,
0.905, 0.860, 0.698, 0.762, 0.840), less about 0.05."""

BG_HUE_CEILING: dict[str, float] = {s: TARGETS["max_bg_hue"] for s in SHAPES} | {"table": 0.045, "lamp": 0.045}
"""Most share of the surface in the background's hue: the issue's 3 %, which every shape meets on the card; the
table (0.024) and the lamp (0.026) meet it with little to spare, so this test, on one thread, allows them 4.5 %."""

WRONG_GENUS = {"torus"}
"""Shapes whose seed-0 mesh does not have the ground truth's genus yet (the torus's hole is filled)."""


@pytest.fixture(scope="module")
def rows() -> dict[str, dict]:
    torch.set_num_threads(1)  # oversubscribing a shared 2-core machine costs far more than it gains
    result = evaluate(TextEvalConfig(seeds=1))
    return {r["shape"]: r for r in result["rows"]}


@pytest.mark.parametrize("shape", SHAPES)
def test_each_shape_keeps_its_silhouette_colour_and_topology(rows, shape):
    row = rows[shape]
    assert row["iou"] >= IOU_FLOOR[shape], row
    assert row["colour_ok"], row
    assert row["bg_hue"] <= BG_HUE_CEILING[shape], row
    assert row["genus_ok"] != (shape in WRONG_GENUS), row


@pytest.mark.xfail(reason="issue 23's bar is not met yet: the torus's hole is filled (with matter of a colour "
                          "between its own and the background's) and the pyramid is too round (IoU 0.59)", strict=True)
def test_the_issues_bar(rows):
    assert sum(r["iou"] for r in rows.values()) / len(rows) >= TARGETS["mean_iou"]
    assert all(passes(r) for r in rows.values()), {s: r for s, r in rows.items() if not passes(r)}
