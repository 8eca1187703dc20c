"""The command line: one parser, verbs defined once, light to start, bad input as one line with status 2."""
from __future__ import annotations

import subprocess
import sys

import pytest

from engine_server.cli import build_parser, main
from engine_server.pipelines.presets import DEFAULT_PRESET, PRESETS


def _run(*code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "\n".join(code)], capture_output=True, text=True, timeout=120)


def _verbs() -> dict:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices


def test_help_builds_without_importing_torch_or_the_engine():
    r = _run("import sys",
             "from engine_server.cli import build_parser",
             "build_parser().format_help()",
             "heavy = [m for m in ('torch', 'numpy', 'diffusers', 'zmq', 'engine_server.service.server',",
             "         'engine_server.pipelines.text_to_3d') if m in sys.modules]",
             "print(heavy)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_every_verb_is_registered_once():
    verbs = _verbs()
    assert set(verbs) == {"info", "bench", "generate", "multiview", "refine", "doctor", "serve", "jobs",
                          "train-bundled", "eval-bundled", "export-bundled", "eval-text-to-3d"}


@pytest.mark.parametrize("verb", ["generate", "refine"])
def test_job_verbs_share_the_preset_names_and_flags(verb):
    parser = _verbs()[verb]
    flags = {opt: a for a in parser._actions for opt in a.option_strings}
    assert flags["--preset"].choices == list(PRESETS) and flags["--preset"].default == DEFAULT_PRESET
    assert {"--seed", "--model", "--device", "--steps"} <= set(flags)
    assert {"--guidance", "--guidance-scale", "--negative-prompt", "--render-size"} <= set(flags)
    assert flags["--guidance-scale"].default is None  # unset: the prior's own scale


def test_bad_output_is_one_usage_line_with_status_2(tmp_path, capsys):
    assert main(["generate", "a red cube", "--out", str(tmp_path / "cube.fbx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["engine-server generate: error: --out: cannot export to '.fbx' (cube.fbx): "
                   "the extension must be one of .glb, .obj, .usd, .usda, .usdc, .usdz"]
    assert main(["refine", str(tmp_path / "in.glb"), "a red cube", "--out", str(tmp_path / "x.gltf")]) == 2
    assert "'.gltf'" in capsys.readouterr().err  # checked before the input mesh is read
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("verb", ["generate", "refine"])
def test_job_verbs_take_the_asset_flags_and_every_export_extension(verb):
    parser = _verbs()[verb]
    flags = {opt: a for a in parser._actions for opt in a.option_strings}
    assert flags["--faces"].default is None and flags["--texture-size"].default is None  # unset: the preset's
    for ext in (".glb", ".obj", ".usd", ".usda", ".usdc", ".usdz"):
        assert ext in flags["--out"].help


@pytest.mark.parametrize(("flags", "message"), [
    (["--faces", "99"], "--faces must be in [100, 2000000], got 99"),
    (["--faces", "2000001"], "--faces must be in [100, 2000000], got 2000001"),
    (["--texture-size", "8"], "--texture-size must be in [16, 8192], got 8"),
])
def test_asset_flags_out_of_bounds_are_one_usage_line(tmp_path, capsys, flags, message):
    assert main(["generate", "a red cube", "--out", str(tmp_path / "cube.obj"), *flags]) == 2
    assert capsys.readouterr().err.strip() == f"engine-server generate: error: {message}"
    assert list(tmp_path.iterdir()) == []


def test_unknown_prompt_word_is_one_usage_line(tmp_path, capsys):
    assert main(["generate", "a red spaceship", "--out", str(tmp_path / "x.glb"), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "spaceship" in err[0]


def test_refine_missing_mesh_names_the_file(tmp_path, capsys):
    missing = tmp_path / "nope.glb"
    assert main(["refine", str(missing), "a red cube", "--out", str(tmp_path / "out.glb")]) == 2
    assert str(missing) in capsys.readouterr().err


def test_jobs_without_a_store_says_where_it_looked(tmp_path, capsys):
    assert main(["jobs", "--data", str(tmp_path / "empty"), "list"]) == 2
    assert "no job store in" in capsys.readouterr().err


def test_python_dash_m_runs_the_same_main():
    r = subprocess.run([sys.executable, "-m", "engine_server", "--version"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("engine-server ")


def test_perp_neg_with_a_prior_that_cannot_take_it_is_one_usage_line(tmp_path, capsys):
    assert main(["generate", "a red cube", "--perp-neg", "--out", str(tmp_path / "x.glb"), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Perp-Neg is for text-to-image priors" in err[0]
    assert list(tmp_path.iterdir()) == []
