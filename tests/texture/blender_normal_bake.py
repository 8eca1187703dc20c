"""Bake a tangent-space normal map with Blender's own baker (Cycles, selected to active), for comparison.

Run in a subprocess with Blender-as-a-module, never inside pytest:
``python blender_normal_bake.py IN.npz OUT.npy``. IN holds ``high_v``, ``high_f`` (the detailed
surface), ``low_v``, ``low_f``, ``low_uv`` (glTF UVs, top-left origin), ``low_n`` (its vertex normals, set as
custom normals the way Blender's glTF importer sets a file's) and ``size``; OUT is the
(size, size, 3) float32 map Blender bakes onto the low mesh's UVs, row 0 = top (glTF rows),
values 0.5 * n + 0.5 in Blender's tangent space (MikkTSpace, +Y up).
"""
from __future__ import annotations

import sys

import bpy
import numpy as np


def _object(name: str, v: np.ndarray, f: np.ndarray, normals: np.ndarray | None = None) -> bpy.types.Object:
    mesh = bpy.data.meshes.new(name)
    mesh.from_pydata(v.tolist(), [], f.tolist())
    mesh.update()
    mesh.shade_smooth()
    if normals is not None:  # as Blender's glTF importer does with the file's normals
        mesh.normals_split_custom_set_from_vertices(normals.tolist())
    obj = bpy.data.objects.new(name, mesh)
    bpy.context.scene.collection.objects.link(obj)
    return obj


def main(src: str, dst: str) -> None:
    data = np.load(src)
    size = int(data["size"])
    bpy.ops.wm.read_factory_settings(use_empty=True)
    high = _object("high", data["high_v"], data["high_f"])
    low = _object("low", data["low_v"], data["low_f"], data["low_n"])
    layer = low.data.uv_layers.new(name="UVMap")
    corners = data["low_uv"][data["low_f"].reshape(-1)].astype(np.float64).copy()
    corners[:, 1] = 1.0 - corners[:, 1]  # Blender's v runs bottom-up
    layer.data.foreach_set("uv", corners.reshape(-1))
    image = bpy.data.images.new("baked", size, size, float_buffer=True, is_data=True)
    material = bpy.data.materials.new("bake")
    material.use_nodes = True
    node = material.node_tree.nodes.new("ShaderNodeTexImage")
    node.image = image
    material.node_tree.nodes.active = node
    low.data.materials.append(material)
    scene = bpy.context.scene
    scene.render.engine = "CYCLES"
    scene.cycles.device = "CPU"
    scene.cycles.samples = 1
    bake = scene.render.bake
    bake.use_selected_to_active = True
    bake.cage_extrusion = 0.02
    bake.max_ray_distance = 0.05
    bake.normal_space = "TANGENT"
    bake.margin = 0
    for obj in (high, low):
        obj.select_set(True)
    bpy.context.view_layer.objects.active = low
    bpy.ops.object.bake(type="NORMAL")
    pixels = np.empty(size * size * 4, dtype=np.float32)
    image.pixels.foreach_get(pixels)
    np.save(dst, pixels.reshape(size, size, 4)[::-1, :, :3].copy())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
