"""A render of the scene camera as the reference: the add-on sends that camera, the engine uses it, the panel says so.

Real Blender (bpy 5.0, child process ``reference_camera_check.py``), the built add-on, a real
engine server running the image job (bundled prior, CPU, a few steps).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from .conftest import TINY_JOB, run_reporting

pytestmark = pytest.mark.slow  # Blender installs the add-on, renders and runs a real image job (~1 min)

CHECK = Path(__file__).resolve().parent / "reference_camera_check.py"
ELEVATION = 35.0


@pytest.fixture(scope="module")
def checks(addon_build, engine, tmp_path_factory) -> dict:
    if importlib.util.find_spec("bpy") is None:
        pytest.skip("Blender-as-a-module is not installed: pip install bpy==5.0.1 (Python 3.11)")
    tmp = tmp_path_factory.mktemp("reference-camera")
    report = tmp / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BLENDER_USER_RESOURCES": str(tmp / "user")}
    cmd = [sys.executable, str(CHECK), "--zip", str(addon_build.extension_zip), "--endpoint", engine.endpoint,
           "--key-file", str(engine.key), "--report", str(report), "--elevation", str(ELEVATION),
           "--overrides", f"{TINY_JOB} views=2 multiview_steps=4"]
    return run_reporting(cmd, env, report, timeout=600)


@pytest.mark.parametrize("name", ["render_result_sends_scene_camera", "background_image_is_the_camera_s",
                                  "other_image_has_no_camera", "engine_used_the_scene_camera",
                                  "panel_shows_the_camera"])
def test_reference_camera(checks, name):
    assert "no_exception" not in checks, checks["no_exception"]["detail"]
    assert name in checks, checks["_log"]
    assert checks[name]["ok"], checks[name]["detail"]
