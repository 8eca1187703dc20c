"""The N-panel (View3D > Sidebar > Generate) and the status-bar progress line."""
from __future__ import annotations

import bpy

from .importer import PREVIEW_IMAGE
from .runtime import runtime

MAX_LISTED_JOBS = 8
"""Jobs shown in the panel's list (newest first)."""


class GENERATE3D_PT_main(bpy.types.Panel):
    """Prompt, settings, Generate / Refine, progress and preview."""

    bl_label = "Generate 3D"
    bl_idname = "GENERATE3D_PT_main"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "Generate"

    def draw(self, context):
        layout = self.layout
        s = context.scene.generate3d
        session = runtime.session
        row = layout.row(align=True)
        if session is None:
            row.operator("generate3d.connect", icon="PLUGIN")
        else:
            row.label(text=_engine_line(session), icon="LINKED" if session.connected else "UNLINKED")
            row.operator("generate3d.connect", text="", icon="FILE_REFRESH")
            row.operator("generate3d.disconnect", text="", icon="X")
        # Labels above their fields: nothing is cut off at the sidebar's default width.
        col = layout.column(align=True)
        col.label(text="Prompt")
        col.prop(s, "prompt", text="")
        col.label(text="Negative Prompt")
        col.prop(s, "negative_prompt", text="")
        col = layout.column(align=True)
        col.label(text="Reference Image")
        col.template_ID(s, "image", open="image.open")
        col = layout.column(align=True)
        col.label(text="Preset")
        col.prop(s, "preset", text="")
        row = layout.row(align=True)
        row.prop(s, "seed")
        row.prop(s, "steps")
        layout.prop(s, "faces")
        row = layout.row(align=True)
        row.label(text="Texture")
        row.prop(s, "texture_size", text="")
        layout.prop(s, "guidance_scale")
        layout.prop(s, "perp_neg")
        col = layout.column(align=True)
        col.label(text="Save As")
        col.prop(s, "export_format", text="")
        if s.export_format != "NONE":
            col.prop(s, "export_dir", text="")
        _draw_advanced(layout, s)
        col = layout.column(align=True)
        col.label(text="Preset Overrides (name=value)")
        col.prop(s, "overrides", text="")
        col = layout.column(align=True)
        col.prop(s, "use_rig")
        col.prop(s, "at_cursor")
        layout.operator("generate3d.generate", icon="SHADERFX")
        col = layout.column(align=True)
        col.prop(s, "refine_mode", text="")
        col.operator("generate3d.refine_selected", icon="MODIFIER")
        if session is not None:
            active = session.active()
            if active:
                job = active[-1]
                box = layout.box()
                box.label(text=job.name, icon="TIME")
                stage = f"{job.stage or job.state}" + (f" {job.step}/{job.total}" if job.total else "")
                box.label(text=f"Stage: {stage}")
                text = f"{100 * job.overall:.0f} % of the job"
                if hasattr(box, "progress"):  # Blender 4.0+
                    box.progress(factor=job.overall, text=text)
                else:
                    box.label(text=text)
                if job.camera_line():
                    box.label(text=job.camera_line(), icon="CAMERA_DATA")
                box.operator("generate3d.cancel", icon="CANCEL")
            else:  # the camera the last image result was made for (sent from the scene, estimated or default)
                made = [j for j in session.jobs.values() if j.state == "done" and j.camera_line()]
                if made:
                    layout.label(text=made[-1].camera_line(), icon="CAMERA_DATA")
        image = bpy.data.images.get(PREVIEW_IMAGE)
        if image is not None and image.preview is not None:
            layout.template_icon(icon_value=image.preview.icon_id, scale=10.0)


class GENERATE3D_PT_jobs(bpy.types.Panel):
    """The engine's jobs, with Import for finished ones."""

    bl_label = "Jobs"
    bl_idname = "GENERATE3D_PT_jobs"
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "Generate"
    bl_parent_id = "GENERATE3D_PT_main"
    bl_options = {"DEFAULT_CLOSED"}

    def draw(self, context):
        layout = self.layout
        layout.operator("generate3d.refresh_jobs", icon="FILE_REFRESH")
        session = runtime.session
        if session is None:
            return
        for job in list(session.jobs.values())[::-1][:MAX_LISTED_JOBS]:
            col = layout.column(align=True)
            row = col.row(align=True)
            icon = {"done": "CHECKMARK", "failed": "ERROR", "cancelled": "CANCEL"}.get(job.state, "TIME")
            where = f" on {job.node}" if job.node else ""  # a cluster engine's machine
            row.label(text=f"{job.name} - {job.state}{where}", icon=icon)
            if job.state == "failed" and job.message:  # the failure's code and message
                col.label(text=job.message)
            if job.camera_line():
                col.label(text=job.camera_line())
            if job.state == "done":
                op = row.operator("generate3d.import_result", text="", icon="IMPORT")
                op.job_id = job.job_id
            elif not job.terminal:
                op = row.operator("generate3d.cancel", text="", icon="CANCEL")
                op.job_id = job.job_id


def _draw_advanced(layout, s) -> None:
    """The Advanced fold: image to 3D's DreamCraft3D stages (sent with a reference image only)."""
    box = layout.box()
    box.prop(s, "show_advanced", icon="TRIA_DOWN" if s.show_advanced else "TRIA_RIGHT", emboss=False)
    if not s.show_advanced:
        return
    col = box.column(align=True)
    col.prop(s, "hybrid")
    sub = col.row()
    sub.enabled = s.hybrid
    sub.prop(s, "hybrid_weight")
    col = box.column(align=True)
    col.prop(s, "view_start_range")
    sub = col.row()
    sub.enabled = s.view_start_range > 0
    sub.prop(s, "view_widen")
    col = box.column(align=True)
    col.prop(s, "depth_weight")
    col.prop(s, "normal_weight")
    col = box.column(align=True)
    col.prop(s, "bsd_steps")
    sub = col.row(align=True)
    sub.enabled = s.bsd_steps > 0
    sub.prop(s, "bsd_t_start")
    sub.prop(s, "bsd_t_end")


def _engine_line(session) -> str:
    """The connection in a few words (the job's progress has its own box)."""
    if session.pending:
        return "connecting..." if session.welcome is None else "sending..."
    if session.lost:
        return "engine lost"
    if session.connected:
        return "engine busy" if session.active() else "engine idle"
    return "not connected"


def draw_status(self, context):
    """Status-bar line while a job runs."""
    session = runtime.session
    if session is not None and session.active() and runtime.status:
        self.layout.label(text=f"Generate 3D: {runtime.status}", icon="TIME")


classes = (GENERATE3D_PT_main, GENERATE3D_PT_jobs)
