"""The image job's ``bsd`` stage (bootstrapped score distillation, issue 25): options, events, sidecar, resume.

Options fail with one clear error on the request, the wire, the command line and the add-on's fold; the
stage runs after the coarse fit on the real bundled prior and a cancelled job resumes from its checkpoint
to the same object.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine_server.cameras import orbit_camera
from engine_server.pipelines.image_to_3d import ImageFitConfig, ImageTo3D, ImageTo3DRequest
from engine_server.pipelines.kinds import KINDS, KindError, _view_settings

ROOT = Path(__file__).resolve().parents[2]
TINY = {"coarse_steps": 4, "learning_rate": 0.03, "views_per_step": 1, "samples_per_ray": 32,
        "occupancy_resolution": 32, "tet_resolution": 32, "texture_size": 64, "faces": 500, "preview_every": 1000,
        "checkpoint_every": 2}


def _reference_rgba(size: int = 64) -> np.ndarray:
    """A red disc on a transparent film."""
    yy, xx = np.mgrid[:size, :size]
    inside = (yy - size / 2 + 0.5) ** 2 + (xx - size / 2 + 0.5) ** 2 < (0.3 * size) ** 2
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[inside] = (200, 30, 30, 255)
    return rgba


def test_request_options_are_checked_with_clear_errors():
    assert ImageFitConfig().bsd_steps == 0  # opt-in
    for kwargs, message in [({"bsd_steps": -1}, "bsd_steps must be an integer from 0"),
                            ({"bsd_steps": 2.5}, "bsd_steps must be an integer from 0"),
                            ({"bsd_t_start": 1.0}, r"bsd_t_start must be in \(0, 1\)"),
                            ({"bsd_t_start": 0.3, "bsd_t_end": 0.5}, r"bsd_t_end must be in \(0, bsd_t_start = 0.3\]")]:
        with pytest.raises(ValueError, match=message):
            ImageFitConfig(**kwargs)


def test_wire_options_reach_the_fit_and_bad_values_are_refused():
    kind = KINDS["image"]
    run, overrides = kind.split_options({"bsd_steps": 50, "bsd_t_start": 0.5, "bsd_t_end": 0.2, "coarse_steps": 9})
    assert overrides == {"coarse_steps": 9}
    fit = _view_settings(dict(run))["fit"]
    assert (fit.bsd_steps, fit.bsd_t_start, fit.bsd_t_end) == (50, 0.5, 0.2)
    for options, message in [({"bsd_steps": 1.5}, "options.bsd_steps must be an integer"),
                             ({"bsd_steps": True}, "options.bsd_steps must be an integer"),
                             ({"bsd_steps": -3}, "options.bsd_steps must be an integer from 0"),
                             ({"bsd_t_start": "high"}, "options.bsd_t_start must be a number"),
                             ({"bsd_t_end": 0.9}, r"options.bsd_t_end must be in \(0, bsd_t_start")]:
        with pytest.raises(KindError, match=message):
            _view_settings(kind.split_options(options)[0])
    with pytest.raises(ValueError, match="unknown preset option"):  # a text job has no BSD stage
        from engine_server.pipelines.presets import get_preset

        get_preset("draft", **KINDS["text"].split_options({"bsd_steps": 10})[1])


def test_cli_flags_reach_the_request_and_are_checked_before_any_work(tmp_path, capsys):
    from engine_server.cli import main
    from engine_server.cli.common import add_image_fit_flags, image_fit_fields

    out = str(tmp_path / "x.glb")
    assert main(["generate", "a red cube", "--bsd-steps", "20", "--out", out]) == 2
    assert "--bsd-steps apply to image to 3D: give --image" in capsys.readouterr().err
    assert main(["generate", "--image", "ref.png", "--bsd-steps", "-2", "--out", out]) == 2
    assert "--bsd-steps must be an integer from 0" in capsys.readouterr().err
    assert main(["generate", "--image", "ref.png", "--bsd-steps", "20", "--bsd-t-end", "0.8", "--out", out]) == 2
    assert "--bsd-t-end must be in (0, bsd_t_start = 0.6]" in capsys.readouterr().err
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--image")
    add_image_fit_flags(parser)
    fit = image_fit_fields(parser.parse_args(["--image", "r.png", "--bsd-steps", "30", "--bsd-t-start", "0.5"]))["fit"]
    assert (fit.bsd_steps, fit.bsd_t_start, fit.bsd_t_end) == (30, 0.5, 0.3)


ADDON_CHECK = """
import json, sys
sys.path.insert(0, sys.argv[1])
import bpy
import blender_addon
from blender_addon import props
blender_addon.register()
s = bpy.context.scene.generate3d
report = {"off": props.image_fit_options(s)}
s.bsd_steps = 40
report["on"] = props.image_fit_options(s)
s.bsd_t_start, s.bsd_t_end = 0.5, 0.25
report["schedule"] = props.image_fit_options(s)
s.bsd_t_end = 0.7
try:
    props.image_fit_options(s)
