"""The add-on's runtime: the session, the UI timer that drains the engine's inbox, and the import of results.

Only Blender's main thread runs anything here. In the UI, the requests a click starts
(connect, submit, cancel, list jobs) run on the session's helper threads
(:meth:`Session.start`, no bpy there) and the operators return at once; one
``bpy.app.timers`` function (:func:`_timer`) calls :func:`drain`, which takes their
outcomes and the engine's events, and returns its next delay (short while something
runs, long when idle, backing off after failures). The status line follows the
engine's heartbeat ("engine lost" a few seconds after it stops answering). In
background mode (``blender -b``, the ``bpy`` module; ``runtime.wait``) timers never
fire, so the operators connect and submit directly and call :func:`wait_for`, which
drains in a loop, printing progress lines, until their job ends, the background job
timeout passes or Ctrl-C cancels it: scripts and tests get the finished object when
the operator returns. The operator classes (operators.py) and the panel read and drive
this module; it imports neither.
"""
from __future__ import annotations

import logging
import math
import signal
import time
from pathlib import Path
from dataclasses import dataclass, field

import bpy
from mathutils import Matrix, Vector

from . import importer, scene_io
from .session import START_HINT, JobView, Pending, Session, SessionError, client_modules

logger = logging.getLogger(__name__)

ADDON_PACKAGE = __package__
"""The add-on's module name as Blender knows it (``bl_ext.<repo>.generate_3d`` for an extension)."""

IDLE_DELAY_S = 1.0
"""Timer delay while no job runs."""
BUSY_DELAY_S = 0.1
"""Timer delay while a job runs."""
MAX_BACKOFF_S = 8.0
"""Longest timer delay while the engine is unreachable."""


@dataclass
class Runtime:
    """Module state of the add-on (never saved in the .blend)."""

    session: Session | None = None
    """The open connection, if any."""
    reports: list[tuple[str, str]] = field(default_factory=list)
    """(level, message) waiting to be shown to the artist."""
    status: str = ""
    """One line for the panel and the status bar."""
    backoff_s: float = IDLE_DELAY_S
    """Current timer delay after failures."""
    wait: bool = field(default_factory=lambda: bool(bpy.app.background))
    """Operators connect, submit and wait for their job on the spot (background mode, where timers never fire);
    else they hand requests to helper threads and return at once."""
    lost_reported: bool = False
    """The artist was told that the engine stopped answering (told again after it answers once more)."""


runtime = Runtime()


def prefs(context=None):
    """This add-on's preferences (``props.Generate3DPreferences``)."""
    context = context or bpy.context
    return context.preferences.addons[ADDON_PACKAGE].preferences


def state_dir() -> str:
    """The add-on's own folder for its job list (never inside the add-on's install folder)."""
    try:
        return bpy.utils.extension_path_user(ADDON_PACKAGE, path="", create=True)
    except (AttributeError, ValueError):  # Blender before 4.2, or installed as a legacy add-on
        return bpy.utils.user_resource("CONFIG", path="generate_3d", create=True)


def _auto_start(context) -> str:
    """The engine command to start when none answers, or "" when the preferences do not allow it."""
    p = prefs(context)
    return p.engine_command if p.auto_start else ""


def session_for(context) -> Session:
    """The open session, or a new one made from the preferences (no request sent: nothing waits on the engine)."""
    if runtime.session is not None:
        return runtime.session
    p = prefs(context)
    online = bool(getattr(bpy.app, "online_access", True))
    key_file = bpy.path.abspath(p.key_file) if p.key_file.strip() else None
    runtime.session = Session(p.endpoint.strip(), key_file, timeout=p.timeout_s, state_dir=state_dir(),
                              allow_online=online)
    runtime.lost_reported = False
    return runtime.session


def ensure_session(context) -> Session:
    """The open session, connected (starting a local engine if allowed); blocks up to the request timeout, so only
    background mode and scripts call it."""
    session = session_for(context)
    if session.welcome is None:
        try:
            session.connect(_auto_start(context))
        except SessionError:
            close_session()
            raise
        runtime.status = _connected_status(session)
    return session


