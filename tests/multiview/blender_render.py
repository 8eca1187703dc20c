"""Render a primitive with real Blender (``bpy``) for the image-to-3D tests; run in a child process.

    python blender_render.py SPEC.json OUT.png

SPEC: {"shape": "cube" | "sphere", "color": [r, g, b] (sRGB), "c2w": 4x4 nested list
(Blender matrix_world), "fov_y_deg": float, "size": pixels, "transparent": bool,
"background": [r, g, b] (sRGB world colour)}. Workbench, flat lighting, Standard
view transform, so the PNG holds the given sRGB colours; the object fills the unit box.
"""
from __future__ import annotations

import json
import math
import sys

import bpy
from mathutils import Matrix


def srgb_to_linear(c: float) -> float:
    return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4


def main(spec_path: str, out_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    if spec["shape"] == "cube":
        bpy.ops.mesh.primitive_cube_add(size=1.0)
    elif spec["shape"] == "sphere":
        bpy.ops.mesh.primitive_uv_sphere_add(radius=0.5, segments=64, ring_count=32)
        bpy.ops.object.shade_smooth()
    else:
        raise SystemExit(f"unknown shape {spec['shape']!r}")
    obj = bpy.context.active_object
    mat = bpy.data.materials.new("colour")
    lin = [srgb_to_linear(c) for c in spec["color"]]
    mat.diffuse_color = (*lin, 1.0)
    obj.data.materials.append(mat)

    cam_data = bpy.data.cameras.new("camera")
    cam_data.sensor_fit = "VERTICAL"
    cam_data.angle_y = math.radians(spec["fov_y_deg"])
    cam = bpy.data.objects.new("camera", cam_data)
    scene.collection.objects.link(cam)
    cam.matrix_world = Matrix(spec["c2w"])
    scene.camera = cam

    world = bpy.data.worlds.new("world")
    world.color = [srgb_to_linear(c) for c in spec["background"]]
    scene.world = world
    scene.render.engine = "BLENDER_WORKBENCH"
    shading = scene.display.shading
    shading.light = "FLAT"
    shading.color_type = "MATERIAL"
    shading.show_object_outline = False
    shading.show_specular_highlight = False
    scene.display.render_aa = "16"
    scene.view_settings.view_transform = "Standard"
    scene.view_settings.look = "None"
    scene.render.film_transparent = bool(spec.get("transparent", False))
    scene.render.resolution_x = scene.render.resolution_y = int(spec["size"])
    scene.render.resolution_percentage = 100
    scene.render.image_settings.file_format = "PNG"
    scene.render.image_settings.color_mode = "RGBA" if spec.get("transparent") else "RGB"
    scene.render.filepath = out_path
    bpy.ops.render.render(write_still=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
