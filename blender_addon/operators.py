"""Operators (Connect, Generate, Refine Selected, Cancel, Refresh, Import Result) and the inbox drain.

Only Blender's main thread runs anything here. In the UI, one ``bpy.app.timers``
function (:func:`_timer`) calls :func:`drain` and returns its next delay (short while
a job runs, long when idle, backing off while the engine is unreachable). In
background mode (``blender -b``, the ``bpy`` module) timers never fire, so the
operators call :func:`drain` themselves in a loop until their job ends or the
background job timeout passes: scripts and tests get the finished object when the
operator returns.
"""
from __future__ import annotations

import array
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field

import bpy
from bpy.props import EnumProperty, StringProperty

from . import importer, scene_io
from .glb import GLBError, read_glb
from .props import ADDON_PACKAGE, prefs
from .session import JobView, Session, SessionError, is_loopback, object_name

logger = logging.getLogger(__name__)

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
                if not (p.auto_start and is_loopback(endpoint)):
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
        elif event.type == "mesh" and not event.get("final"):
            uvs = event.get("uvs")
            importer.update_preview_object(_preview_name(job), event["vertices"].numpy(), event["faces"].numpy(),
                                           uvs.numpy() if uvs is not None and uvs.dtype == "float32" else None,
                                           job.placement)
        elif event.type == "done":
            try:
                obj = import_job(context, session, job)
                runtime.reports.append(("INFO", f"Generate 3D: created '{obj.name}'"))
            except (SessionError, GLBError, ValueError) as exc:
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
    """Fetch a done job's result and make it a new object (Principled BSDF, packed texture, named from the prompt)."""
    fetched = session.result(job.job_id)
    arrays = fetched.arrays
    glb = read_glb(fetched.glb) if fetched.glb else None
    if "vertices" in arrays and "faces" in arrays:
        vertices, faces = arrays["vertices"].numpy(), arrays["faces"].numpy()
        uvs = arrays["uvs"].numpy() if "uvs" in arrays else None
        if uvs is None and glb is not None and glb.uvs is not None and len(glb.uvs) == len(vertices):
            uvs = glb.uvs
    elif glb is not None:
        vertices, faces, uvs = glb.vertices, glb.faces, glb.uvs
    else:
        raise SessionError(f"the result of {job.job_id} holds no mesh")
    texture = glb.texture_png if glb is not None else None
    importer.remove_object(_preview_name(job))
    obj = importer.create_object(job.name, vertices, faces, uvs, texture, job.placement)
    job.imported = obj.name
    session._save_jobs()
    view_layer = getattr(context, "view_layer", None)
    if view_layer is not None and obj.name in view_layer.objects:
        for other in view_layer.objects:
            other.select_set(False)
        obj.select_set(True)
        view_layer.objects.active = obj
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


def _flush_reports(op: bpy.types.Operator) -> bool:
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


def _parse_overrides(text: str) -> dict:
    out: dict = {}
    for item in text.replace(",", " ").split():
        if "=" not in item:
            raise SessionError(f"override '{item}' is not name=value")
        key, value = item.split("=", 1)
        lowered = value.lower()
        if lowered in ("true", "false"):
            out[key] = lowered == "true"
            continue
        for cast in (int, float):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[key] = value
    return out


def _image_png(image: bpy.types.Image) -> bytes:
    """A Blender image as PNG bytes (saved through a temporary copy; the image itself is untouched)."""
    fd, path = tempfile.mkstemp(suffix=".png", prefix="generate3d-ref-")
    os.close(fd)
    copy = image.copy()
    try:
        # A copy of a generated or painted image may come back from its source, not from what is in
        # memory: carry the current pixels over explicitly.
        pixels = array.array("f", bytes(4 * len(image.pixels)))
        image.pixels.foreach_get(pixels)
        copy.pixels.foreach_set(pixels)
        copy.filepath_raw = path
        copy.file_format = "PNG"
        copy.save()
        with open(path, "rb") as f:
            return f.read()
    finally:
        bpy.data.images.remove(copy)
        os.remove(path)


