"""The add-on's runtime: the session, the UI timer that drains the engine's inbox, and the import of results.

Only Blender's main thread runs anything here. In the UI, one ``bpy.app.timers``
function (:func:`_timer`) calls :func:`drain` and returns its next delay (short while
a job runs, long when idle, backing off while the engine is unreachable). In
background mode (``blender -b``, the ``bpy`` module) timers never fire, so the
operators call :func:`wait_for`, which drains in a loop until their job ends or the
background job timeout passes: scripts and tests get the finished object when the
operator returns. The operator classes (operators.py) and the panel read and drive
this module; it imports neither.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import bpy

from . import importer
from .session import JobView, Session, SessionError

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


def ensure_session(context, connect: bool = True) -> Session:
    """The open session, creating and connecting one from the preferences (and starting a local engine if allowed)."""
    if runtime.session is not None:
        return runtime.session
    p = prefs(context)
    endpoint = p.endpoint.strip()
    online = bool(getattr(bpy.app, "online_access", True))
    key_file = bpy.path.abspath(p.key_file) if p.key_file.strip() else None
    session = Session(endpoint, key_file, timeout=p.timeout_s, state_dir=state_dir(), allow_online=online)
    if connect:
        try:
            try:
                session.connect()
            except SessionError:
                if not (p.auto_start and session.protocol.is_loopback(endpoint)):
                    raise
                session.start_engine(p.engine_command, wait_s=max(10.0, 6 * p.timeout_s))
        except SessionError:
            session.close()
            raise
    runtime.session = session
    runtime.status = f"connected to {session.welcome.get('server', 'engine')} ({session.welcome.get('device', '?')})" \
        if session.welcome else ""
    return session


def close_session() -> None:
    """Close the connection (and any engine it started); safe to call twice."""
    session, runtime.session = runtime.session, None
    if session is not None:
        session.close()


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
                                           job.placement, rest=job.kind != "refine")
        elif event.type == "done":
            try:
                obj = import_job(context, session, job)
                runtime.reports.append(("INFO", f"Generate 3D: created '{obj.name}'"))
            except (SessionError, ValueError) as exc:
                job.message = f"import failed: {exc}"
                runtime.reports.append(("ERROR", f"Generate 3D: {job.name}: {job.message}"))
        elif event.type == "failed":
            importer.remove_object(_preview_name(job))
            runtime.reports.append(("ERROR", f"Generate 3D: '{job.name}' failed: {job.message}"))
        elif event.type == "cancelled":
            importer.remove_object(_preview_name(job))
            runtime.reports.append(("WARNING", f"Generate 3D: '{job.name}' cancelled"))
    active = session.active()
    if active:
        job = active[-1]
        runtime.status = f"{job.name}: {job.stage or job.state} {job.step}/{job.total}" if job.total else \
            f"{job.name}: {job.stage or job.state}"
    elif session.connected:
        runtime.status = "engine idle"
    else:
        runtime.status = f"engine at {session.endpoint} not answering"
    return BUSY_DELAY_S if active else IDLE_DELAY_S


def _preview_name(job: JobView) -> str:
    return f"{job.name} (preview)"


def import_job(context, session: Session, job: JobView) -> bpy.types.Object:
    """Fetch a done job's result (arrays + texture PNG, no GLB) and make it a new object: Principled BSDF,
    packed texture, named as the engine named the GLB's node, at the job's placement (or the one the
    engine kept, for a job this Blender did not submit)."""
    fetched = session.result(job.job_id)
    arrays = fetched.arrays
    if "vertices" not in arrays or "faces" not in arrays:
        raise SessionError(f"the result of {job.job_id} holds no mesh")
    uvs = arrays["uvs"].numpy() if "uvs" in arrays else None
    name = fetched.meta.get("name") or job.name  # jobs from engines that did not name their result
    placement = job.placement or fetched.meta.get("placement")
    importer.remove_object(_preview_name(job))
    # A new object rests on its placement (the 3D cursor); a refined one keeps the original's frame, beside it.
    obj = importer.create_object(name, arrays["vertices"].numpy(), arrays["faces"].numpy(), uvs, fetched.texture,
                                 placement, rest=(fetched.meta.get("kind") or job.kind) != "refine", context=context)
    job.imported = obj.name
    session._save_jobs()
    if not bpy.app.background:
        try:
            bpy.ops.ed.undo_push(message=f"Generate 3D: {obj.name}")
        except RuntimeError as exc:  # no undo stack in this context
            logger.debug("undo push skipped: %s", exc)
    return obj


def wait_for(context, job: JobView, timeout_s: float) -> JobView:
    """Background mode: drain until ``job`` ends and its result is imported, or cancel it after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    session = runtime.session
    while not job.terminal:
        left = deadline - time.monotonic()
        if left <= 0:
            try:
                session.cancel(job.job_id)
            except SessionError as exc:
                logger.warning("%s", exc)
            importer.remove_object(_preview_name(job))
            raise SessionError(f"'{job.name}' did not finish within {timeout_s:g} s (job {job.job_id} cancelled)")
        drain(context, timeout=min(0.5, left))
    return job


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


def close_at_exit() -> None:
    """Blender quits without unregistering add-ons: close the socket and the ZeroMQ context anyway (no bpy calls)."""
    close_session()


def shutdown() -> None:
    """Stop the timer and close the connection (called from unregister)."""
    stop_timer()
    close_session()
    runtime.reports.clear()
    runtime.status = ""

