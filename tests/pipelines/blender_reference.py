"""Render a reference as an artist would, with real Blender (``bpy``); run in a child process.

    python blender_reference.py SPEC.json OUT.png

SPEC: {"shape": "cube" | "sphere" | "cone" | "cylinder", "color": [r, g, b] (linear base colour),
"elevation_deg": float, "azimuth_deg": float, "engine": "workbench" | "eevee",
"background": "grey" | "white" | "gradient" | "transparent", "size": pixels,
"lens_mm": focal length (optional, default 50), "mesh": a GLB to show instead of the primitive (optional: a
result, in the engine's unit box, scaled to the primitives' 2 m and turned "turn_deg" about Z, textured)}.

Blender's own defaults, not the engine's: the primitive at its default size (2 m cube, 1 m
radius sphere, cone and cylinder 2 m tall) centred at the origin, the default 50 mm lens
(or ``lens_mm``) on a 36 mm sensor at the default camera's distance (11.2 m), aimed at the object from the
given orbit angles; Workbench with studio lighting, or EEVEE with a sun and the world light;
the default view transform (AgX). "gradient" is a backdrop from light to dark grey
behind the object (the film rendered transparent, composited in the script).
"""
from __future__ import annotations

import json
import math
import sys

import bpy
import numpy as np
from mathutils import Vector

DEFAULT_CAMERA_DISTANCE = 11.23
"""|location| of Blender's default camera (7.36, -6.93, 4.96)."""
BACKGROUNDS = {"grey": (0.05, 0.05, 0.05), "white": (1.0, 1.0, 1.0)}
"""World colours (linear) of the plain backgrounds."""


def add_shape(shape: str):
    if shape == "cube":
        bpy.ops.mesh.primitive_cube_add(size=2.0)
    elif shape == "sphere":
        bpy.ops.mesh.primitive_uv_sphere_add(radius=1.0)
    elif shape == "cone":
        bpy.ops.mesh.primitive_cone_add(radius1=1.0, depth=2.0, vertices=64)
    elif shape == "cylinder":
        bpy.ops.mesh.primitive_cylinder_add(radius=1.0, depth=2.0, vertices=64)
    else:
        raise SystemExit(f"unknown shape {shape!r}")
    obj = bpy.context.active_object
    if shape != "cube":
        bpy.ops.object.shade_smooth()
    return obj


def add_result(path: str, turn_deg: float):
    """A result GLB (the engine's unit box) as big as the primitives (2 m) and turned ``turn_deg`` about Z."""
    bpy.ops.import_scene.gltf(filepath=path)
    meshes = [o for o in bpy.context.scene.objects if o.type == "MESH"]
    if len(meshes) != 1:
        raise SystemExit(f"{path} holds {len(meshes)} meshes, expected one")
    obj = meshes[0]
    obj.scale = (2.0, 2.0, 2.0)
    obj.rotation_euler = (0.0, 0.0, math.radians(turn_deg))
    return obj


def main(spec_path: str, out_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    bpy.ops.wm.read_factory_settings(use_empty=True)
    scene = bpy.context.scene
    if "mesh" in spec:
        add_result(spec["mesh"], float(spec.get("turn_deg", 0.0)))
    else:
        obj = add_shape(spec["shape"])
        mat = bpy.data.materials.new("colour")
        mat.use_nodes = True
        bsdf = mat.node_tree.nodes.get("Principled BSDF")
        bsdf.inputs["Base Color"].default_value = (*spec["color"], 1.0)
        bsdf.inputs["Roughness"].default_value = 0.5
        mat.diffuse_color = (*spec["color"], 1.0)  # what Workbench shows
        obj.data.materials.append(mat)

    cam_data = bpy.data.cameras.new("camera")
    cam_data.lens, cam_data.sensor_width = float(spec.get("lens_mm", 50.0)), 36.0
    cam = bpy.data.objects.new("camera", cam_data)
    scene.collection.objects.link(cam)
    az, el = math.radians(spec["azimuth_deg"]), math.radians(spec["elevation_deg"])
    d = DEFAULT_CAMERA_DISTANCE
    cam.location = (d * math.cos(el) * math.sin(az), -d * math.cos(el) * math.cos(az), d * math.sin(el))
    cam.rotation_euler = (Vector((0.0, 0.0, 0.0)) - cam.location).to_track_quat("-Z", "Y").to_euler()
    scene.camera = cam

    background = spec["background"]
    world = bpy.data.worlds.new("world")
    world.use_nodes = True
    colour = BACKGROUNDS.get(background, (0.05, 0.05, 0.05))
    world.node_tree.nodes["Background"].inputs["Color"].default_value = (*colour, 1.0)
    world.color = colour
    scene.world = world
    if spec["engine"] == "workbench":
        scene.render.engine = "BLENDER_WORKBENCH"
        scene.display.shading.light = "STUDIO"
        scene.display.shading.color_type = "TEXTURE" if "mesh" in spec else "MATERIAL"  # a result's baked map
    elif spec["engine"] == "eevee":
        scene.render.engine = "BLENDER_EEVEE"
        scene.eevee.taa_render_samples = 8  # enough for a 256 px reference, and quick on a CPU-only machine
        sun = bpy.data.objects.new("sun", bpy.data.lights.new("sun", "SUN"))
        sun.data.energy = 3.0
        sun.rotation_euler = (math.radians(40), math.radians(10), math.radians(30))
        scene.collection.objects.link(sun)
    else:
        raise SystemExit(f"unknown engine {spec['engine']!r}")
    scene.render.film_transparent = background in ("transparent", "gradient")
    scene.render.resolution_x = scene.render.resolution_y = int(spec["size"])
    scene.render.resolution_percentage = 100
    scene.render.image_settings.file_format = "PNG"
    scene.render.image_settings.color_mode = "RGBA" if scene.render.film_transparent else "RGB"
    scene.render.filepath = out_path
    bpy.ops.render.render(write_still=True)
    if background == "gradient":
        composite_on_gradient(out_path)


def composite_on_gradient(path: str) -> None:
    """Replace the transparent film by a vertical backdrop, light grey at the top to dark at the bottom."""
    img = bpy.data.images.load(path)
    w, h = img.size
    px = np.asarray(img.pixels[:], dtype=np.float32).reshape(h, w, 4)  # rows bottom-up
    ramp = np.linspace(0.25, 0.8, h, dtype=np.float32)[:, None, None]  # bottom row darkest
    tint = np.array([1.0, 0.97, 0.92], np.float32)
    a = px[..., 3:4]
    px[..., :3] = px[..., :3] * a + ramp * tint * (1 - a)
    px[..., 3] = 1.0
    img.pixels[:] = px.ravel()
    img.file_format = "PNG"
    img.save()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