def connect_later(context) -> Pending:
    """Connect on a helper thread (starting a local engine if allowed); :func:`drain` reports how it went."""
    close_session()
    session = session_for(context)
    pending = session.connect_later(_auto_start(context))
    runtime.status = _pending_line(session, pending)
    ensure_timer()
    return pending


def submit(context, kind: str, **fields) -> JobView | Pending:
    """Submit a job: at once when ``runtime.wait`` (returns the JobView, raises SessionError), else on a helper
    thread (returns the Pending; :func:`drain` adds the job or reports why the engine did not take it).

    An image job without a rig whose reference (the panel's image) a scene camera rendered takes that camera
    along as its rig (:func:`reference_camera`): the engine then need not guess it."""
    image = getattr(context.scene.generate3d, "image", None)
    if kind == "image" and not fields.get("rig") and image is not None:
        found = reference_camera(context.scene, image, fields.get("placement"))
        if found is not None:
            fields["rig"], fields["reference_camera"] = [found[0]], found[1]
    if runtime.wait:
        return ensure_session(context).submit(kind, **fields)
    session = session_for(context)
    pending = session.submit_later(kind, auto_start=_auto_start(context), **fields)
    runtime.status = _pending_line(session, pending)
    ensure_timer()
    return pending


def source_camera(scene: bpy.types.Scene, image: bpy.types.Image) -> bpy.types.Object | None:
    """The camera that rendered ``image``: the scene camera for the Render Result, the camera whose background
    image it is; None for any other image."""
    if image.type == "RENDER_RESULT":
        return scene.camera
    for obj in scene.objects:
        if obj.type == "CAMERA" and any(bg.image == image for bg in obj.data.background_images):
            return obj
    return None


def seen_bounds(scene: bpy.types.Scene, camera: bpy.types.Object) -> tuple[Vector, Vector] | None:
    """World bounding box (lowest, highest corner) of the visible meshes whose centre is in ``camera``'s frame."""
    from bpy_extras.object_utils import world_to_camera_view

    corners = []
    for obj in scene.objects:
        if obj.type != "MESH" or obj.hide_render or not obj.visible_get():
            continue
        box = [obj.matrix_world @ Vector(c) for c in obj.bound_box]
        x, y, z = world_to_camera_view(scene, camera, sum(box, Vector()) / len(box))
        if z > 0 and 0 <= x <= 1 and 0 <= y <= 1:
            corners += box
    if not corners:
        return None
    return (Vector([min(c[i] for c in corners) for i in range(3)]),
            Vector([max(c[i] for c in corners) for i in range(3)]))


def reference_camera(scene: bpy.types.Scene, image: bpy.types.Image,
                     placement: list[list[float]] | None) -> tuple[dict, dict] | None:
    """The rig entry of the camera that rendered ``image`` (:func:`source_camera`) and what the panel says of it
    (:attr:`JobView.reference_camera`); None when no perspective camera rendered it or it shows no mesh.

    The engine makes the object in a unit box at the placement: the camera is taken relative to what it shows
    (:func:`seen_bounds`), scaled by that box's largest side (Blender's default camera, 11 m from a 2 m cube,
    becomes 5.6 units from a unit one), its view direction and FOV kept, then put at the placement.
    """
    camera = source_camera(scene, image)
    rig = scene_io.camera_rig([camera], scene) if camera is not None else []
    bounds = seen_bounds(scene, camera) if rig else None
    if bounds is None:
        return None
    lo, hi = bounds
    centre, size = (lo + hi) / 2, max(max(hi - lo), 1e-6)
    rotation, location = camera.matrix_world.to_3x3().normalized(), camera.matrix_world.translation
    unit = Matrix.Translation((location - centre) / size) @ rotation.to_4x4()
    if placement is not None:
        unit = Matrix(placement) @ unit
    (entry,) = rig
    entry["matrix_world"] = scene_io.matrix_rows(unit)
    offset = location - centre
    elevation = math.degrees(math.atan2(offset.z, math.hypot(offset.x, offset.y)))
    return entry, {"source": "rig", "camera": camera.name, "elevation_deg": round(elevation, 2)}


