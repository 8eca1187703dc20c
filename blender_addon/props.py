"""Add-on preferences (engine endpoint, key file, local engine command) and the scene's settings group."""
from __future__ import annotations

from pathlib import Path

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatProperty, IntProperty, PointerProperty, StringProperty

from .runtime import ADDON_PACKAGE, runtime

ENGINE_DEFAULT = "ENGINE_DEFAULT"
"""The preset entry shown before the engine has said which presets it has: send none, the engine picks its default."""
_preset_items: list[tuple[str, str, str]] = []  # Blender keeps no reference to items a callback returns


def preset_items(self, context) -> list[tuple[str, str, str]]:
    """The presets the connected engine announced in ``welcome``; one "Engine Default" entry before that."""
    session = runtime.session
    names = [str(n) for n in ((session.welcome or {}).get("presets") or [])] if session is not None else []
    items = [(n, n.title(), f"The engine's {n} preset") for n in names]
    _preset_items[:] = items or [(ENGINE_DEFAULT, "Engine Default", "The engine's default preset (connect to list its presets)")]
    return _preset_items


def chosen_preset(settings) -> str | None:
    """The preset to send: the chosen name, or None for the engine's default."""
    value = settings.preset
    return value if value and value != ENGINE_DEFAULT else None


TEXTURE_SIZES = [("PRESET", "Preset", "The preset's texture size")] + [
    (str(n), f"{n} px", f"Bake a {n} x {n} texture") for n in (256, 512, 1024, 2048, 4096)]
"""Texture sizes offered (the engine takes 16-8192 as the ``texture_size`` option)."""


EXPORT_FORMATS = [("NONE", "Blender Only", "Only the object in the scene"),
                  ("GLB", "GLB", "Also save the engine's GLB (glTF binary)"),
                  ("OBJ", "OBJ", "Also save OBJ + MTL + PNG textures"),
                  ("USD", "USD", "Also save a USD stage (UsdPreviewSurface) + PNG textures"),
                  ("USDZ", "USDZ", "Also save one USDZ package")]
"""Files saved beside the imported object (the engine's ``format`` option for OBJ / USD / USDZ)."""
EXPORTS_OUTSIDE_A_BLEND = Path.home() / "engine-exports"
"""Where a ``//``-relative export folder goes while the .blend is not saved yet."""


def export_folder(settings) -> str | None:
    """The absolute folder the result's files are saved into, or None for Blender Only.

    A ``//``-relative folder is next to the .blend file; before the file is saved, ~/engine-exports.
    """
    if settings.export_format == "NONE":
        return None
    folder = settings.export_dir or "//exports/"
    if folder.startswith("//") and not bpy.data.filepath:
        return str(EXPORTS_OUTSIDE_A_BLEND / folder[2:])
    return str(Path(bpy.path.abspath(folder)).resolve())


def output_options(settings, kind: str) -> dict:
    """The output controls as engine options: ``faces`` and ``texture_size`` (preset overrides; the engine's
    bounds are checked by the client before sending) and, for the kinds whose pipelines take it,
    ``guidance_scale``; nothing for the controls left at the preset's value."""
    options: dict = {}
    if settings.faces:
        options["faces"] = int(settings.faces)
    if settings.texture_size != "PRESET":
        options["texture_size"] = int(settings.texture_size)
    if settings.guidance_scale > 0 and kind != "refine":
        options["guidance_scale"] = float(settings.guidance_scale)
    if settings.perp_neg and kind == "text":  # text-to-image priors only
        options["perp_neg"] = True
    if settings.export_format not in ("NONE", "GLB"):  # the GLB is always made
        options["format"] = settings.export_format.lower()
    if kind in ("image", "multiview"):
        options.update(image_fit_options(settings))
    return options


HYBRID_WEIGHT_DEFAULT = 2.0
"""The engine's default ``hybrid_weight`` (DreamCraft3D's mu): not sent when left there."""
NORMAL_WEIGHT_DEFAULT = 1.0
"""The engine's default ``normal_weight`` (the normal alignment is on by default): not sent when left there."""
BSD_T_DEFAULTS = (0.6, 0.3)
"""The engine's default BSD t' schedule (``bsd_t_start``, ``bsd_t_end``): not sent when left there."""


