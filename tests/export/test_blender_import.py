"""Exported files import into real Blender upright, with the base colour and the normal map connected.

Each format (GLB, OBJ, USD text / crate, USDZ) is imported by Blender's own importer in a
child process (``blender_import_check.py``), never inside the pytest process: Blender-as-a-
module (``bpy`` 5.0) for every format, and Debian's Blender 3.4 (``/usr/bin/blender``) for
OBJ, the one of its importers that runs here (its glTF add-on fails on numpy >= 1.24 and
Debian builds it without USD). Skipped with the reason when a Blender is missing.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from engine_server.export import export_mesh, usd_available

from .conftest import MATERIAL

CHECK = Path(__file__).resolve().parent / "blender_import_check.py"
BLENDER_34 = shutil.which("blender")
HAS_BPY = importlib.util.find_spec("bpy") is not None

_BPY = pytest.mark.skipif(not HAS_BPY, reason="Blender-as-a-module is not installed: pip install bpy==5.0.1 (Python 3.11)")
_USD = pytest.mark.skipif(not usd_available(), reason="usd-core is not installed: pip install 'engine-server[usd]'")
_BLENDER_34 = pytest.mark.skipif(BLENDER_34 is None, reason="no `blender` binary on PATH")
CASES = [
    pytest.param(("bpy", ".glb"), marks=_BPY),
    pytest.param(("bpy", ".obj"), marks=_BPY),
    *(pytest.param(("bpy", ext), marks=[_BPY, _USD]) for ext in (".usda", ".usdc", ".usdz")),
    pytest.param(("blender", ".obj"), marks=_BLENDER_34),
]


@pytest.fixture(scope="module", params=CASES, ids=lambda p: f"{p[0]}{p[1]}")
def imported(request, asset, tmp_path_factory) -> tuple[str, dict]:
    """(extension, Blender's report) for the asset exported with that extension and imported by that Blender."""
    runner, ext = request.param
    out = tmp_path_factory.mktemp(f"{runner}{ext.replace('.', '_')}")
    path = export_mesh(out / f"thing{ext}", asset, name="thing")
    report = out / "report.json"
    if runner == "bpy":
        cmd = [sys.executable, str(CHECK), str(path), str(report)]
    else:
        cmd = [BLENDER_34, "-b", "--factory-startup", "--python-exit-code", "1", "--python", str(CHECK), "--",
               str(path), str(report)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0 and report.is_file(), f"Blender import failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return ext, json.loads(report.read_text())


def test_one_mesh_with_every_face_and_vertex(asset, imported):
    _, report = imported
    assert report["import_result"] == ["FINISHED"]
    (obj,) = report["objects"]
    assert obj["name"] == "thing"
    assert obj["num_polygons"] == len(asset.faces) and obj["num_vertices"] == len(asset.vertices)


def test_base_colour_and_normal_map_feed_the_principled_bsdf(asset, imported):
    ext, report = imported
    (material,) = report["objects"][0]["materials"]
    assert material["principled"], "no Principled BSDF in the imported material"
    assert material["chain"] == ["TEX_IMAGE"], f"Base Color is fed by {material['chain']}"
    assert material["image"]["size"] == [asset.base_color.shape[1], asset.base_color.shape[0]]
    normal = material["normal"]
    assert normal["chain"] == ["NORMAL_MAP", "TEX_IMAGE"], f"Normal is fed by {normal['chain']}"
    assert normal["space"] == "TANGENT" and normal["strength"] == pytest.approx(1.0)
    assert normal["image"]["size"] == [asset.normal_map.shape[1], asset.normal_map.shape[0]]
    if ext != ".obj":  # Blender's OBJ importer loads every map as sRGB (nothing in an MTL tells it otherwise)
        assert normal["image"]["colorspace"] == "Non-Color"
    assert material["roughness"] == pytest.approx(MATERIAL.roughness, abs=1e-6)
    assert material["metallic"] == pytest.approx(MATERIAL.metallic, abs=1e-6)


def test_vertices_keep_engine_coordinates_in_blender(textured, imported):
    # Blender's world is the engine's: every engine vertex is a Blender vertex at the same place.
    blender = np.array(imported[1]["objects"][0]["vertices"])
    engine = textured.mesh.vertices.astype(np.float64)
    dist, _ = cKDTree(blender).query(engine)
    assert dist.max() < 1e-5
    # and it stands upright: the ellipsoid's extents and centre are where they were made
    np.testing.assert_allclose(blender.max(0) - blender.min(0), 2 * textured.scale, rtol=1e-3)
    np.testing.assert_allclose((blender.max(0) + blender.min(0)) / 2, textured.offset, atol=1e-4)
    top = engine[np.argmax(engine[:, 2])]
    assert np.linalg.norm(blender - top, axis=1).min() < 1e-5 and blender[:, 2].max() == pytest.approx(top[2], abs=1e-6)


def test_blender_shows_the_baked_colours_in_place(textured, imported):
    # The colour Blender samples at each polygon's UV centre matches the colour field at the
    # polygon's world position: the image is neither flipped nor mirrored after import.
    obj = imported[1]["objects"][0]
    centres = np.array(obj["polygon_centres"])
    got = np.array(obj["polygon_colours"])
    expect = textured.colour_fn(torch.from_numpy(centres)).numpy()
    far = np.abs(centres[:, 2] - textured.offset[2]) > 0.03  # away from the red/green boundary
    assert far.sum() > 100
    red_green = np.abs(got[far, :2] - expect[far, :2]).max(1)
    assert (red_green < 0.02).mean() > 0.98, f"mismatched polygons: {(red_green >= 0.02).sum()}"
    assert np.abs(got[far, 2] - expect[far, 2]).mean() < 0.03
