"""Exported GLBs import into real Blender (``bpy``, run in a subprocess) upright and textured.

Blender-as-a-module is never imported into the pytest process: ``blender_import_check.py``
runs under the same interpreter in a child process and reports what Blender built.
Skipped with the reason when ``bpy`` is not installed (``pip install bpy==5.0.1``, Python 3.11).
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from engine_server.export import export_glb

CHECK = Path(__file__).resolve().parent / "blender_import_check.py"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("bpy") is None,
    reason="Blender-as-a-module is not installed: pip install bpy==5.0.1 (needs Python 3.11)",
)


@pytest.fixture(scope="module")
def blender_report(textured, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("blender")
    m = textured.mesh
    glb = export_glb(out / "model.glb", m.vertices, m.faces, m.uvs, textured.texture, name="generated")
    report = out / "report.json"
    proc = subprocess.run([sys.executable, str(CHECK), str(glb), str(report)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"Blender import failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(report.read_text())


def test_blender_imports_one_mesh_with_all_faces(textured, blender_report):
    assert blender_report["import_result"] == ["FINISHED"]
    objects = blender_report["objects"]
    assert [o["name"] for o in objects] == ["generated"]
    assert objects[0]["num_polygons"] == len(textured.mesh.faces)


def test_material_base_colour_comes_from_the_texture(textured, blender_report):
    (material,) = blender_report["objects"][0]["materials"]
    assert material["principled"], "no Principled BSDF in the imported material"
    assert material["chain"] == ["TEX_IMAGE"], f"Base Color is fed by {material['chain']}"
    assert material["image"]["size"] == [textured.texture.shape[1], textured.texture.shape[0]]
    assert material["extension"] == "EXTEND"  # clamp-to-edge sampler


def test_vertices_keep_engine_coordinates_in_blender(textured, blender_report):
    # Blender's world is the engine's: every engine vertex is a Blender vertex at the same place.
    blender = np.array(blender_report["objects"][0]["vertices"])
    engine = textured.mesh.vertices.astype(np.float64)
    dist, _ = cKDTree(blender).query(engine)
    assert dist.max() < 1e-5
    # and it stands upright: the ellipsoid's extents and centre are where they were made
    np.testing.assert_allclose(blender.max(0) - blender.min(0), 2 * textured.scale, rtol=1e-3)
    np.testing.assert_allclose((blender.max(0) + blender.min(0)) / 2, textured.offset, atol=1e-4)
    top = engine[np.argmax(engine[:, 2])]
    assert np.linalg.norm(blender - top, axis=1).min() < 1e-5 and blender[:, 2].max() == pytest.approx(top[2], abs=1e-6)


def test_blender_shows_the_baked_colours_in_place(textured, blender_report):
    # The colour Blender samples at each polygon's UV centre matches the colour field at the
    # polygon's world position: the image is neither flipped nor mirrored after import.
    obj = blender_report["objects"][0]
    centres = np.array(obj["polygon_centres"])
    got = np.array(obj["polygon_colours"])
    expect = textured.colour_fn(torch.from_numpy(centres)).numpy()
    far = np.abs(centres[:, 2] - textured.offset[2]) > 0.03  # away from the red/green boundary
    assert far.sum() > 100
    red_green = np.abs(got[far, :2] - expect[far, :2]).max(1)
    assert (red_green < 0.02).mean() > 0.98, f"mismatched polygons: {(red_green >= 0.02).sum()}"
    assert np.abs(got[far, 2] - expect[far, 2]).mean() < 0.03
