"""Text to 3D on every shape of the bundled vocabulary keeps what it achieves (issue 23's evaluation, reduced).

One draft run per shape (its :data:`DEFAULT_COLORS` colour, seed 0) scored by
``engine_server.pipelines.evaluate_text`` against the procedural ground truth. The floors are
what the pipeline achieved when they were set (the card ``weights/TEXT_TO_3D.md`` has the
two-seed table) less a margin for run-to-run noise; they catch a regression per shape.
The issue's own bar holds on these eleven runs too (the card shows it on two seeds).
"""
from __future__ import annotations

import pytest
import torch

from engine_server.models.bundled.vocab import SHAPES
from engine_server.pipelines.evaluate_text import TARGETS, TextEvalConfig, evaluate, passes

pytestmark = pytest.mark.slow  # eleven draft runs: about eight minutes on two idle CPU cores

IOU_FLOOR: dict[str, float] = {
    "cube": 0.67, "sphere": 0.88, "cylinder": 0.72, "cone": 0.72, "torus": 0.91, "pyramid": 0.72,
    "mushroom": 0.87, "snowman": 0.86, "table": 0.62, "lamp": 0.72, "tree": 0.78,
}
"""Silhouette IoU at the held-out cameras achieved with seed 0 (the card: 0.726, 0.928, 0.770, 0.775, 0.962, 0.770,
0.920, 0.909, 0.668, 0.774, 0.832), less about 0.05."""


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
    assert row["bg_hue"] <= TARGETS["max_bg_hue"], row
    assert row["genus_ok"], row


def test_the_issues_bar(rows):
    assert sum(r["iou"] for r in rows.values()) / len(rows) >= TARGETS["mean_iou"]
    assert all(passes(r) for r in rows.values()), {s: r for s, r in rows.items() if not passes(r)}