def _connected_status(session: Session) -> str:
    welcome = session.welcome or {}
    return f"connected to {welcome.get('server', 'engine')} ({welcome.get('device', '?')})"


def close_session(wait: bool = True) -> None:
    """Close the connection (and any engine it started); safe to call twice. ``wait=False`` (the UI's Disconnect)
    returns at once and lets a thread wait for a helper's request still in flight."""
    session, runtime.session = runtime.session, None
    if session is not None:
        if wait:
            session.close()
        else:
            session.close_later()


def ensure_timer() -> None:
    """Start the UI timer that drains the inbox (no-op in background mode, where timers never fire)."""
    if not bpy.app.background and not bpy.app.timers.is_registered(_timer):
        bpy.app.timers.register(_timer, first_interval=BUSY_DELAY_S, persistent=True)


def stop_timer() -> None:
    """Stop the UI timer."""
    if bpy.app.timers.is_registered(_timer):
        bpy.app.timers.unregister(_timer)


def _timer() -> float | None:
    """The UI timer's body: drain, report, redraw; returns the next delay (None stops it)."""
    if runtime.session is None:
        return None
    try:
        delay = drain(bpy.context)
        runtime.backoff_s = IDLE_DELAY_S
    except Exception as exc:  # the timer must survive anything: show it and back off
        logger.exception("draining the engine inbox failed")
        runtime.reports.append(("ERROR", f"Generate 3D: {exc}"))
        runtime.backoff_s = min(runtime.backoff_s * 2, MAX_BACKOFF_S)
        delay = runtime.backoff_s
    _flush_reports_ui()
    _redraw()
    return delay


def drain(context, timeout: float = 0.0) -> float:
    """Take the engine's events and apply them to the scene; returns the delay until the next call.

    Waits at most ``timeout`` seconds for the first event. Previews go to the preview
    image, intermediate meshes to one preview object per job, and a job's end imports
    its result (done) or queues a report (failed, cancelled). Callable directly: the
    background path and tests do, since timers never fire there.
    """
    session = runtime.session
    if session is None:
        return IDLE_DELAY_S
    for pending in session.finished():
        _take(context, session, pending)
    for event in session.drain(timeout):
        job = session.jobs.get(event.job_id)
        if job is None:
            continue
        if event.type == "preview":
            importer.show_preview(bytes(event["image"].data))
        elif event.type == "mesh":
            uvs = event.get("uvs")
            importer.update_preview_object(_preview_name(job), event["vertices"].numpy(), event["faces"].numpy(),
                                           uvs.numpy() if uvs is not None and uvs.dtype == "float32" else None,
                                           job.placement, rest=job.rests())
        elif event.type == "done":
            if runtime.wait:
                _import(context, session, job)
            else:  # fetched on a helper thread; :func:`_take` imports it
                session.result_later(job.job_id)
        elif event.type == "failed":
            importer.remove_object(_preview_name(job))
            runtime.reports.append(("ERROR", f"Generate 3D: '{job.name}' failed: {job.message}"))
        elif event.type == "cancelled":
            importer.remove_object(_preview_name(job))
            runtime.reports.append(("WARNING", f"Generate 3D: '{job.name}' cancelled"))
    active = session.active()
    runtime.status = _status(session, active)
    if session.lost and not runtime.lost_reported:
        runtime.lost_reported = True
        runtime.reports.append(("ERROR", f"Generate 3D: the engine at {session.endpoint} stopped answering; "
                                         f"jobs continue there if it still runs, else {START_HINT}"))
    elif session.connected:
        runtime.lost_reported = False
    return BUSY_DELAY_S if active or session.pending else IDLE_DELAY_S


def _import(context, session: Session, job: JobView, fetched=None) -> None:
    """Import a done job's result, reporting the new object or why it could not be made."""
    try:
        obj = import_job(context, session, job, fetched)
        runtime.reports.append(("INFO", f"Generate 3D: created '{obj.name}'"))
    except (SessionError, ValueError) as exc:
        job.message = f"import failed: {exc}"
        runtime.reports.append(("ERROR", f"Generate 3D: {job.name}: {job.message}"))