def image_fit_options(settings) -> dict:
    """The Advanced fold's image-to-3D stages as engine options (``hybrid``, ``hybrid_weight``,
    ``view_start_range`` + ``view_widen``, ``depth_weight``, ``normal_weight``, ``bsd_steps`` + ``bsd_t_start`` /
    ``bsd_t_end``); nothing for a stage left at the engine's default."""
    options: dict = {}
    if settings.hybrid:
        options["hybrid"] = True
        if settings.hybrid_weight != HYBRID_WEIGHT_DEFAULT:
            options["hybrid_weight"] = float(settings.hybrid_weight)
    if settings.view_start_range > 0:
        options["view_start_range"] = float(settings.view_start_range)
        options["view_widen"] = float(settings.view_widen)
    if settings.depth_weight > 0:
        options["depth_weight"] = float(settings.depth_weight)
    if settings.normal_weight != NORMAL_WEIGHT_DEFAULT:
        options["normal_weight"] = float(settings.normal_weight)
    if settings.bsd_steps > 0:
        options["bsd_steps"] = int(settings.bsd_steps)
        schedule = (round(settings.bsd_t_start, 4), round(settings.bsd_t_end, 4))  # Blender keeps float32
        if schedule != BSD_T_DEFAULTS:
            if schedule[1] > schedule[0]:
                raise ValueError(f"BSD's t' must shrink: End t' ({schedule[1]:.2f}) is above Start t' "
                                 f"({schedule[0]:.2f})")
            options["bsd_t_start"], options["bsd_t_end"] = schedule
    return options


REFINE_MODES = [("full", "Geometry + Texture", "Change the shape and the texture"),
                ("texture", "Texture Only", "Keep the shape, repaint the texture")]


class Generate3DPreferences(bpy.types.AddonPreferences):
    """Where the engine runs and how to reach it."""

    bl_idname = ADDON_PACKAGE

    endpoint: StringProperty(name="Engine Endpoint", default="tcp://127.0.0.1:5557",
                             description="ZeroMQ endpoint of the engine server (non-loopback needs online access)")
    key_file: StringProperty(name="Key File", subtype="FILE_PATH", default="",
                             description="The engine's key file (empty: the engine's default per-user key file)")
    auto_start: BoolProperty(name="Start Engine Automatically", default=False,
                             description="Start a local engine with the command below when none answers")
    engine_command: StringProperty(name="Engine Command", default="engine-server serve",
                                   description="Command line that starts a local engine (e.g. /path/to/python -m engine_server serve)")
    timeout_s: FloatProperty(name="Request Timeout (s)", default=5.0, min=0.5, max=120.0,
                             description="Longest wait for one reply from the engine")
    job_timeout_s: FloatProperty(name="Background Job Timeout (s)", default=900.0, min=1.0, max=86400.0,
                                 description="In background mode (blender -b) operators wait this long for a job")

    def draw(self, context):
        layout = self.layout
        layout.prop(self, "endpoint")
        layout.prop(self, "key_file")
        row = layout.row()
        row.prop(self, "auto_start")
        sub = row.row()
        sub.enabled = self.auto_start
        sub.prop(self, "engine_command", text="")
        layout.prop(self, "timeout_s")
        layout.prop(self, "job_timeout_s")


