"""The built add-on in real Blender against a real engine server: bpy 5.0 (extension) and Blender 3.4 (legacy).

Each Blender session runs ``smoke.py`` in a child process (Blender is never imported
into pytest) and writes a JSON report of named checks; the tests below assert them.
The engine runs jobs for real (bundled prior, CPU, a few steps): text, image and refine
jobs each bring a new object; the original of a refine is never touched.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import sys
import sysconfig
from pathlib import Path

import pytest

from .conftest import ROOT, TINY_JOB, run_reporting  # noqa: F401  (ROOT also puts the repo on sys.path)

pytestmark = pytest.mark.slow  # each Blender session installs the add-on and runs real jobs (~30 s)

SMOKE = Path(__file__).resolve().parent / "smoke.py"
PROMPT = "a red cube"
NAME = "red_cube"
"""What the engine names an object made from PROMPT (engine_server.export.object_name)."""


def _smoke_args(zip_path: Path, engine, report: Path) -> list[str]:
    endpoint, key, _ = engine
    return ["--zip", str(zip_path), "--endpoint", endpoint, "--key-file", str(key), "--report", str(report),
            "--prompt", PROMPT, "--overrides", TINY_JOB, "--job-timeout", "150", "--expect-worker"]




@pytest.fixture(scope="module")
def bpy_checks(addon_build, engine, tmp_path_factory) -> dict:
    if importlib.util.find_spec("bpy") is None:
        pytest.skip("Blender-as-a-module is not installed: pip install bpy==5.0.1 (Python 3.11)")
    tmp = tmp_path_factory.mktemp("bpy")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BLENDER_USER_RESOURCES": str(tmp / "user")}
    report = tmp / "report.json"
    with socket.socket() as sock:  # a free port for the engine the add-on starts itself
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    autostart = (f"{sys.executable} -m engine_server serve --protocol-only --bind {{endpoint}} "
                 f"--data {tmp / 'autostart-data'} --key-file {engine[1]}")
    return run_reporting([sys.executable, str(SMOKE), *_smoke_args(addon_build.extension_zip, engine, report),
                 "--expect-wheel", "--rig-check", "--ui-path", "--autostart-command", autostart,
                 "--autostart-endpoint", f"tcp://127.0.0.1:{port}"], env, report)


@pytest.fixture(scope="module")
def blender34_checks(addon_build, engine, tmp_path_factory) -> dict:
    blender = shutil.which("blender")
    if blender is None:
        pytest.skip("no blender binary (CI installs Debian's: apt-get install --no-install-recommends blender)")
    tmp = tmp_path_factory.mktemp("blender")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           # Debian's Blender has no numpy or pyzmq of its own: lend it the venv's packages.
           "PYTHONPATH": os.pathsep.join([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]),
           "BLENDER_USER_CONFIG": str(tmp / "config"), "BLENDER_USER_SCRIPTS": str(tmp / "scripts"),
           "BLENDER_USER_DATAFILES": str(tmp / "datafiles")}
    report = tmp / "report.json"
    return run_reporting([blender, "-b", "--factory-startup", "--python-exit-code", "1", "--python", str(SMOKE), "--",
                 *_smoke_args(addon_build.legacy_zip, engine, report)], env, report)


def _ok(checks: dict, name: str):
    assert name in checks, f"check {name} did not run:\n{checks.get('exception', {}).get('detail') or checks['_log']}"
    assert checks[name]["ok"], f"{name}: {checks[name]['detail']}\n--- log ---\n{checks['_log']}"
    return checks[name]["detail"]


REGISTRATION = ("installed", "panel_registered", "operators_registered", "scene_settings")


@pytest.mark.parametrize("name", REGISTRATION)
def test_extension_installs_and_registers_in_bpy(bpy_checks, name):
    _ok(bpy_checks, name)
    if name == "installed":
        assert _ok(bpy_checks, name).startswith("bl_ext.")  # installed as an extension, not a legacy add-on


def test_bundled_pyzmq_wheel_is_installed_by_blender(bpy_checks):
    _ok(bpy_checks, "bundled_wheel_installed")


def test_addon_uses_its_bundled_copy_of_the_engine_client(bpy_checks):
    path = _ok(bpy_checks, "uses_bundled_client")
    assert "engine_client" in path and "engine_server" not in path


def test_timers_never_fire_in_background_and_drain_works_directly(bpy_checks):
    _ok(bpy_checks, "timers_do_not_fire_in_background")
    _ok(bpy_checks, "drain_callable_directly")


def test_ui_timer_function_runs_when_called(bpy_checks):
    _ok(bpy_checks, "timer_function_runs")


def test_camera_rig_field_of_view_matches_blenders_frustum(bpy_checks):
    _ok(bpy_checks, "rig_matches_blender_frustum")


def test_reference_image_job_is_sent_as_png(bpy_checks):
    _ok(bpy_checks, "image_job")


def test_connect_starts_a_local_engine_and_disable_stops_it(bpy_checks):
    _ok(bpy_checks, "autostart_engine")
    _ok(bpy_checks, "autostarted_engine_stopped")


def test_engine_down_is_a_clear_report_not_a_hang(bpy_checks):
    detail = _ok(bpy_checks, "engine_down_reports")
    assert "did not answer" in detail and "engine-server serve" in detail


@pytest.mark.parametrize("check", ["ui_engine_down", "ui_engine_slow"])
def test_nothing_pressed_blocks_the_ui_when_the_engine_is_down_or_silent(bpy_checks, check):
    detail = _ok(bpy_checks, check)
    assert max(detail["press_s"].values()) < 0.1 and detail["longest_drain_s"] < 0.1, detail
    assert len(detail["reports"]) == 2 and all("engine-server serve" in r for r in detail["reports"]), detail


def test_a_job_run_as_the_ui_runs_it_never_blocks_and_lands_on_the_cursor(bpy_checks):
    detail = _ok(bpy_checks, "ui_generate")
    assert detail["press_s"] < 0.1 and detail["drains"] > 10, detail
    facts = detail["object"]
    assert facts["world_min"][2] == pytest.approx(facts["cursor"][2], abs=1e-5) and facts["selected"] and facts["active"]


def test_status_says_engine_lost_when_the_heartbeat_stops(bpy_checks):
    detail = _ok(bpy_checks, "engine_lost_status")
    assert detail["seconds"] < 8, detail


def test_jobs_list_keeps_a_failed_jobs_code_and_message(bpy_checks):
    listed = _ok(bpy_checks, "jobs_list_failure_code")["listed"]
    assert listed.startswith("invalid_option: ") and "guidance" in listed


def test_ctrl_c_in_background_cancels_the_job_on_the_engine(bpy_checks):
    assert _ok(bpy_checks, "ctrl_c_cancels")["engine_state"] == "cancelled"


def test_preset_menu_lists_the_engines_presets_once_connected(bpy_checks):
    detail = _ok(bpy_checks, "presets_from_welcome")
    assert detail["after_connect"] == ["draft", "standard", "high"]


def test_generate_makes_a_textured_object_named_as_the_engine_names_it(bpy_checks):
    _ok(bpy_checks, "connect")
    (obj,) = _ok(bpy_checks, "generate")["objects"]
    assert obj["name"] == NAME  # the GLB node's name (export.object_name), carried in the result meta
    assert obj["faces"] > 100 and obj["vertices"] > 50 and obj["uv_layers"] == 1
    assert obj["principled"] and obj["base_color_from"] == "TEX_IMAGE"
    assert obj["image_packed"] and obj["image_size"] == [64, 64]
    facts = _ok(bpy_checks, "generated_object")
    cursor = facts["cursor"]
    assert cursor == pytest.approx([2.0, -1.5, 0.7])
    # rests on the 3D cursor: lowest point at the cursor's height, centred on it in x and y
    assert facts["location"] == pytest.approx(cursor)
    assert facts["world_min"][2] == pytest.approx(cursor[2], abs=1e-5)
    centre = [(lo + hi) / 2 for lo, hi in zip(facts["world_min"], facts["world_max"])]
    assert centre[:2] == pytest.approx(cursor[:2], abs=1e-5)
    assert 0.3 < facts["world_max"][2] - cursor[2] <= 1.05  # the engine's unit box, standing on the cursor
    # Save As OBJ: the engine's OBJ, MTL and both textures land in <folder>/<object name>/
    assert {"model.obj", "model.mtl"} <= set(_ok(bpy_checks, "export_files_saved"))
    assert facts["selected"] and facts["active"] and facts["only_selected"], facts
    assert facts["smooth"]
    # Solid view shows the texture's mean colour, not the default grey
    assert facts["display_colour"][:3] == pytest.approx(facts["texture_mean_rgb"], abs=0.02)
    assert facts["display_colour"][:3] != pytest.approx([0.8, 0.8, 0.8], abs=0.02)
    assert facts["texture_is_engine_png"], facts  # packed as the engine sent it: no GLB parsed, no re-encode
    assert max(facts["texture_mean_rgb"]) > 0.05  # not a black placeholder
    _ok(bpy_checks, "preview_image")
    _ok(bpy_checks, "no_preview_object_left")


def test_the_engine_sees_the_rig_around_the_cursor_with_each_cameras_field_of_view(bpy_checks, engine):
    import numpy as np
    import torch

    from engine_server.cameras import CameraSampler
    from engine_server.pipelines.kinds import relative_rig, rig_cameras
    from engine_server.service.jobs import load_request

    detail = _ok(bpy_checks, "rig_job")
    stored = load_request(engine.data / "jobs" / detail["job_id"])  # what the engine's job store kept
    cursor = np.array(detail["cursor"])
    assert np.allclose(np.array(stored["placement"])[:3, 3], cursor)
    assert len(stored["rig"]) == 2
    for cam, sent, fov in zip(relative_rig(stored["rig"], stored["placement"]), detail["sent"], detail["frustum_fov_y"]):
        c2w = np.array(cam["matrix_world"])
        eye, forward = c2w[:3, 3], -c2w[:3, 2]
        # relative to the placement: the camera sits where it was put around the cursor and looks at its origin
        assert np.allclose(eye, np.array(sent["matrix_world"])[:3, 3] - cursor, atol=1e-5)
        assert np.dot(forward, -eye / np.linalg.norm(eye)) > 0.9999
        assert cam["fov_y_deg"] == pytest.approx(fov, abs=1e-3)  # sensor fit and aspect as Blender frames it
        assert (cam["width"], cam["height"]) == (sent["width"], sent["height"])
    # the engine's training views: around those cameras, at their distances, looking at the cursor
    cameras = rig_cameras(stored)
    sampler = CameraSampler({}, cameras, torch.Generator().manual_seed(0))
    poses, fovs = sampler.sample(64)
    eyes = poses[:, :3, 3]
    assert torch.allclose((-poses[:, :3, 2] * -eyes / eyes.norm(dim=-1, keepdim=True)).sum(-1), torch.ones(64), atol=1e-5)
    wanted = {round(f, 3) for f in sampler.rig_fovs}
    assert {round(float(f), 3) for f in fovs} == wanted and len(wanted) == 2
    distances = sorted(float(c.c2w[:3, 3].norm()) for c in cameras)
    assert all(min(abs(float(d) - r) for r in distances) < 0.06 * max(distances) for d in eyes.norm(dim=-1))
    # made for cameras composed around the cursor: its centre stays on the cursor (it does not rest on it)
    facts = _ok(bpy_checks, "rig_generated_object")
    centre = (np.array(facts["world_min"]) + np.array(facts["world_max"])) / 2
    assert np.allclose(centre, cursor, atol=1e-4), (centre, cursor)


def test_refine_selected_never_modifies_the_original(bpy_checks):
    _ok(bpy_checks, "refine_keeps_original")
    detail = _ok(bpy_checks, "refine")
    assert detail["result"] == ["FINISHED"], detail
    (obj,) = detail["objects"]
    assert obj["name"] == "refined_" + NAME and obj["faces"] > 0 and obj["principled"]


def test_engine_error_becomes_an_operator_report(bpy_checks):
    detail = _ok(bpy_checks, "engine_error_reports")
    # refused at submit, with the engine's code and the field it names
    assert "elephant" in detail["error"] and "refused the job (" in detail["error"] and "field prompt" in detail["error"]


def test_background_job_timeout_cancels_the_job(bpy_checks):
    detail = _ok(bpy_checks, "job_timeout_cancels")
    assert "cancelled" in detail["error"]


def test_unregister_leaves_no_thread_or_socket(bpy_checks):
    _ok(bpy_checks, "unregistered")
    _ok(bpy_checks, "session_closed")
    _ok(bpy_checks, "no_thread_left")


def test_legacy_addon_works_end_to_end_in_blender_3_4(blender34_checks):
    assert _ok(blender34_checks, "background_mode").startswith("3.")
    for name in (*REGISTRATION, "timers_do_not_fire_in_background", "drain_callable_directly", "engine_down_reports",
                 "presets_from_welcome",
                 "timer_function_runs", "rig_matches_blender_frustum", "connect", "generate", "generated_object",
                 "export_files_saved", "refine_keeps_original", "image_job", "engine_error_reports",
                 "unregistered", "session_closed", "no_thread_left"):
        _ok(blender34_checks, name)
    (obj,) = _ok(blender34_checks, "generate")["objects"]
    assert obj["name"] == NAME and obj["principled"] and obj["base_color_from"] == "TEX_IMAGE" and obj["image_packed"]
