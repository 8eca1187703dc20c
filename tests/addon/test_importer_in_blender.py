"""The add-on's importer connects the engine's normal map and material factors; the panel sends Faces / Texture.

Runs ``importer_check.py`` with Blender-as-a-module in a child process (never in the pytest
process); skipped with the reason when ``bpy`` is not installed.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

CHECK = Path(__file__).resolve().parent / "importer_check.py"

pytestmark = pytest.mark.skipif(importlib.util.find_spec("bpy") is None,
                                reason="Blender-as-a-module is not installed: pip install bpy==5.0.1 (Python 3.11)")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("importer") / "report.json"
    proc = subprocess.run([sys.executable, str(CHECK), str(ROOT), str(out)], capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, f"importer check failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text())


def test_normal_map_feeds_the_principled_bsdf_through_a_normal_map_node(report):
    quad = report["objects"]["quad"]
    assert quad["normal_linked"] and quad["normal_from"] == "NORMAL_MAP" and quad["space"] == "TANGENT"
    assert quad["image_from"] == "TEX_IMAGE" and quad["colorspace"] == "Non-Color" and quad["packed"]
    assert quad["pixel"] == pytest.approx([128 / 255, 128 / 255, 1.0], abs=1e-3)  # read as data, not sRGB-decoded


def test_material_factors_are_the_engines(report):
    quad = report["objects"]["quad"]
    assert quad["roughness"] == pytest.approx(0.6) and quad["metallic"] == pytest.approx(0.25)
    plain = report["objects"]["plain"]  # a result without them keeps Blender's defaults and no normal input
    assert not plain["normal_linked"] and plain["roughness"] == pytest.approx(0.5) and plain["metallic"] == 0.0


def test_panel_sends_faces_and_texture_size_unless_left_at_the_preset(report):
    assert report["options"] == {"faces": 5000, "texture_size": 1024, "format": "usdz", "perp_neg": True}
    assert report["options_image"] == {"faces": 5000, "texture_size": 1024, "format": "usdz", "hybrid": True,
                                       "view_start_range": 30.0, "view_widen": 0.4, "normal_weight": 0.0}
    assert report["options_preset"] == {}
    assert report["export_folder"] == str(Path.home() / "engine-exports" / "exports")
    assert report["export_folder_none"] is None
