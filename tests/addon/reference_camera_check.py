"""A render of the scene camera as the reference image: the add-on sends that camera, the engine uses it.

    python tests/addon/reference_camera_check.py --zip ZIP --endpoint tcp://127.0.0.1:PORT --key-file KEY \\
        --report out.json --overrides "..." --elevation 35

Runs under Blender-as-a-module (bpy 5.0). Blender's default scene (the 2 m cube, the 50 mm
camera 11.2 m away) with the camera moved to ``--elevation`` degrees above the cube; Workbench
renders it; the Render Result becomes the panel's reference image and Generate runs a real
image job on the engine. The report (check name -> {ok, detail}) says what the add-on sent,
what the result's meta says the engine used, and what the panel shows; the same camera found
through a camera's background image; nothing sent for an image no camera rendered.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import traceback
from pathlib import Path

import bpy
from mathutils import Vector

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smoke import Checks, _install  # noqa: E402  (the smoke script's installer and report)

CAMERA_DISTANCE = 11.23
"""|location| of Blender's default camera."""
AZIMUTH = 46.7
"""Blender's default camera azimuth, degrees."""


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    for name in ("--zip", "--endpoint", "--key-file", "--report"):
        p.add_argument(name, required=True)
    p.add_argument("--overrides", default="")
    p.add_argument("--elevation", type=float, default=35.0)
    p.add_argument("--job-timeout", type=float, default=300.0)
    return p.parse_args(sys.argv[1:])


def _scene(elevation: float) -> bpy.types.Object:
    """Blender's default scene, its camera at ``elevation`` looking at the red cube; returns the camera."""
    bpy.ops.wm.read_factory_settings(use_empty=False)
    scene = bpy.context.scene
    cube, camera = bpy.data.objects["Cube"], bpy.data.objects["Camera"]
    mat = bpy.data.materials.new("red")
    mat.diffuse_color = (0.8, 0.05, 0.04, 1.0)
    cube.data.materials.append(mat)
    el, az = math.radians(elevation), math.radians(AZIMUTH)
    camera.location = (CAMERA_DISTANCE * math.cos(el) * math.sin(az), -CAMERA_DISTANCE * math.cos(el) * math.cos(az),
                       CAMERA_DISTANCE * math.sin(el))
    camera.rotation_euler = (Vector((0.0, 0.0, 0.0)) - camera.location).to_track_quat("-Z", "Y").to_euler()
    scene.render.engine = "BLENDER_WORKBENCH"
    scene.display.shading.color_type = "MATERIAL"
    scene.render.resolution_x = scene.render.resolution_y = 128
    scene.render.resolution_percentage = 100
    return camera


def _sent_elevation(entry: dict) -> tuple[float, float]:
    """Elevation (degrees) and distance of a rig entry's camera about the origin."""
    x, y, z = (entry["matrix_world"][i][3] for i in range(3))
    return math.degrees(math.atan2(z, math.hypot(x, y))), math.sqrt(x * x + y * y + z * z)


def main() -> int:
    args = _args()
    checks = Checks()
    rt = None
    try:
        camera = _scene(args.elevation)
        scene = bpy.context.scene
        name = _install(args.zip)
        rt = sys.modules[f"{name}.runtime"]
        bpy.ops.render.render()
        render = bpy.data.images["Render Result"]

        # What the add-on sends for the Render Result: the scene camera in the unit box's frame.
        found = rt.reference_camera(scene, render, None)
        entry, shown = found if found else ({}, {})
        el, dist = _sent_elevation(entry) if entry else (None, None)
        checks.add("render_result_sends_scene_camera",
                   found is not None and abs(el - args.elevation) < 0.01 and abs(dist - CAMERA_DISTANCE / 2) < 0.01
                   and abs(entry["fov_y_deg"] - math.degrees(2 * math.atan(18 / 50))) < 0.01
                   and shown == {"source": "rig", "camera": camera.name, "elevation_deg": round(args.elevation, 2)},
                   {"elevation": el, "distance": dist, "fov_y_deg": entry.get("fov_y_deg"), "shown": shown})

        # The same render as a camera's background image is that camera's too; any other image is no camera's.
        path = Path(args.report).with_name("render.png")
        render.save_render(str(path))
        loaded = bpy.data.images.load(str(path))
        background = camera.data.background_images.new()
        background.image = loaded
        checks.add("background_image_is_the_camera_s", rt.source_camera(scene, loaded) == camera, loaded.name)
        other = bpy.data.images.new("painted", 8, 8)
        checks.add("other_image_has_no_camera", rt.reference_camera(scene, other, None) is None, other.name)

        # A real image job: the engine's meta says it used the rig's camera at that elevation, brought as much
        # closer as its framing cut the render (the cube fills 0.4 of it, the prior's framing 0.6); the panel says so.
        p = bpy.context.preferences.addons[name].preferences
        p.endpoint, p.key_file, p.timeout_s, p.job_timeout_s = args.endpoint, args.key_file, 5.0, args.job_timeout
        s = scene.generate3d
        s.prompt, s.image, s.overrides = "", render, args.overrides
        result = bpy.ops.generate3d.generate()
        job = list(rt.runtime.session.jobs.values())[-1]
        used = job.reference_camera or {}
        checks.add("engine_used_the_scene_camera",
                   result == {"FINISHED"} and job.imported is not None and used.get("source") == "rig"
                   and abs(float(used.get("elevation_deg", -99)) - args.elevation) < 0.5
                   and 0.5 < float(used.get("distance", 0)) / (CAMERA_DISTANCE / 2) < 0.8
                   and abs(float(used.get("fov_y_deg", 0)) - entry["fov_y_deg"]) < 0.01,
                   {"result": sorted(result), "state": job.state, "message": job.message, "used": used})
        line = job.camera_line()
        checks.add("panel_shows_the_camera", line == f"Reference camera: scene camera {camera.name}, "
                                                     f"{args.elevation:.0f}\u00b0 up", line)
    except Exception:  # the report says what broke; the test fails on the missing checks
        checks.add("no_exception", False, traceback.format_exc()[-3000:])
    finally:
        if rt is not None:
            rt.close_session()
    Path(args.report).write_text(json.dumps(checks.results, indent=1))
    return 0 if all(c["ok"] for c in checks.results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
