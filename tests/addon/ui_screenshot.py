"""Drive the add-on in Blender's real UI (under Xvfb) and screenshot the panel during and after a job.

Not a pytest test (it needs a display): run by hand, e.g.

    xvfb-run -a -s "-screen 0 1600x1200x24" blender --factory-startup --enable-event-simulate START.blend \\
        --python tests/addon/ui_screenshot.py -- --zip dist/generate_3d-0.1.0-legacy.zip \\
        --endpoint tcp://127.0.0.1:PORT --key-file KEY --out DIR --tab-click 1308 947

Everything happens in ``bpy.app.timers`` callbacks, as in an artist's session: the
operators are invoked with a window/area context, the add-on's own timer drains the
engine, and the script only watches. First it presses Connect and Generate with no engine at
``--dead-endpoint`` and records how long each press and the longest gap between this
script's 0.1 s ticks took (the UI thread was blocked for that long), and the reports the
add-on gave. After the job it presses Ctrl-Z once and records whether the object went. Opening a saved .blend (e.g. the factory startup
saved with ``blender -b --factory-startup --python-expr "import bpy; bpy.ops.wm.save_as_mainfile(filepath='START.blend')"``)
keeps the splash screen away. Writes DIR/panel-running.png, DIR/panel-done.png
and DIR/ui-report.json, then quits (exit status 1 if the job did not finish).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import bpy

ADDON_ID = "generate_3d"


def _args() -> argparse.Namespace:
    argv = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else []
    p = argparse.ArgumentParser()
    p.add_argument("--zip", required=True)
    p.add_argument("--endpoint", required=True)
    p.add_argument("--key-file", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--prompt", default="a red cube")
    p.add_argument("--overrides", default="coarse_steps=60 tet_resolution=32 texture_size=128 preview_every=5")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--dead-endpoint", default="tcp://127.0.0.1:9")
    p.add_argument("--tab-click", type=int, nargs=2, metavar=("X", "Y"),
                   help="window coordinates of the sidebar's Generate tab (Blender 3.x; needs --enable-event-simulate)")
    return p.parse_args(argv)


ARGS = _args()
STATE = {"wall_t0": time.time(), "t0": time.monotonic(), "phase": "start", "report": {}, "last_tick": None, "gaps": []}


def _view3d():
    window = bpy.context.window_manager.windows[0]
    area = next(a for a in window.screen.areas if a.type == "VIEW_3D")
    region = next(r for r in area.regions if r.type == "WINDOW")
    return window, area, region


def _screenshot(name: str) -> None:
    window, area, _ = _view3d()
    path = os.path.join(ARGS.out, name)
    with bpy.context.temp_override(window=window, area=area):
        bpy.ops.screen.screenshot(filepath=path)
    STATE["report"][name] = os.path.exists(path)


def _finish(code: int) -> None:
    STATE["report"]["seconds"] = time.monotonic() - STATE["t0"]
    with open(os.path.join(ARGS.out, "ui-report.json"), "w") as f:
        json.dump(STATE["report"], f, indent=1, default=str)
    sys.stdout.flush()
    os._exit(code)


def _install() -> None:
    bpy.ops.preferences.addon_install(filepath=ARGS.zip, overwrite=True)
    bpy.ops.preferences.addon_enable(module=ADDON_ID)
    p = bpy.context.preferences.addons[ADDON_ID].preferences
    p.endpoint, p.key_file = ARGS.dead_endpoint, ARGS.key_file
    bpy.context.scene.generate3d.prompt = ARGS.prompt
    window, area, region = _view3d()
    presses = {}
    with bpy.context.temp_override(window=window, area=area, region=region):
        for name, op in (("connect", bpy.ops.generate3d.connect), ("generate", bpy.ops.generate3d.generate)):
            start = time.monotonic()
            op()
            presses[name] = round(time.monotonic() - start, 4)
    STATE["report"]["engine_down_press_s"] = presses
    STATE["down_t0"] = time.monotonic()


def _setup() -> None:
    p = bpy.context.preferences.addons[ADDON_ID].preferences
    p.endpoint, p.key_file = ARGS.endpoint, ARGS.key_file
    s = bpy.context.scene.generate3d
    s.prompt, s.overrides, s.seed = ARGS.prompt, ARGS.overrides, 3
    bpy.context.scene.cursor.location = (0.0, 0.0, 1.2)
    window, area, region = _view3d()
    area.spaces.active.show_region_ui = True
    ui = next(r for r in area.regions if r.type == "UI")
    if hasattr(ui, "active_panel_category"):  # Blender 4.x
        ui.active_panel_category = "Generate"
    elif ARGS.tab_click:  # Blender 3.x cannot pick a sidebar tab from Python: click it (--enable-event-simulate)
        x, y = ARGS.tab_click
        for etype, value in (("MOUSEMOVE", "NOTHING"), ("LEFTMOUSE", "PRESS"), ("LEFTMOUSE", "RELEASE")):
            window.event_simulate(etype, value, x=x, y=y)
    with bpy.context.temp_override(window=window, area=area, region=region):
        STATE["report"]["connect"] = sorted(bpy.ops.generate3d.connect())
        STATE["report"]["generate"] = sorted(bpy.ops.generate3d.generate())


def _timed_addon_timer():
    """The add-on's timer body, timed."""
    rt = sys.modules[f"{ADDON_ID}.runtime"]
    start = time.monotonic()
    delay = rt._timer()
    STATE.setdefault("addon_timer", []).append(time.monotonic() - start)
    return delay