def _take(context, session: Session, pending: Pending) -> None:
    """Apply the outcome of a request that ran on a helper thread (main thread)."""
    if pending.what == "result" and not pending.error:
        job_id, fetched = pending.outcome
        job = session.jobs.get(job_id)
        if job is None:
            job = session.add_job(JobView(job_id, kind=str(fetched.meta.get("kind") or "text"), state="done"))
        _import(context, session, job, fetched)
    elif pending.error:
        what = f"'{pending.job_name}' was not submitted" if pending.what == "submit" else f"{pending.what} failed"
        message = pending.error if pending.error.startswith(pending.what) else f"{what}: {pending.error}"
        runtime.reports.append(("ERROR", f"Generate 3D: {message}"))
    elif pending.what == "submit":
        job = session.add_job(pending.outcome)
        runtime.reports.append(("INFO", f"Generate 3D: '{job.name}' queued"))
    elif pending.what == "connect":
        welcome = pending.outcome or {}
        runtime.reports.append(("INFO", f"Generate 3D: connected to {welcome.get('server', session.endpoint)} "
                                        f"on {welcome.get('device', '?')}"))
    elif pending.what == "jobs":
        session.apply_listing(pending.outcome)
    elif pending.what == "cancel":
        job_id, state = pending.outcome
        runtime.reports.append(("INFO", f"Generate 3D: cancel requested ({state})"))


def _pending_line(session: Session, pending: Pending) -> str:
    return {"connect": f"connecting to {session.endpoint}...", "submit": f"sending '{pending.job_name}' to the engine...",
            "result": "fetching a result...", "jobs": "listing the engine's jobs...",
            "cancel": "asking the engine to cancel..."}.get(pending.what, f"{pending.what}...")


def _status(session: Session, active: list[JobView]) -> str:
    """The panel's and status bar's line: what runs, or how the engine is."""
    if session.pending:
        return _pending_line(session, session.pending[0])
    if session.lost:
        return f"engine lost: no heartbeat from {session.endpoint}"
    if active:
        job = active[-1]
        step = f" {job.step}/{job.total}" if job.total else ""
        return f"{job.name}: {job.stage or job.state}{step} ({100 * job.overall:.0f} % of the job)"
    if session.connected:
        return "engine idle"
    return f"not connected to {session.endpoint}"


def _preview_name(job: JobView) -> str:
    return f"{job.name} (preview)"


def import_job(context, session: Session, job: JobView, fetched=None) -> bpy.types.Object:
    """Make a done job's result (arrays + texture PNGs; fetched now unless given) a new object: Principled
    BSDF with the packed base colour and normal map and the engine's roughness / metallic, named as the engine named
    the GLB's node, at the job's placement (or the one the
    engine kept, for a job this Blender did not submit)."""
    fetched = fetched if fetched is not None else session.result(job.job_id)
    arrays = fetched.arrays
    if "vertices" not in arrays or "faces" not in arrays:
        raise SessionError(f"the result of {job.job_id} holds no mesh")
    uvs = arrays["uvs"].numpy() if "uvs" in arrays else None
    name = fetched.meta.get("name") or job.name  # jobs from engines that did not name their result
    placement = job.placement or fetched.meta.get("placement")
    importer.remove_object(_preview_name(job))
    # A new object rests on its placement (the 3D cursor), a rig job's is centred there; a refined one sits beside the original.
    obj = importer.create_object(name, arrays["vertices"].numpy(), arrays["faces"].numpy(), uvs, fetched.texture,
                                 placement, rest=job.rests(fetched.meta), context=context,
                                 normal_png=fetched.normal_texture,
                                 factors=fetched.meta.get("material"))
    job.imported = obj.name
    used = fetched.meta.get("reference_camera")
    if used:  # what the engine used; the scene camera's name, when it was the one sent, kept for the panel
        sent = job.reference_camera or {}
        job.reference_camera = {**used, **({"camera": sent["camera"]} if used.get("source") == "rig"
                                           and sent.get("camera") else {})}
    if job.export_dir:
        _save_files(job, fetched, obj.name)
    session._save_jobs()
    if not bpy.app.background:
        try:
            bpy.ops.ed.undo_push(message=f"Generate 3D: {obj.name}")
        except RuntimeError as exc:  # no undo stack in this context
            logger.debug("undo push skipped: %s", exc)
    return obj


