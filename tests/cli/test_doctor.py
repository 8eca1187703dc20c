"""``engine-server doctor``: what was found, its defaults, the per-preset estimate and one step, as text and JSON."""
from __future__ import annotations

import json

import pytest

from engine_server.cli import main
from engine_server.guidance import tiny


@pytest.fixture(scope="module")
def sd_fp16_folder(tmp_path_factory):
    """A tiny Stable Diffusion folder in the published layout whose UNet ships only its fp16 variant."""
    folder = tiny.make_stable_diffusion(tmp_path_factory.mktemp("doctor") / "sd")
    tiny.save_variant(folder, "unet")
    return folder


def test_doctor_json_reports_family_layout_variant_defaults_and_estimates(sd_fp16_folder, capsys):
    assert main(["doctor", "--model", str(sd_fp16_folder), "--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["family"] == "stable-diffusion" and report["kind"] == "text"
    assert report["layout"] == "diffusers folder"
    assert report["variants"]["unet"] == "'fp16' (diffusion_pytorch_model.fp16.safetensors)"
    assert report["variants"]["vae"] == "default (diffusion_pytorch_model.safetensors)"
    assert report["dtype"] == "float32" and report["device"] == "cpu"
    assert report["defaults"]["guidance_scale"] == {"sds": 100.0, "vsd": 7.5}
    assert report["defaults"]["render_size"] == 256
    step = report["step"]
    assert step["finite"] and step["seconds"] > 0 and step["saved_gib_per_view"] > 0
    assert step["encoder_size"] == report["resolution"]
    presets = report["presets"]
    assert set(presets) == {"draft", "standard", "high"}
    # more views per step need more memory, by exactly the measured activations per view
    assert presets["high"]["estimate_gib"] - presets["standard"]["estimate_gib"] == pytest.approx(
        4 * step["saved_gib_per_view"])
    assert presets["draft"]["estimate_gib"] > report["parameters_gib"] > 0


def test_doctor_text_for_one_preset(sd_fp16_folder, capsys):
    assert main(["doctor", "--model", str(sd_fp16_folder), "--device", "cpu", "--preset", "standard"]) == 0
    out = capsys.readouterr().out
    assert "guidance scale sds 100, vsd 7.5" in out and "background learned" in out
    assert "unet: 'fp16'" in out and "gradient finite" in out
    assert "standard" in out and "high " not in out


def test_doctor_on_a_missing_model_is_one_line(tmp_path, capsys):
    assert main(["doctor", "--model", str(tmp_path / "nothing"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "engine-server doctor: error: no model folder at" in err and len(err.strip().splitlines()) == 1