class Generate3DSettings(bpy.types.PropertyGroup):
    """Everything the Generate panel edits, kept with the scene."""

    prompt: StringProperty(name="Prompt", default="", description="What to make, e.g. 'a red cube'")
    negative_prompt: StringProperty(name="Negative Prompt", default="", description="What to avoid")
    image: PointerProperty(name="Reference Image", type=bpy.types.Image,
                           description="Make the object from this image instead of (or with) the prompt")
    seed: IntProperty(name="Seed", default=0, min=0, description="Random seed (0: the engine picks one)")
    preset: EnumProperty(name="Preset", items=preset_items,
                         description="Quality preset, as the connected engine names them")
    use_rig: BoolProperty(name="Cameras as Rig", default=False,
                          description="Send the selected cameras' placement, field of view and resolution")
    at_cursor: BoolProperty(name="Place at 3D Cursor", default=True,
                            description="Stand the new object on the 3D cursor (else on the world origin)")
    refine_mode: EnumProperty(name="Refine", items=REFINE_MODES, default="full")
    steps: IntProperty(name="Steps", default=0, min=0, max=100000,
                       description="Optimisation steps (0: the preset's)")
    faces: IntProperty(name="Faces", default=0, min=0, max=2_000_000, soft_max=200_000,
                       description="Most triangles of the object, 100 or more (0: the preset's)")
    texture_size: EnumProperty(name="Texture", items=TEXTURE_SIZES, default="PRESET",
                               description="Baked base-colour and normal map size (Preset: the preset's)")
    guidance_scale: FloatProperty(name="Guidance", default=0.0, min=0.0, max=100.0, precision=1,
                                  description="Classifier-free guidance scale of the prior for Generate "
                                              "(0: the model's default); Refine uses the model's")
    perp_neg: BoolProperty(name="Perp-Neg (one face)", default=False,
                           description="Against multi-faced objects with Stable Diffusion priors (text jobs; "
                                       "two extra denoiser passes per step)")
    export_format: EnumProperty(name="Save As", items=EXPORT_FORMATS, default="NONE",
                                description="Also save the result as files in this format, beside the object")
    export_dir: StringProperty(name="Folder", subtype="DIR_PATH", default="//exports/",
                               description="Where the files go (//: next to the .blend file), one folder per object")
    show_advanced: BoolProperty(name="Advanced (Image to 3D)", default=False,
                                description="Show the DreamCraft3D stages of image to 3D")
    hybrid: BoolProperty(name="Hybrid Distillation", default=False,
                         description="Add a text-to-image prior's guidance on the prompt to the novel-view prior's "
                                     "(needs a prompt)")
    hybrid_weight: FloatProperty(name="3D Prior Weight", default=HYBRID_WEIGHT_DEFAULT, min=0.0, max=100.0,
                                 description="Weight of the novel-view prior beside the text prior's (DreamCraft3D: 2)")
    view_start_range: FloatProperty(name="Views Start Within", default=0.0, min=0.0, max=180.0, precision=0,
                                    description="Progressive views: distillation starts within this many degrees "
                                                "of the reference camera and widens to all around (0: all around "
                                                "from the start)")
    view_widen: FloatProperty(name="Widen Over", default=0.5, min=0.01, max=1.0, subtype="FACTOR",
                              description="Share of the distillation over which the views widen to 360 degrees")
    depth_weight: FloatProperty(name="Depth Alignment", default=0.0, min=0.0, max=100.0,
                                description="Depth term against the silhouettes' visual hull (0: off)")
    normal_weight: FloatProperty(name="Normal Alignment", default=NORMAL_WEIGHT_DEFAULT, min=0.0, max=100.0,
                                 description="Normal term against the visual hull's smoothed normals (0: off)")
    bsd_steps: IntProperty(name="BSD Steps", default=0, min=0, max=100000,
                           description="Bootstrapped score distillation after the coarse fit: the novel-view prior "
                                       "fine-tuned on the object's own renders, the object fitted against it (0: off)")
    bsd_t_start: FloatProperty(name="Start t'", default=BSD_T_DEFAULTS[0], min=0.01, max=0.99, subtype="FACTOR",
                               description="How far BSD noises the renders before the prior denoises them, at the "
                                           "stage's start (a fraction of the diffusion timesteps)")
    bsd_t_end: FloatProperty(name="End t'", default=BSD_T_DEFAULTS[1], min=0.01, max=0.99, subtype="FACTOR",
                             description="BSD's t' at the stage's end, at most Start t' (smaller: the renders have "
                                         "improved)")
    overrides: StringProperty(name="Overrides", default="",
                              description="More preset overrides as name=value pairs, e.g. 'render_resolution=32 refine_steps=0'")