class _JobOperator:
    """Shared submit-then-wait (background) or submit-then-return (UI) logic."""

    def _run(self, context, kind: str, **fields) -> set[str]:
        try:
            session = ensure_session(context)
            job = session.submit(kind, **fields)
        except SessionError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        if not bpy.app.background:
            ensure_timer()
            self.report({"INFO"}, f"Generate 3D: '{job.name}' queued")
            return {"FINISHED"}
        try:
            wait_for(context, job, prefs(context).job_timeout_s)
        except SessionError as exc:
            runtime.reports.append(("ERROR", str(exc)))
        failed = _flush_reports(self)
        return {"CANCELLED"} if failed or job.imported is None else {"FINISHED"}

    def _common(self, context, steps_option: str = "coarse_steps") -> dict:
        """Fields every job shares; the steps override sets the job's main optimisation (``steps_option``)."""
        s = context.scene.generate3d
        options = _parse_overrides(s.overrides)
        if s.steps:
            options[steps_option] = s.steps
        return {"negative_prompt": s.negative_prompt or None, "seed": s.seed or None, "preset": s.preset,
                "options": options or None}


class GENERATE3D_OT_connect(bpy.types.Operator):
    """Connect to the engine (starting a local one when the preferences allow it)"""

    bl_idname = "generate3d.connect"
    bl_label = "Connect / Start Engine"

    def execute(self, context):
        close_session()
        try:
            session = ensure_session(context)
        except SessionError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        ensure_timer()
        welcome = session.welcome or {}
        self.report({"INFO"}, f"Generate 3D: connected to {welcome.get('server', session.endpoint)} "
                              f"on {welcome.get('device', '?')}")
        return {"FINISHED"}


class GENERATE3D_OT_disconnect(bpy.types.Operator):
    """Close the connection to the engine (jobs keep running there)"""

    bl_idname = "generate3d.disconnect"
    bl_label = "Disconnect"

    @classmethod
    def poll(cls, context):
        return runtime.session is not None

    def execute(self, context):
        stop_timer()
        close_session()
        runtime.status = ""
        return {"FINISHED"}


class GENERATE3D_OT_generate(_JobOperator, bpy.types.Operator):
    """Make a textured object from the prompt (or the reference image) with the engine"""

    bl_idname = "generate3d.generate"
    bl_label = "Generate"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context):
        s = getattr(context.scene, "generate3d", None)
        return s is not None and (bool(s.prompt.strip()) or s.image is not None)

    def execute(self, context):
        s = context.scene.generate3d
        try:
            fields = self._common(context)
            if s.image is not None:
                fields["image"] = _image_png(s.image)
        except (SessionError, RuntimeError) as exc:
            self.report({"ERROR"}, f"Generate 3D: {exc}")
            return {"CANCELLED"}
        if s.use_rig:
            rig = scene_io.camera_rig(context.selected_objects, context.scene)
            if not rig:
                self.report({"ERROR"}, "Generate 3D: 'Selected Cameras as Rig' is on but no perspective camera is selected")
                return {"CANCELLED"}
            fields["rig"] = rig
        placement = scene_io.matrix_rows(context.scene.cursor.matrix) if s.at_cursor else None
        name = object_name(s.prompt, fallback=s.image.name if s.image is not None else "Generated")
        return self._run(context, "image" if s.image is not None else "text", prompt=s.prompt, name=name,
                         placement=placement, **fields)


