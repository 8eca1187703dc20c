"""Import a GLB with Blender's own glTF importer and report what Blender sees, as JSON.

Run in a subprocess with a Python that has Blender-as-a-module (``bpy``), never inside
the pytest process: ``python blender_import_check.py MODEL.glb REPORT.json``.
The report lists the imported mesh objects with their world-space vertices, each
polygon's world-space centre and the texture colour Blender would show there (read
from the image at the polygon's mean UV in Blender's bottom-left-origin convention),
and the material's base-colour node chain.
"""
from __future__ import annotations

import json
import math
import sys

import bpy


def _base_color_chain(material: bpy.types.Material) -> dict:
    """Walk upstream from the Principled BSDF's Base Color to the first Image Texture node."""
    if material is None or material.node_tree is None:
        return {"principled": False}
    principled = next((n for n in material.node_tree.nodes if n.type == "BSDF_PRINCIPLED"), None)
    if principled is None:
        return {"principled": False}
    chain: list[str] = []
    socket = principled.inputs["Base Color"]
    for _ in range(8):
        if not socket.is_linked:
            return {"principled": True, "chain": chain, "image": None}
        node = socket.links[0].from_node
        chain.append(node.type)
        if node.type == "TEX_IMAGE":
            img = node.image
            return {
                "principled": True,
                "chain": chain,
                "image": None if img is None else {"name": img.name, "size": list(img.size), "channels": img.channels},
                "extension": node.extension,
            }
        linked = [s for s in node.inputs if s.is_linked]
        if not linked:
            return {"principled": True, "chain": chain, "image": None}
        socket = linked[0]
    return {"principled": True, "chain": chain, "image": None}


def _sample(pixels: list[float], width: int, height: int, channels: int, u: float, v: float) -> list[float]:
    """Nearest texel of a Blender image (rows stored bottom row first) at Blender UV (u, v)."""
    x = min(max(int(math.floor(u * width)), 0), width - 1)
    y = min(max(int(math.floor(v * height)), 0), height - 1)
    i = (y * width + x) * channels
    return pixels[i : i + 3]


def main(glb: str, report_path: str) -> int:
    bpy.ops.wm.read_factory_settings(use_empty=True)
    result = bpy.ops.import_scene.gltf(filepath=glb)
    report: dict = {"import_result": sorted(result), "objects": []}
    for obj in bpy.data.objects:
        if obj.type != "MESH":
            continue
        mesh = obj.data
        mw = obj.matrix_world
        verts = [list(mw @ v.co) for v in mesh.vertices]
        entry: dict = {
            "name": obj.name,
            "num_polygons": len(mesh.polygons),
            "num_vertices": len(mesh.vertices),
            "vertices": verts,
            "materials": [],
        }
        for mat in mesh.materials:
            entry["materials"].append({"name": mat.name if mat else None, **_base_color_chain(mat)})
        uv_layer = mesh.uv_layers.active
        img_info = entry["materials"][0] if entry["materials"] else {}
        image = None
        if img_info.get("image"):
            image = bpy.data.images[img_info["image"]["name"]]
        if uv_layer is not None and image is not None:
            w, h = image.size
            ch = image.channels
            pixels = list(image.pixels[:])
            centres, colours = [], []
            for poly in mesh.polygons:
                uvs = [uv_layer.data[li].uv for li in poly.loop_indices]
                u = sum(p[0] for p in uvs) / len(uvs)
                v = sum(p[1] for p in uvs) / len(uvs)
                centres.append(list(mw @ poly.center))
                colours.append(_sample(pixels, w, h, ch, u, v))
            entry["polygon_centres"] = centres
            entry["polygon_colours"] = colours
        report["objects"].append(entry)
    with open(report_path, "w", encoding="utf-8") as fh:
        json.dump(report, fh)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print("usage: blender_import_check.py MODEL.glb REPORT.json", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2]))