def _tick():
    rt = sys.modules.get(f"{ADDON_ID}.runtime")
    try:
        now = time.monotonic()
        if STATE["last_tick"] is not None:
            STATE["gaps"].append(now - STATE["last_tick"])
        STATE["last_tick"] = now
        if STATE["phase"] == "start":
            _install()
            rt = sys.modules[f"{ADDON_ID}.runtime"]
            if bpy.app.timers.is_registered(rt._timer):  # time the add-on's own timer body while the engine is down
                bpy.app.timers.unregister(rt._timer)
                bpy.app.timers.register(_timed_addon_timer, first_interval=0.1)
            STATE["phase"] = "engine_down"
            STATE["last_tick"], STATE["gaps"] = time.monotonic(), []
            return 0.1
        if STATE["phase"] == "engine_down":
            session = rt.runtime.session
            if session is not None and session.pending or time.monotonic() - STATE["down_t0"] < 1.5:
                return 0.1
            STATE["report"]["engine_down_status"] = rt.runtime.status
            STATE["report"]["engine_down_addon_timer_s"] = [round(t, 4) for t in STATE.get("addon_timer", [])]
            # gaps between this script's 0.1 s ticks: Blender's own redraws (software GL under Xvfb) included
            STATE["report"]["engine_down_tick_gaps_s"] = [round(g, 3) for g in STATE["gaps"]]
            if bpy.app.timers.is_registered(_timed_addon_timer):
                bpy.app.timers.unregister(_timed_addon_timer)
            _setup()
            STATE["phase"] = "running"
            return 0.5
        session = rt.runtime.session
        jobs = [j for j in session.jobs.values() if j.submitted_at >= STATE["wall_t0"]] if session else []
        job = jobs[-1] if jobs else None
        if STATE["phase"] == "running" and job is not None and job.total and job.step >= 10:
            STATE["report"]["status_while_running"] = rt.runtime.status
            STATE["report"]["timer_registered"] = bpy.app.timers.is_registered(rt._timer)
            STATE["report"]["preview_object"] = any(n.endswith("(preview)") for n in bpy.data.objects.keys())
            _screenshot("panel-running.png")
            STATE["phase"] = "waiting"
        if job is not None and job.terminal and (job.imported or job.state != "done"):
            STATE["report"]["job"] = {"state": job.state, "imported": job.imported, "message": job.message}
            if job.imported:
                obj = bpy.data.objects[job.imported]
                STATE["report"]["object"] = {"faces": len(obj.data.polygons), "material": obj.data.materials[0].name}
            _screenshot("panel-done.png")
            if job.imported:  # one Ctrl-Z takes the new object away
                window, area, region = _view3d()
                with bpy.context.temp_override(window=window, area=area, region=region):
                    bpy.ops.ed.undo()
                STATE["report"]["one_undo_removes_object"] = job.imported not in bpy.data.objects
            _finish(0 if job.imported else 1)
        if time.monotonic() - STATE["t0"] > ARGS.timeout:
            STATE["report"]["error"] = "timed out"
            _finish(1)
    except Exception as exc:  # report and quit: a script that hangs a UI session helps no one
        import traceback

        STATE["report"]["exception"] = traceback.format_exc()
        print(exc, file=sys.stderr)
        _finish(1)
    return 0.25


os.makedirs(ARGS.out, exist_ok=True)
bpy.app.timers.register(_tick, first_interval=1.0)
