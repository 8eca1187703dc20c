"""Install the built add-on in a fresh Blender, drive its operators against an engine, report as JSON.

Runs unchanged under Blender-as-a-module and a real Blender binary::

    python tests/addon/smoke.py --zip dist/generate_3d-0.1.0.zip --endpoint tcp://127.0.0.1:PORT \\
        --key-file KEY --report out.json
    blender -b --factory-startup --python tests/addon/smoke.py -- --zip dist/generate_3d-0.1.0-legacy.zip ...

Blender 4.2+ installs the extension zip with ``extensions.package_install_files``;
older Blender installs the legacy zip with ``preferences.addon_install``. Point
``BLENDER_USER_RESOURCES`` (4.2+) or ``BLENDER_USER_CONFIG`` / ``BLENDER_USER_SCRIPTS``
(older) at a temporary folder so no real Blender configuration is touched.
The report maps check names to {ok, detail}; the exit status is 1 when a check failed.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import bpy

ADDON_ID = "generate_3d"


def _args() -> argparse.Namespace:
    argv = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else sys.argv[1:]
    p = argparse.ArgumentParser()
    p.add_argument("--zip", required=True)
    p.add_argument("--endpoint", required=True)
    p.add_argument("--key-file", required=True)
    p.add_argument("--report", required=True)
    p.add_argument("--dead-endpoint", default="tcp://127.0.0.1:9")
    p.add_argument("--prompt", default="a red cube")
    p.add_argument("--bad-prompt", default="a purple elephant")
    p.add_argument("--overrides", default="", help="preset overrides for a tiny job, name=value ...")
    p.add_argument("--job-timeout", type=float, default=120.0)
    p.add_argument("--expect-worker", action="store_true",
                   help="the engine executes jobs (else jobs stay queued and Generate must time out cleanly)")
    p.add_argument("--skip-refine", action="store_true")
    p.add_argument("--rig-check", action="store_true", help="generate with two rig cameras around the cursor")
    p.add_argument("--ui-path", action="store_true",
                   help="also drive the operators as the UI does (helper threads + the timer's drain) and Ctrl-C")
    p.add_argument("--expect-wheel", action="store_true", help="the zip bundles pyzmq: Blender must have installed it")
    p.add_argument("--autostart-command", default="",
                   help="engine command line for the auto-start check ({endpoint} is filled in); empty: skipped")
    p.add_argument("--autostart-endpoint", default="")
    return p.parse_args(argv)


def _os_threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def _zmq_threads() -> list[str]:
    """Names of this process's ZeroMQ background threads (libzmq names them ZMQbg/...); Linux only."""
    names = []
    try:
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/comm") as f:
                    names.append(f.read().strip())
            except OSError:
                continue
    except OSError:
        return []
    return [n for n in names if n.startswith("ZMQbg")]