def _save_files(job: JobView, fetched, name: str) -> None:
    """Write the result's export files (or its GLB, when that is the format) into ``<export_dir>/<name>/``; a folder
    that cannot be written is reported, the object stays."""
    files = fetched.files or ({"model.glb": fetched.glb} if fetched.glb else {})
    folder = Path(job.export_dir) / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for file_name, data in files.items():
            (folder / Path(file_name).name).write_bytes(data)  # names from the engine, never a path
    except OSError as exc:
        runtime.reports.append(("ERROR", f"Generate 3D: could not save '{name}' files to {folder}: {exc}"))
        return
    job.message = f"saved {len(files)} file(s) to {folder}"
    runtime.reports.append(("INFO", f"Generate 3D: {job.message}"))


def wait_for(context, job: JobView, timeout_s: float) -> JobView:
    """Background mode: drain until ``job`` ends and its result is imported, printing a line whenever its stage or
    whole percent changes; after ``timeout_s``, or on Ctrl-C, cancel it on the engine and raise SessionError."""
    deadline = time.monotonic() + timeout_s
    session = runtime.session
    interrupted: list[int] = []
    previous = _catch_sigint(interrupted)
    shown = None
    try:
        while not job.terminal:
            left = deadline - time.monotonic()
            if left <= 0 or interrupted:
                _cancel_waited(session, job)
                why = "interrupted (Ctrl-C)" if interrupted else f"did not finish within {timeout_s:g} s"
                raise SessionError(f"'{job.name}' {why} (job {job.job_id} cancelled)")
            drain(context, timeout=min(0.5, left))
            line = (job.stage or job.state, int(100 * job.overall))
            if line != shown and not job.terminal:
                shown = line
                step = f" {job.step}/{job.total}" if job.total else ""
                print(f"Generate 3D: {job.name}: {line[0]}{step}, {line[1]} % of the job", flush=True)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    print(f"Generate 3D: {job.name}: {job.state}" + (f" ({job.message})" if job.state == "failed" else ""), flush=True)
    return job


def _catch_sigint(flag: list[int]):
    """Make Ctrl-C set ``flag`` instead of ending Blender; returns the handler to put back (None: not on the main
    thread, nothing changed)."""
    try:
        previous = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, lambda signum, frame: flag.append(signum))
    except ValueError:  # not the main thread
        return None
    return previous if previous is not None else signal.SIG_DFL


def _cancel_waited(session: Session, job: JobView) -> None:
    try:
        session.cancel(job.job_id)
    except SessionError as exc:
        logger.warning("%s", exc)
    importer.remove_object(_preview_name(job))


def _flush_reports_ui() -> None:
    while runtime.reports:
        level, message = runtime.reports.pop(0)
        try:
            bpy.ops.generate3d.notify(level=level, message=message)
        except RuntimeError:
            logger.warning("%s", message)


def flush_reports(op: bpy.types.Operator) -> bool:
    """Hand queued reports to ``op``; True when one was an error."""
    error = False
    while runtime.reports:
        level, message = runtime.reports.pop(0)
        op.report({level}, message)
        error |= level == "ERROR"
    return error


def _redraw() -> None:
    wm = bpy.context.window_manager
    if wm is None:
        return
    for window in wm.windows:
        for area in window.screen.areas:
            if area.type in ("VIEW_3D", "STATUSBAR"):
                area.tag_redraw()


def preload() -> None:
    """Import the engine client now (about 0.1 s, once), so that the artist's first click does not pay for it;
    a missing pyzmq is reported on that click instead."""
    try:
        client_modules()
    except SessionError as exc:
        logger.info("engine client not loaded: %s", exc)


def close_at_exit() -> None:
    """Blender quits without unregistering add-ons: close the socket and the ZeroMQ context anyway (no bpy calls)."""
    close_session()


def shutdown() -> None:
    """Stop the timer and close the connection (called from unregister)."""
    stop_timer()
    close_session()
    runtime.reports.clear()
    runtime.status = ""