class GENERATE3D_OT_refine(_JobOperator, bpy.types.Operator):
    """Send the active mesh (modifiers applied) to the engine; the result arrives as a new object beside it"""

    bl_idname = "generate3d.refine_selected"
    bl_label = "Refine Selected"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context):
        obj = context.active_object
        s = getattr(context.scene, "generate3d", None)
        return obj is not None and obj.type == "MESH" and s is not None and (bool(s.prompt.strip()) or s.image is not None)

    def execute(self, context):
        s = context.scene.generate3d
        obj = context.active_object
        vertices, faces = scene_io.evaluated_triangles(obj, context.evaluated_depsgraph_get())
        if len(faces) == 0:
            self.report({"ERROR"}, f"Generate 3D: '{obj.name}' has no faces to refine")
            return {"CANCELLED"}
        try:
            fields = self._common(context, steps_option="refine_steps")
            if s.image is not None:
                fields["image"] = _image_png(s.image)
        except (SessionError, RuntimeError) as exc:
            self.report({"ERROR"}, f"Generate 3D: {exc}")
            return {"CANCELLED"}
        mesh = {"vertices": vertices, "faces": faces, "matrix_world": scene_io.matrix_rows(obj.matrix_world)}
        return self._run(context, "refine", prompt=s.prompt, mesh=mesh, mode=s.refine_mode,
                         name=f"{obj.name} refined", placement=[x for row in scene_io.beside(obj) for x in row],
                         source=obj.name, **fields)


class GENERATE3D_OT_cancel(bpy.types.Operator):
    """Cancel a running job (the newest one unless a job id is given)"""

    bl_idname = "generate3d.cancel"
    bl_label = "Cancel"

    job_id: StringProperty(name="Job", default="")

    @classmethod
    def poll(cls, context):
        return runtime.session is not None and bool(runtime.session.active())

    def execute(self, context):
        session = runtime.session
        job_id = self.job_id or session.active()[-1].job_id
        try:
            state = session.cancel(job_id)
        except SessionError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        self.report({"INFO"}, f"Generate 3D: cancel requested ({state})")
        return {"FINISHED"}


class GENERATE3D_OT_refresh_jobs(bpy.types.Operator):
    """List the engine's jobs, including those that ended while Blender was closed"""

    bl_idname = "generate3d.refresh_jobs"
    bl_label = "Refresh Jobs"

    def execute(self, context):
        try:
            ensure_session(context).refresh()
        except SessionError as exc:
            self.report({"ERROR"}, str(exc))
            return {"CANCELLED"}
        ensure_timer()
        return {"FINISHED"}


class GENERATE3D_OT_import_result(bpy.types.Operator):
    """Import a finished job's result as a new object"""

    bl_idname = "generate3d.import_result"
    bl_label = "Import Result"
    bl_options = {"REGISTER", "UNDO"}

    job_id: StringProperty(name="Job", default="")

    def execute(self, context):
        try:
            session = ensure_session(context)
            job = session.jobs.get(self.job_id) or JobView(self.job_id, name="Generated")
            session.jobs.setdefault(job.job_id, job)
            obj = import_job(context, session, job)
        except (SessionError, GLBError, ValueError) as exc:
            self.report({"ERROR"}, f"Generate 3D: {exc}")
            return {"CANCELLED"}
        self.report({"INFO"}, f"Generate 3D: imported '{obj.name}'")
        return {"FINISHED"}


class GENERATE3D_OT_notify(bpy.types.Operator):
    """Show a message from the engine in Blender's reports"""

    bl_idname = "generate3d.notify"
    bl_label = "Generate 3D Message"
    bl_options = {"INTERNAL"}

    level: EnumProperty(items=[(x, x, "") for x in ("INFO", "WARNING", "ERROR")], default="INFO")
    message: StringProperty(default="")

    def execute(self, context):
        self.report({self.level}, self.message)
        return {"FINISHED"}


classes = (
    GENERATE3D_OT_connect,
    GENERATE3D_OT_disconnect,
    GENERATE3D_OT_generate,
    GENERATE3D_OT_refine,
    GENERATE3D_OT_cancel,
    GENERATE3D_OT_refresh_jobs,
    GENERATE3D_OT_import_result,
    GENERATE3D_OT_notify,
)


def close_at_exit() -> None:
    """Blender quits without unregistering add-ons: close the socket and the ZeroMQ context anyway (no bpy calls)."""
    close_session()


def shutdown() -> None:
    """Stop the timer and close the connection (called from unregister)."""
    stop_timer()
    close_session()
    runtime.reports.clear()
    runtime.status = ""

