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
            row.label(text=runtime.status or session.endpoint, icon="LINKED" if session.connected else "UNLINKED")
            row.operator("generate3d.disconnect", text="", icon="X")
        col = layout.column(align=True)
        col.prop(s, "prompt", text="")
        col.prop(s, "negative_prompt", text="", icon="REMOVE")
        layout.template_ID(s, "image", open="image.open")
        col = layout.column()
        col.prop(s, "preset")
        col.prop(s, "seed")
        col.prop(s, "steps")
        col.prop(s, "overrides")
        col.prop(s, "use_rig")
        col.prop(s, "at_cursor")
        layout.operator("generate3d.generate", icon="SHADERFX")
        row = layout.row(align=True)
        row.prop(s, "refine_mode", text="")
        row.operator("generate3d.refine_selected", icon="MODIFIER")
        if session is not None:
            active = session.active()
            if active:
                job = active[-1]
                box = layout.box()
                box.label(text=runtime.status, icon="TIME")
                if hasattr(box, "progress"):  # Blender 4.0+
                    box.progress(factor=job.fraction, text=f"{100 * job.fraction:.0f} %")
                else:
                    box.label(text=f"{100 * job.fraction:.0f} %")
                box.operator("generate3d.cancel", icon="CANCEL")
        image = bpy.data.images.get(PREVIEW_IMAGE)
        if image is not None and image.preview is not None:
            layout.template_icon(icon_value=image.preview.icon_id, scale=8.0)


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
            row = layout.row(align=True)
            row.label(text=f"{job.name} - {job.state}", icon="CHECKMARK" if job.state == "done" else "BLANK1")
            if job.state == "done":
                op = row.operator("generate3d.import_result", text="", icon="IMPORT")
                op.job_id = job.job_id
            elif not job.terminal:
                op = row.operator("generate3d.cancel", text="", icon="CANCEL")
                op.job_id = job.job_id


def draw_status(self, context):
    """Status-bar line while a job runs."""
    session = runtime.session
    if session is not None and session.active() and runtime.status:
        self.layout.label(text=f"Generate 3D: {runtime.status}", icon="TIME")


classes = (GENERATE3D_PT_main, GENERATE3D_PT_jobs)