except ValueError as exc:
    report["error"] = str(exc)
print("REPORT" + json.dumps(report))
"""


@pytest.mark.skipif(importlib.util.find_spec("bpy") is None, reason="Blender-as-a-module is not installed")
def test_the_addon_fold_sends_bsd_options_only_when_on():
    proc = subprocess.run([sys.executable, "-c", ADDON_CHECK, str(ROOT)], capture_output=True, text=True,
                          timeout=300, check=False)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT")), None)
    assert proc.returncode == 0 and line, f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    report = json.loads(line[len("REPORT"):])
    assert "bsd_steps" not in report["off"]
    assert report["on"]["bsd_steps"] == 40 and "bsd_t_start" not in report["on"]  # the engine's schedule
    assert (report["schedule"]["bsd_t_start"], report["schedule"]["bsd_t_end"]) == pytest.approx((0.5, 0.25))
    assert "t' must shrink" in report["error"]


def _job(prior, folder: Path, events: list, cancel_at: int | None = None) -> ImageTo3D:
    def cancelled() -> bool:
        return cancel_at is not None and any(e.stage == "bsd" and e.step >= cancel_at for e in events)

    request = ImageTo3DRequest(image=_reference_rgba(), rig=[orbit_camera(0.0, 15.0, 2.5, 42.0, 32)],
                               prompt="a red sphere", views=2, overrides=TINY,
                               fit=ImageFitConfig(bsd_steps=4, distill_start=0.5, multiview_steps=4))
    return ImageTo3D(request, prior=prior, progress=events.append, cancelled=cancelled, checkpoint_dir=folder)


@pytest.mark.slow
def test_the_bsd_stage_runs_after_the_coarse_fit_records_itself_and_resumes_from_its_checkpoint(tmp_path):
    from engine_server.guidance import load_prior
    from engine_server.pipelines.events import Cancelled

    prior = load_prior("bundled")
    events: list = []
    whole = _job(prior, tmp_path / "whole", events)
    result = whole.run(tmp_path / "whole.glb")
    stages = list(dict.fromkeys(e.stage for e in events))
    assert stages == ["views", "coarse", "bsd", "extract", "texture", "export"]
    assert [e.step for e in events if e.stage == "bsd"] == [0, 1, 2, 3, 4]
    assert (tmp_path / "whole" / "bsd.pt").is_file() and "bsd_s" in whole.timings
    fit = json.loads(result.glb_path.with_suffix(".json").read_text())["fit"]
    assert fit["bsd_steps"] == 4 and fit["bsd"]["t_start"] == 0.6 and fit["bsd"]["t_end"] == 0.3
    assert fit["bsd"]["fine_tuned_copy"].startswith("LoRA rank")
    copy = whole.bsd_stage.guidance
    coarse = torch.load(tmp_path / "whole" / "coarse.pt", weights_only=False)["model"]["field"]
    after = whole.field.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in coarse.items() if not k.startswith("color_net."))  # shape kept
    assert any(not torch.equal(v, after[k]) for k, v in coarse.items() if k.startswith("color_net."))  # colour learnt
    assert any(float(p.abs().sum()) > 0 for p in copy.dreambooth_parameters())  # bootstrapped at step 0

    first_events: list = []
    first = _job(load_prior("bundled"), tmp_path / "split", first_events, cancel_at=3)
    with pytest.raises(Cancelled):
        first.run(tmp_path / "split.glb")
    events = []
    second = _job(load_prior("bundled"), tmp_path / "split", events)
    resumed = second.run(tmp_path / "split.glb")
    assert [e.step for e in events if e.stage == "bsd"][:2] == [2, 3]  # from the step-2 checkpoint
    for a, b in zip(whole.field.state_dict().values(), second.field.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(copy.dreambooth_parameters(), second.bsd_stage.guidance.dreambooth_parameters()):
        assert torch.equal(a, b)
    assert np.array_equal(resumed.faces, result.faces) and np.allclose(resumed.vertices, result.vertices, atol=1e-6)
