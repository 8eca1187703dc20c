"""The multi-view text path's evaluation against the bundled prior's own text evaluation (issue 22)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from engine_server.models.bundled.vocab import COLOR_NAMES, SHAPES
from engine_server.multiview.evaluate import MAX_IOU_DROP, captions, format_table, per_shape, run, text_eval_per_shape


def test_every_shape_and_every_colour_is_evaluated():
    caps = captions(SHAPES, 3)
    assert len(caps) == 3 * len(SHAPES) and {c.shape for c in caps} == set(SHAPES)
    assert {c.color for c in caps} == set(COLOR_NAMES)
    assert all(len({c.color for c in caps if c.shape == s}) == 3 for s in SHAPES)


def test_a_shape_passes_only_with_every_colour_right_and_its_iou_near_the_text_evaluation():
    text = {"cube": {"text_iou": 0.8, "text_color": 1.0}, "torus": {"text_iou": 0.9, "text_color": 1.0}}
    rows = [{"shape": "cube", "iou": 0.78, "color": 1.0, "redrawn": 1},
            {"shape": "cube", "iou": 0.76, "color": 1.0, "redrawn": 0},
            {"shape": "torus", "iou": 0.95, "color": 5 / 6, "redrawn": 0},
            {"shape": "torus", "iou": 0.95, "color": 1.0, "redrawn": 2}]
    out = {r["shape"]: r for r in per_shape(rows, text)}
    assert out["cube"]["mv_iou"] == pytest.approx(0.77) and out["cube"]["drop"] == pytest.approx(0.03)
    assert out["cube"]["pass"] and out["cube"]["redrawn"] == 1 and out["cube"]["views"] == 12
    assert not out["torus"]["pass"] and out["torus"]["mv_color"] == pytest.approx(11 / 12)
    rows[1]["iou"] = 0.8 - 2 * MAX_IOU_DROP - 0.01
    assert not {r["shape"]: r for r in per_shape(rows, text)}["cube"]["pass"]


def test_the_text_evaluation_is_read_for_every_shape():
    text = text_eval_per_shape()
    assert set(text) == set(SHAPES) and all(0 < r["text_iou"] <= 1 for r in text.values())


@pytest.mark.slow
def test_the_multiview_text_path_is_as_good_as_the_text_evaluation_on_every_shape():
    torch.set_num_threads(1)
    result = run(SimpleNamespace(strategy="anchor"))  # every shape in every colour, 6 cameras each
    print(format_table(result))
    bad = [r for r in result["rows"] if not r["pass"]]
    assert not bad, format_table(result)
    assert result["mean_iou"] >= 0.75 and result["passed"]


def test_a_server_job_is_asked_for_the_evaluation_s_cameras_and_settings():
    from engine_server.cameras import orbit_camera
    from engine_server.multiview import MultiViewConfig
    from engine_server.multiview.evaluate import AZIMUTHS, FOV, evaluate_prompts_server, job_rig

    rig = job_rig(32)
    assert len(rig) == 1 + len(AZIMUTHS) and rig[0] == rig[1]  # the reference view sits at the first camera
    for cam, az in zip(rig[1:], AZIMUTHS):
        assert torch.allclose(torch.tensor(cam["matrix_world"]), orbit_camera(az, 15.0, 2.5, FOV, 32).c2w)
        assert (cam["fov_y_deg"], cam["width"], cam["height"]) == (FOV, 32, 32)
    with pytest.raises(ValueError, match="guidance 2.0"):  # a setting the job cannot take is refused, not ignored
        evaluate_prompts_server(None, captions(("cube",), 1), MultiViewConfig(guidance_scale=5.0))
