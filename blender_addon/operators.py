"""The operator classes: Connect, Disconnect, Generate, Refine Selected, Cancel, Refresh Jobs, Import Result.

They collect settings from the scene and hand them to the runtime (runtime.py: session,
timer, inbox drain, import); errors reach the artist through ``self.report``.
"""
from __future__ import annotations

import bpy
from bpy.props import EnumProperty, StringProperty

from . import props, scene_io
from . import runtime as rt
from .runtime import (
    close_session, connect_later, ensure_session, ensure_timer, flush_reports, import_job, prefs, runtime, session_for,
    stop_timer, wait_for,
)
from .session import JobView, SessionError


class _JobOperator:
    """Shared submit-then-return (UI: the submit runs on a helper thread) or submit-then-wait (background) logic."""

    def _run(self, context, kind: str, **fields) -> set[str]:
        try:
            job = rt.submit(context, kind, **fields)
        except SessionError as exc:
            self.report({"ERROR"}, f"Generate 3D: {exc}")
            return {"CANCELLED"}
        if not runtime.wait:  # the timer reports whether the engine took it
            self.report({"INFO"}, f"Generate 3D: sending '{fields.get('name')}' to the engine")
            return {"FINISHED"}
        try:
            wait_for(context, job, prefs(context).job_timeout_s)
        except SessionError as exc:
            runtime.reports.append(("ERROR", str(exc)))
        failed = flush_reports(self)
        return {"CANCELLED"} if failed or job.imported is None else {"FINISHED"}

    def _common(self, context, kind: str, steps_option: str = "coarse_steps") -> dict:
        """Fields every job shares; the steps override sets the job's main optimisation (``steps_option``), the
        output controls their options; the free-text overrides win over both."""
        s = context.scene.generate3d
        options = props.output_options(s, kind)
        if s.steps:
            options[steps_option] = s.steps
        options.update(scene_io.parse_overrides(s.overrides))
        return {"negative_prompt": s.negative_prompt or None, "seed": s.seed or None,
                "preset": props.chosen_preset(s), "options": options or None, "export_dir": props.export_folder(s)}


class GENERATE3D_OT_connect(bpy.types.Operator):
    """Connect to the engine (starting a local one when the preferences allow it)"""

    bl_idname = "generate3d.connect"
    bl_label = "Connect / Start Engine"

    def execute(self, context):
        try:
            if not runtime.wait:  # the timer reports how it went
                connect_later(context)
                self.report({"INFO"}, f"Generate 3D: connecting to {runtime.session.endpoint}")
                return {"FINISHED"}
            close_session()
            session = ensure_session(context)
        except SessionError as exc:
            self.report({"ERROR"}, f"Generate 3D: {exc}")
            return {"CANCELLED"}
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
        close_session(wait=runtime.wait)  # the UI never waits behind a connect to a hung engine
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
            fields = self._common(context, "image" if s.image is not None else "text")
            if s.image is not None:
                fields["image"] = scene_io.image_png(s.image)
        except (ValueError, RuntimeError) as exc:
            self.report({"ERROR"}, f"Generate 3D: {exc}")
            return {"CANCELLED"}
        if s.use_rig:
            rig = scene_io.camera_rig(context.selected_objects, context.scene)
            if not rig:
                self.report({"ERROR"}, "Generate 3D: 'Cameras as Rig' is on but no perspective camera is selected")
                return {"CANCELLED"}
            fields["rig"] = rig
        # The engine takes the rig relative to the placement and keeps it for a later import.
        placement = scene_io.matrix_rows(context.scene.cursor.matrix) if s.at_cursor else None
        label = s.prompt.strip() or (s.image.name if s.image is not None else "")
        return self._run(context, "image" if s.image is not None else "text", prompt=s.prompt, name=label,
                         placement=placement, **fields)


class GENERATE3D_OT_refine(_JobOperator, bpy.types.Operator):
    """Send the active mesh (modifiers applied) and the prompt to the engine; the result arrives as a new object beside it"""

    bl_idname = "generate3d.refine_selected"
    bl_label = "Refine Selected"
    bl_options = {"REGISTER", "UNDO"}

    @classmethod
    def poll(cls, context):
        obj = context.active_object
        s = getattr(context.scene, "generate3d", None)
        return obj is not None and obj.type == "MESH" and s is not None and bool(s.prompt.strip())

    def execute(self, context):
        s = context.scene.generate3d
        obj = context.active_object
        vertices, faces = scene_io.evaluated_triangles(obj, context.evaluated_depsgraph_get())
        if len(faces) == 0:
            self.report({"ERROR"}, f"Generate 3D: '{obj.name}' has no faces to refine")
            return {"CANCELLED"}
        try:
            fields = self._common(context, "refine", steps_option="refine_steps")
        except ValueError as exc:
            self.report({"ERROR"}, f"Generate 3D: {exc}")
            return {"CANCELLED"}
        mesh = {"vertices": vertices, "faces": faces, "matrix_world": scene_io.matrix_rows(obj.matrix_world)}
        return self._run(context, "refine", prompt=s.prompt, mesh=mesh, mode=s.refine_mode,
                         name=f"{obj.name} refined", placement=scene_io.beside(obj), source=obj.name, **fields)


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
        if not runtime.wait:  # the timer reports the engine's answer
            session.cancel_later(job_id)
            ensure_timer()
            return {"FINISHED"}
        try:
            state = session.cancel(job_id)
        except SessionError as exc:
            self.report({"ERROR"}, f"Generate 3D: {exc}")
            return {"CANCELLED"}
        self.report({"INFO"}, f"Generate 3D: cancel requested ({state})")
        return {"FINISHED"}


class GENERATE3D_OT_refresh_jobs(bpy.types.Operator):
    """List the engine's jobs, including those that ended while Blender was closed"""

    bl_idname = "generate3d.refresh_jobs"
    bl_label = "Refresh Jobs"

    def execute(self, context):
        try:
            if runtime.wait:
                ensure_session(context).refresh()
            else:  # the timer applies the list when it arrives
                session_for(context).refresh_later()
                ensure_timer()
        except SessionError as exc:
            self.report({"ERROR"}, f"Generate 3D: {exc}")
            return {"CANCELLED"}
        return {"FINISHED"}


class GENERATE3D_OT_import_result(bpy.types.Operator):
    """Import a finished job's result as a new object"""

    bl_idname = "generate3d.import_result"
    bl_label = "Import Result"
    bl_options = {"REGISTER", "UNDO"}

    job_id: StringProperty(name="Job", default="")

    def execute(self, context):
        try:
            session = session_for(context)
            if not runtime.wait:  # fetched on a helper thread; the timer imports it
                session.result_later(self.job_id)
                ensure_timer()
                self.report({"INFO"}, f"Generate 3D: fetching the result of {self.job_id}")
                return {"FINISHED"}
            job = session.jobs.get(self.job_id) or JobView(self.job_id, name="Generated")
            session.jobs.setdefault(job.job_id, job)
            obj = import_job(context, session, job)
        except (SessionError, ValueError) as exc:
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