class Checks:
    def __init__(self):
        self.results: dict[str, dict] = {}

    def add(self, name: str, ok: bool, detail=None) -> bool:
        self.results[name] = {"ok": bool(ok), "detail": detail}
        print(f"[smoke] {'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
        return ok


def _install(zip_path: str) -> str:
    """Install and enable the add-on; returns its module name."""
    if bpy.app.version >= (4, 2, 0):
        bpy.ops.extensions.package_install_files(filepath=zip_path, repo="user_default", enable_on_install=True)
        names = [n for n in bpy.context.preferences.addons.keys() if n.split(".")[-1] == ADDON_ID]
    else:
        bpy.ops.preferences.addon_install(filepath=zip_path, overwrite=True)
        bpy.ops.preferences.addon_enable(module=ADDON_ID)
        names = [n for n in bpy.context.preferences.addons.keys() if n == ADDON_ID]
    if not names:
        raise RuntimeError(f"add-on {ADDON_ID} is not enabled after installing {zip_path}")
    return names[0]


def _material_facts(obj) -> dict:
    facts: dict = {"materials": len(obj.data.materials)}
    mat = obj.data.materials[0] if obj.data.materials else None
    if mat is None or mat.node_tree is None:
        return facts
    bsdf = next((n for n in mat.node_tree.nodes if n.type == "BSDF_PRINCIPLED"), None)
    facts["principled"] = bsdf is not None
    if bsdf is not None and bsdf.inputs["Base Color"].is_linked:
        node = bsdf.inputs["Base Color"].links[0].from_node
        facts["base_color_from"] = node.type
        if node.type == "TEX_IMAGE" and node.image is not None:
            facts["image_size"] = list(node.image.size)
            facts["image_packed"] = node.image.packed_file is not None
    return facts


def _mesh_facts(obj) -> dict:
    import numpy as np

    co = np.empty(len(obj.data.vertices) * 3, dtype=np.float64)
    obj.data.vertices.foreach_get("co", co)
    return {"name": obj.name, "vertices": len(obj.data.vertices), "faces": len(obj.data.polygons),
            "uv_layers": len(obj.data.uv_layers), "co_sum": float(np.abs(co).sum()),
            "matrix": [list(r) for r in obj.matrix_world], **_material_facts(obj)}


def _object_facts(obj) -> dict:
    """Where the object is, how big, and the colour of its texture (mean RGB of the image)."""
    import numpy as np

    co = np.empty(len(obj.data.vertices) * 3, dtype=np.float64)
    obj.data.vertices.foreach_get("co", co)
    co = co.reshape(-1, 3)
    world = co @ np.array(obj.matrix_world)[:3, :3].T + np.array(obj.matrix_world.translation)
    smooth = np.zeros(len(obj.data.polygons), dtype=bool)
    obj.data.polygons.foreach_get("use_smooth", smooth)
    view_layer = bpy.context.view_layer
    facts = {"local_min": co.min(0).tolist(), "local_max": co.max(0).tolist(),
             "world_min": world.min(0).tolist(), "world_max": world.max(0).tolist(),
             "location": list(obj.matrix_world.translation), "cursor": list(bpy.context.scene.cursor.location),
             "selected": obj.select_get(), "active": view_layer.objects.active == obj,
             "only_selected": [o.name for o in view_layer.objects if o.select_get()] == [obj.name],
             "smooth": bool(smooth.all()), "display_colour": list(obj.data.materials[0].diffuse_color)}
    mat = obj.data.materials[0]
    tex = next((n for n in mat.node_tree.nodes if n.type == "TEX_IMAGE"), None)
    if tex is not None and tex.image is not None:
        px = np.empty(tex.image.size[0] * tex.image.size[1] * tex.image.channels, dtype=np.float32)
        tex.image.pixels.foreach_get(px)
        facts["texture_mean_rgb"] = px.reshape(-1, tex.image.channels)[:, :3].mean(0).tolist()
    return facts


def _ui_path(rt, settings, endpoint: str, p) -> tuple[bool, dict]:
    """Press Connect and Generate as in the UI (``runtime.wait`` off) against an engine that is down or silent:
    each press and each timer drain must return within 100 ms; the reports must name the problem and the fix."""
    rt.runtime.wait = False
    p.endpoint = endpoint
    settings.prompt = "a red cube"
    presses, drains, reports = {}, [], []
    try:
        for name, op in (("connect", bpy.ops.generate3d.connect), ("generate", bpy.ops.generate3d.generate)):
            start = time.monotonic()
            op()
            presses[name] = time.monotonic() - start
        deadline = time.monotonic() + 4 * p.timeout_s + 5
        while time.monotonic() < deadline and (rt.runtime.session.pending or len(reports) < 2):
            start = time.monotonic()
            rt.drain(bpy.context)
            drains.append(time.monotonic() - start)
            reports += [m for level, m in rt.runtime.reports if level == "ERROR"]
            rt.runtime.reports.clear()
            time.sleep(0.05)
        status = rt.runtime.status
    finally:
        if rt.runtime.session is not None:
            bpy.ops.generate3d.disconnect()
        rt.runtime.wait = True
    ok = (max(presses.values()) < 0.1 and max(drains) < 0.1 and len(reports) == 2
          and all("did not answer" in m and "engine-server serve" in m for m in reports))
    return ok, {"press_s": presses, "longest_drain_s": max(drains), "drains": len(drains), "reports": reports,
                "status": status}


def _preview_facts(preview) -> tuple[bool, dict | None]:
    """The preview is enlarged (longer side >= 128 px) with nearest-neighbour sampling: equal pixels in blocks."""
    import numpy as np

    if preview is None:
        return False, None
    w, h = preview.size
    px = np.empty(w * h * preview.channels, dtype=np.float32)
    preview.pixels.foreach_get(px)
    px = px.reshape(h, w, preview.channels)
    block = 256 // 32 if max(w, h) >= 256 else 1  # the bundled prior renders 32 px
    crisp = block > 1 and bool(np.array_equal(px[::block, ::block].repeat(block, 0).repeat(block, 1), px))
    return max(w, h) >= 128 and crisp, {"size": [w, h], "nearest_blocks": crisp}


def _frustum_fov_y(camera, scene) -> float:
    """The camera's vertical field of view from Blender's own frustum corners (sensor fit applied)."""
    import math

    frame = camera.data.view_frame(scene=scene)
    return math.degrees(2 * math.atan(max(v.y for v in frame) / abs(frame[0].z)))


def _op_error(fn) -> tuple[set | None, str, float]:
    """Run an operator; (result, error text, seconds). bpy.ops raises RuntimeError when the operator reported an error."""
    start = time.monotonic()
    try:
        result = fn()
        return result, "", time.monotonic() - start
    except RuntimeError as exc:
        return None, str(exc), time.monotonic() - start


def main() -> int:
    args = _args()
    checks = Checks()
    baseline_threads = _os_threads()
    if bpy.app.version >= (4, 2, 0):
        bpy.ops.wm.read_factory_settings(use_empty=False)
    checks.add("background_mode", bpy.app.background, bpy.app.version_string)
    try:
        name = _install(args.zip)
        checks.add("installed", True, name)
        mod = sys.modules[name]
        rt = sys.modules[f"{name}.runtime"]
        checks.add("panel_registered", hasattr(bpy.types, "GENERATE3D_PT_main"), "GENERATE3D_PT_main")
        wanted = ("generate", "refine_selected", "cancel", "connect", "import_result", "refresh_jobs")
        missing = [o for o in wanted if not hasattr(bpy.ops.generate3d, o)]
        checks.add("operators_registered", not missing, missing or list(wanted))
        checks.add("scene_settings", hasattr(bpy.context.scene, "generate3d"), "Scene.generate3d")
        if args.expect_wheel:
            wheel_dirs = [d for d in sys.path if "extensions" in d and ".local" in d and os.path.isdir(os.path.join(d, "zmq"))]
            checks.add("bundled_wheel_installed", bool(wheel_dirs), wheel_dirs)

        # Timers never fire in background mode; the drain function works when called directly.
        fired = []
        bpy.app.timers.register(lambda: fired.append(1) and None, first_interval=0.0)
        time.sleep(0.3)
        checks.add("timers_do_not_fire_in_background", not fired, f"fired {len(fired)} times in 0.3 s")

        props = sys.modules[f"{name}.props"]
        before_connect = [i[0] for i in props.preset_items(bpy.context.scene.generate3d, bpy.context)]
        p = bpy.context.preferences.addons[name].preferences
        p.key_file = args.key_file
        p.timeout_s = 2.0
        p.job_timeout_s = args.job_timeout

        # Engine down: a clear report naming the fix, at once (nothing listens: a refused connect), no hang.
        p.endpoint = args.dead_endpoint
        _, err, took = _op_error(lambda: bpy.ops.generate3d.connect())
        checks.add("engine_down_reports", bool(err) and "did not answer" in err and "engine-server serve" in err
                   and "Start Engine Automatically" in err and took < 0.1 and rt.runtime.session is None,
                   f"{took:.3f} s: {err}")
        if args.ui_path:  # the operators as the UI runs them: requests on helper threads, the timer drains
            checks.add("ui_engine_down", *_ui_path(rt, bpy.context.scene.generate3d, args.dead_endpoint, p))
            with socket.socket() as silent:  # a "slow" engine: it accepts connections but never answers
                silent.bind(("127.0.0.1", 0))
                silent.listen(8)
                slow = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
                checks.add("ui_engine_slow", *_ui_path(rt, bpy.context.scene.generate3d, slow, p))
        p.endpoint = args.endpoint

        result, err, took = _op_error(lambda: bpy.ops.generate3d.connect())
        checks.add("connect", result == {"FINISHED"}, err or f"{took:.2f} s")
        client_mod = sys.modules.get(f"{name}.engine_client.client")
        welcome = rt.runtime.session.welcome if rt.runtime.session is not None else {}
        after_connect = [i[0] for i in props.preset_items(bpy.context.scene.generate3d, bpy.context)]
        checks.add("presets_from_welcome", before_connect == [props.ENGINE_DEFAULT]
                   and after_connect == list(welcome.get("presets") or ["?"])
                   and bpy.context.scene.generate3d.preset == after_connect[0],
                   {"before_connect": before_connect, "after_connect": after_connect})
        checks.add("uses_bundled_client", client_mod is not None and rt.runtime.session is not None
                   and rt.runtime.session.client_mod is client_mod,
                   getattr(client_mod, "__file__", None))
        import zmq

        checks.add("zmq_found", True, zmq.__file__)
        delay = rt.drain(bpy.context)
        checks.add("drain_callable_directly", isinstance(delay, float) and delay > 0, delay)
        delay = rt._timer()  # the UI timer's body runs too (it only never gets called by Blender here)
        checks.add("timer_function_runs", isinstance(delay, float) and delay > 0, delay)

        camera = bpy.data.objects.get("Camera")
        if camera is not None:
            scene = bpy.context.scene
            (entry,) = sys.modules[f"{name}.scene_io"].camera_rig([camera], scene)
            fov_y = _frustum_fov_y(camera, scene)
            pct = scene.render.resolution_percentage / 100
            checks.add("rig_matches_blender_frustum",
                       abs(entry["fov_y_deg"] - fov_y) < 1e-3 and entry["width"] == int(scene.render.resolution_x * pct)
                       and entry["matrix_world"] == [list(r) for r in camera.matrix_world],
                       {"rig_fov_y": entry["fov_y_deg"], "blender_fov_y": fov_y, "size": [entry["width"], entry["height"]]})

        scene = bpy.context.scene
        s = scene.generate3d
        s.prompt = args.prompt
        s.overrides = args.overrides
        s.seed = 7
        exports = tempfile.mkdtemp(prefix="generate3d-exports-")
        s.export_format, s.export_dir = "OBJ", exports  # the result's OBJ files are saved beside the object
        scene.cursor.location = (2.0, -1.5, 0.7)  # away from the origin
        before = set(bpy.data.objects.keys())
        if not args.expect_worker:
            p.job_timeout_s = 3.0
        result, err, took = _op_error(lambda: bpy.ops.generate3d.generate())
        new = [bpy.data.objects[n] for n in set(bpy.data.objects.keys()) - before]
        if args.expect_worker:
            ok = result == {"FINISHED"} and len(new) == 1
            checks.add("generate", ok, {"seconds": took, "error": err, "objects": [_mesh_facts(o) for o in new]})
            if new:
                facts = _object_facts(new[0])
                job = next(j for j in rt.runtime.session.jobs.values() if j.imported == new[0].name)
                engine_png = rt.runtime.session.result(job.job_id).texture
                tex = next(n for n in new[0].data.materials[0].node_tree.nodes if n.type == "TEX_IMAGE").image
                # the packed image is the engine's PNG as it came (Blender decodes it the right way up itself)
                facts["texture_is_engine_png"] = engine_png is not None and tex.packed_file is not None \
                    and bytes(tex.packed_file.data) == engine_png
                checks.add("generated_object", True, facts)
                saved = sorted(p.name for p in Path(exports, new[0].name).glob("*"))
                checks.add("export_files_saved", "model.obj" in saved and "model.mtl" in saved
                           and sum(n.endswith(".png") for n in saved) == 2, saved)
                s.export_format = "NONE"
            preview = bpy.data.images.get(rt.importer.PREVIEW_IMAGE)
            checks.add("preview_image", *_preview_facts(preview))
            checks.add("no_preview_object_left", not any(n.endswith("(preview)") for n in bpy.data.objects.keys()),
                       sorted(bpy.data.objects.keys()))
        else:
            checks.add("generate_times_out_cleanly", result is None and "did not finish" in err and not new and took < 15,
                       {"seconds": took, "error": err})
        p.job_timeout_s = args.job_timeout

        if args.expect_worker and args.rig_check:  # two cameras around the cursor, composed by hand, as the rig
            import mathutils

            rig_cams = []
            for cam_name, offset, lens, fit in (("RigFront", (0.3, -4.0, 1.0), 50.0, "AUTO"),
                                                ("RigSide", (3.0, 0.5, 2.0), 35.0, "VERTICAL")):
                cam = bpy.data.objects.new(cam_name, bpy.data.cameras.new(cam_name))
                scene.collection.objects.link(cam)
                cam.data.lens, cam.data.sensor_fit = lens, fit
                cam.location = scene.cursor.location + mathutils.Vector(offset)
                cam.rotation_euler = (scene.cursor.location - cam.location).to_track_quat("-Z", "Y").to_euler()
                rig_cams.append(cam)
            bpy.context.view_layer.update()
            for o in bpy.context.view_layer.objects:
                o.select_set(o in rig_cams)
            s.use_rig = True
            sent = [dict(e) for e in sys.modules[f"{name}.scene_io"].camera_rig(rig_cams, scene)]
            result, err, took = _op_error(lambda: bpy.ops.generate3d.generate())
            s.use_rig = False
            job = list(rt.runtime.session.jobs.values())[-1]
            checks.add("rig_job", result == {"FINISHED"} and job.imported is not None,
                       {"error": err, "seconds": took, "job_id": job.job_id, "sent": sent,
                        "cursor": list(scene.cursor.location),
                        "frustum_fov_y": [_frustum_fov_y(c, scene) for c in rig_cams]})
            if job.imported is not None:
                checks.add("rig_generated_object", True, _object_facts(bpy.data.objects[job.imported]))
            for cam in rig_cams:
                bpy.data.objects.remove(cam, do_unlink=True)

        if not args.skip_refine:
            cube = bpy.data.objects.get("Cube")
            if cube is None:
                bpy.ops.mesh.primitive_cube_add()
                cube = bpy.context.active_object
            for o in bpy.context.view_layer.objects:
                o.select_set(False)
            cube.select_set(True)
            bpy.context.view_layer.objects.active = cube
            original = _mesh_facts(cube)
            before = set(bpy.data.objects.keys())
            if not args.expect_worker:
                p.job_timeout_s = 3.0
            s.steps = 3  # the steps override drives a refine job's refine_steps
            result, err, took = _op_error(lambda: bpy.ops.generate3d.refine_selected())
            s.steps = 0
            new = [bpy.data.objects[n] for n in set(bpy.data.objects.keys()) - before]
            after = _mesh_facts(bpy.data.objects[original["name"]])
            checks.add("refine_keeps_original", after == original, {"before": original, "after": after})
            checks.add("refine", True, {"result": sorted(result) if result else None, "error": err, "seconds": took,
                                        "objects": [_mesh_facts(o) for o in new]})
            p.job_timeout_s = args.job_timeout

        if args.expect_worker:
            s.prompt = args.bad_prompt
            before = set(bpy.data.objects.keys())
            result, err, took = _op_error(lambda: bpy.ops.generate3d.generate())
            checks.add("engine_error_reports", result is None and bool(err) and took < args.job_timeout
                       and set(bpy.data.objects.keys()) == before, {"seconds": took, "error": err})
            s.prompt, overrides = args.prompt, s.overrides
            s.overrides = f"{overrides} guidance=bogus"  # taken at submit, refused by the job's run: a failed job
            result, err, took = _op_error(lambda: bpy.ops.generate3d.generate())
            s.overrides = overrides
            failed = list(rt.runtime.session.jobs.values())[-1]
            rt.runtime.session.jobs.clear()  # as after a restart: the engine's list brings the reason back
            listed = {j.job_id: j for j in rt.runtime.session.refresh()}
            again = listed.get(failed.job_id)
            checks.add("jobs_list_failure_code", failed.state == "failed" and again is not None
                       and again.state == "failed" and again.message.startswith("invalid_option: ")
                       and again.message == failed.message and failed.message in err,
                       {"error": err, "submitted": failed.message,
                                                             "listed": again.message if again else None})

        # A reference image travels as PNG: a red square on the bundled prior's plain cyan background.
        ref = bpy.data.images.new("reference", 16, 16)
        pixels = []
        for y in range(16):
            for x in range(16):
                inside = 4 <= x < 12 and 4 <= y < 12
                pixels += [0.8, 0.05, 0.05, 1.0] if inside else [0.0, 0.75, 0.75, 1.0]
        ref.pixels.foreach_set(pixels)
        s.image = ref
        s.prompt = ""
        p.job_timeout_s = 3.0 if not args.expect_worker else args.job_timeout
        before = set(bpy.data.objects.keys())
        result, err, took = _op_error(lambda: bpy.ops.generate3d.generate())
        new = [bpy.data.objects[n] for n in set(bpy.data.objects.keys()) - before]
        s.image = None
        ok = result == {"FINISHED"} and len(new) == 1 if args.expect_worker else "did not finish" in err
        checks.add("image_job", ok,
                   {"result": sorted(result) if result else None, "error": err, "seconds": took})

        if args.expect_worker:  # a job that outlives the background timeout is cancelled, and says so
            s.prompt, overrides = args.prompt, s.overrides
            s.overrides = f"{overrides} coarse_steps=2000"  # the tiny job alone can finish inside the timeout
            p.job_timeout_s = 0.5
            before = set(bpy.data.objects.keys())
            result, err, took = _op_error(lambda: bpy.ops.generate3d.generate())
            s.overrides = overrides
            job = list(rt.runtime.session.jobs.values())[-1]
            checks.add("job_timeout_cancels", result is None and "did not finish" in err and took < 10
                       and set(bpy.data.objects.keys()) == before,
                       {"seconds": took, "error": err, "job_state": job.state,
                        "new_objects": sorted(set(bpy.data.objects.keys()) - before)})

        if args.expect_worker and args.ui_path:  # a whole job as the UI runs it: helper threads and the timer's drain
            s.prompt, s.image = args.prompt, None
            rt.runtime.wait = False
            before, seen = set(bpy.data.objects.keys()), set(rt.runtime.session.jobs)
            start = time.monotonic()
            result = bpy.ops.generate3d.generate()
            press = time.monotonic() - start
            drains, job, deadline = [], None, time.monotonic() + args.job_timeout
            while time.monotonic() < deadline and (job is None or job.imported is None and job.state != "failed"):
                start = time.monotonic()
                rt.drain(bpy.context)
                drains.append(time.monotonic() - start)
                if job is None:  # the engine's job, once the submit's helper thread is through
                    job = next((j for i, j in rt.runtime.session.jobs.items() if i not in seen), None)
                time.sleep(0.05)
            rt.runtime.wait = True
            new = sorted(set(bpy.data.objects.keys()) - before)
            checks.add("ui_generate", result == {"FINISHED"} and press < 0.1 and job is not None
                       and job.imported is not None and new == [job.imported],
                       {"press_s": press, "drains": len(drains), "longest_drain_s": max(drains) if drains else None,
                        "job": vars(job) if job is not None else None, "new_objects": new,
                        "object": _object_facts(bpy.data.objects[new[0]]) if len(new) == 1 else None})
            rt.runtime.reports.clear()

        if args.expect_worker and args.ui_path:  # Ctrl-C while a background operator waits: the job is cancelled
            s.prompt, s.image, overrides = args.prompt, None, s.overrides
            # Far more steps than the tiny job: still running when the signal comes, however idle the machine.
            s.overrides = f"{overrides} coarse_steps=2000"
            p.job_timeout_s = args.job_timeout
            interrupt = threading.Timer(1.5, lambda: os.kill(os.getpid(), signal.SIGINT))
            interrupt.start()
            result, err, took = _op_error(lambda: bpy.ops.generate3d.generate())
            interrupt.join()
            s.overrides = overrides
            job = list(rt.runtime.session.jobs.values())[-1]
            state, deadline = "", time.monotonic() + 15
            while time.monotonic() < deadline and state != "cancelled":
                state = next((j.state for j in rt.runtime.session.refresh() if j.job_id == job.job_id), "")
                time.sleep(0.3)
            checks.add("ctrl_c_cancels", result is None and "interrupted (Ctrl-C)" in err and state == "cancelled"
                       and took < 10, {"seconds": took, "error": err, "engine_state": state})

        if args.autostart_command:  # no engine at the endpoint: the add-on starts one, and stops it on disable
            bpy.ops.generate3d.disconnect()
            p.endpoint = args.autostart_endpoint
            p.auto_start = True
            p.engine_command = args.autostart_command.replace("{endpoint}", args.autostart_endpoint)
            result, err, took = _op_error(lambda: bpy.ops.generate3d.connect())
            proc = rt.runtime.session.process if rt.runtime.session is not None else None
            checks.add("autostart_engine", result == {"FINISHED"} and proc is not None and proc.poll() is None,
                       {"error": err, "seconds": took})
            if proc is not None:  # the engine dies: the status follows the heartbeat and the artist is told
                rt.drain(bpy.context)
                idle = rt.runtime.status
                proc.terminate()
                proc.wait(10)
                start, lost_reports = time.monotonic(), []
                while time.monotonic() - start < 10 and not rt.runtime.status.startswith("engine lost"):
                    rt.drain(bpy.context, timeout=0.2)
                    lost_reports += [m for _, m in rt.runtime.reports]
                    rt.runtime.reports.clear()
                checks.add("engine_lost_status", idle == "engine idle" and rt.runtime.status.startswith("engine lost")
                           and any("engine-server serve" in m for m in lost_reports),
                           {"before": idle, "after": rt.runtime.status, "seconds": time.monotonic() - start,
                            "reports": lost_reports})
        else:
            proc = None

        session = rt.runtime.session
        threads_connected = _os_threads()
        zmq_connected = _zmq_threads()
        bpy.ops.preferences.addon_disable(module=name)
        checks.add("unregistered", not hasattr(bpy.types, "GENERATE3D_PT_main") and not hasattr(bpy.types.Scene, "generate3d"),
                   "panel and settings gone")
        checks.add("session_closed", rt.runtime.session is None and session is not None and session.client._socket is None,
                   "socket closed")
        if proc is not None:
            checks.add("autostarted_engine_stopped", proc.poll() is not None, proc.returncode)
        time.sleep(0.2)
        # ZeroMQ's I/O and reaper threads end with the session's context; Blender's own worker
        # threads (started lazily by its task scheduler) may outlive the add-on and are not ours.
        zmq_after = _zmq_threads()
        checks.add("no_thread_left", threading.active_count() == 1 and session._ctx.closed
                   and (bool(zmq_connected) or not os.path.isdir("/proc/self/task")) and not zmq_after,
                   {"zmq_threads_connected": zmq_connected, "zmq_threads_after_disable": zmq_after,
                    "os_threads": [baseline_threads, threads_connected, _os_threads()],
                    "python_threads": threading.active_count(), "context_closed": session._ctx.closed})
        del mod
    except Exception:
        checks.add("exception", False, traceback.format_exc())
    with open(args.report, "w") as f:
        json.dump(checks.results, f, indent=1, default=str)
    return 0 if all(r["ok"] for r in checks.results.values()) else 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # the same way out under bpy and blender -b (Blender would otherwise keep running or ignore it)
