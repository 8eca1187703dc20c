"""Run under Blender-as-a-module: the add-on's importer builds an object from engine arrays + PNGs; report as JSON.

``python importer_check.py ROOT REPORT.json``: imports ``blender_addon`` from the repo at ROOT,
makes one object from a small quad with a base colour, a normal map and material factors,
and reports the Principled BSDF's inputs, plus what the panel's output controls send.
"""
from __future__ import annotations

import io
import json
import sys
from types import SimpleNamespace

import bpy
import numpy as np
from PIL import Image


def _png(rgb: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), rgb, dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def main(root: str, report_path: str) -> int:
    sys.path.insert(0, root)
    from blender_addon import importer, props

    bpy.ops.wm.read_factory_settings(use_empty=True)
    vertices = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], dtype=np.float32)
    faces = np.array([[0, 1, 2], [0, 2, 3]], dtype=np.int32)
    uvs = np.array([[0, 1], [1, 1], [1, 0], [0, 0]], dtype=np.float32)
    obj = importer.create_object("quad", vertices, faces, uvs, _png((200, 30, 30)), normal_png=_png((128, 128, 255)),
                                 factors={"roughness": 0.6, "metallic": 0.25}, context=bpy.context)
    plain = importer.create_object("plain", vertices, faces, uvs, _png((200, 30, 30)), context=bpy.context)
    report = {"objects": {}}
    for o in (obj, plain):
        tree = o.data.materials[0].node_tree
        bsdf = next(n for n in tree.nodes if n.type == "BSDF_PRINCIPLED")
        entry = {"roughness": bsdf.inputs["Roughness"].default_value, "metallic": bsdf.inputs["Metallic"].default_value,
                 "normal_linked": bsdf.inputs["Normal"].is_linked}
        if bsdf.inputs["Normal"].is_linked:
            nmap = bsdf.inputs["Normal"].links[0].from_node
            tex = nmap.inputs["Color"].links[0].from_node
            entry.update(normal_from=nmap.type, space=nmap.space, image_from=tex.type,
                         colorspace=tex.image.colorspace_settings.name, packed=tex.image.packed_file is not None,
                         pixel=list(tex.image.pixels[:3]))
        report["objects"][o.name] = entry
    settings = SimpleNamespace(faces=5000, texture_size="1024", guidance_scale=0.0, export_format="USDZ",
                               export_dir="//exports/", perp_neg=True, hybrid=True, hybrid_weight=2.0,
                               view_start_range=30.0, view_widen=0.4, depth_weight=0.0, normal_weight=0.0, bsd_steps=0)
    report["options"] = props.output_options(settings, "text")
    report["options_image"] = props.output_options(settings, "image")  # Perp-Neg is for text jobs only
    report["export_folder"] = props.export_folder(settings)  # an unsaved .blend: under the home folder
    preset = SimpleNamespace(faces=0, texture_size="PRESET", guidance_scale=0.0, export_format="GLB", perp_neg=False)
    report["options_preset"] = props.output_options(preset, "text")  # the GLB is always made: no format option
    report["export_folder_none"] = props.export_folder(SimpleNamespace(export_format="NONE"))
    with open(report_path, "w", encoding="utf-8") as fh:
        json.dump(report, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
