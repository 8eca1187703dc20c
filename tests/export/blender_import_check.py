"""Import an exported file with Blender's own importer (glTF, OBJ or USD by extension) and report what Blender sees.

Run in a subprocess, never inside the pytest process: with Blender-as-a-module
``python blender_import_check.py MODEL REPORT.json``, or with a Blender binary
``blender -b --factory-startup --python blender_import_check.py -- MODEL REPORT.json``.
The report (JSON) gives Blender's version and lists the imported mesh objects with their
world-space vertices, each polygon's world-space centre and the texture colour Blender
would show there (read from the image at the polygon's mean UV in Blender's
bottom-left-origin convention), the material's base-colour and normal node chains and the
Principled BSDF's roughness / metallic values.
"""
from __future__ import annotations

import json
import math
import sys

import bpy


def _material(material: bpy.types.Material) -> dict:
    """The Principled BSDF's inputs as Blender built them: Base Color and Normal chains, roughness, metallic."""
    if material is None or material.node_tree is None:
        return {"principled": False}
    principled = next((n for n in material.node_tree.nodes if n.type == "BSDF_PRINCIPLED"), None)
    if principled is None:
        return {"principled": False}
    out = {"principled": True, **_chain(principled.inputs["Base Color"])}
    out["normal"] = _chain(principled.inputs["Normal"])
    normal_map = next((n for n in material.node_tree.nodes if n.type == "NORMAL_MAP"), None)
    if normal_map is not None:
        out["normal"]["space"] = normal_map.space
        out["normal"]["strength"] = normal_map.inputs["Strength"].default_value
    for name in ("Roughness", "Metallic"):
        socket = principled.inputs[name]
        out[name.lower()] = None if socket.is_linked else float(socket.default_value)
    return out


def _chain(socket) -> dict:
    """Walk upstream from ``socket`` to the first Image Texture node: the node types passed and the image."""
    chain: list[str] = []
    for _ in range(8):
        if not socket.is_linked:
            return {"chain": chain, "image": None}
        if socket.links[0].from_node.type == "REROUTE":
            socket = socket.links[0].from_node.inputs[0]
            continue
        node = socket.links[0].from_node
        chain.append(node.type)
        if node.type == "TEX_IMAGE":
            img = node.image
            return {
                "chain": chain,
                "image": None if img is None else {"name": img.name, "size": list(img.size), "channels": img.channels,
                                                   "colorspace": img.colorspace_settings.name},
                "extension": node.extension,
            }
        linked = [s for s in node.inputs if s.is_linked]
        if not linked:
            return {"chain": chain, "image": None}
        socket = linked[0]
    return {"chain": chain, "image": None}


def _sample(pixels: list[float], width: int, height: int, channels: int, u: float, v: float) -> list[float]:
    """Nearest texel of a Blender image (rows stored bottom row first) at Blender UV (u, v)."""
    x = min(max(int(math.floor(u * width)), 0), width - 1)
    y = min(max(int(math.floor(v * height)), 0), height - 1)
    i = (y * width + x) * channels
    return pixels[i : i + 3]


def _import(path: str) -> set[str]:
    suffix = path.lower().rpartition(".")[2]
    if suffix == "glb":
        return bpy.ops.import_scene.gltf(filepath=path)
    if suffix == "obj":
        return bpy.ops.wm.obj_import(filepath=path)  # defaults: forward -Z, up Y
    if suffix in ("usd", "usda", "usdc", "usdz"):
        return bpy.ops.wm.usd_import(filepath=path)
    raise SystemExit(f"no importer for {path}")


def main(path: str, report_path: str) -> int:
    bpy.ops.wm.read_factory_settings(use_empty=True)
    result = _import(path)
    report: dict = {"import_result": sorted(result), "blender": list(bpy.app.version), "objects": []}
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
            entry["materials"].append({"name": mat.name if mat else None, **_material(mat)})
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
    args = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else sys.argv[1:]
    if len(args) != 2:
        print("usage: blender_import_check.py MODEL REPORT.json", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(args[0], args[1]))
