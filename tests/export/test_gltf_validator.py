"""Exported GLBs pass the Khronos glTF validator (npm ``gltf-validator``) with no errors.

Needs Node.js and ``npm install --prefix tests/tools``; skipped with the reason when either
is missing (CI installs both).
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from engine_server.export import MaterialParams, export_glb, export_mesh

TOOLS = Path(__file__).resolve().parents[1] / "tools"
SCRIPT = TOOLS / "validate_gltf.mjs"
NODE = shutil.which("node")

pytestmark = [
    pytest.mark.skipif(NODE is None, reason="Node.js (`node`) is not on PATH; the glTF validator needs it"),
    pytest.mark.skipif(
        not (TOOLS / "node_modules" / "gltf-validator").is_dir(),
        reason="gltf-validator is not installed: run `npm install --prefix tests/tools`",
    ),
]


def validate(path: Path) -> dict:
    """The validator's report for ``path`` (a dict with ``issues``: numErrors, numWarnings, messages)."""
    proc = subprocess.run([NODE, str(SCRIPT), str(path)], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"validator failed ({proc.returncode}): {proc.stderr}"
    return json.loads(proc.stdout)


def _describe(report: dict) -> str:
    return "\n".join(f"{m['severity']} {m['code']} at {m.get('pointer', '?')}: {m['message']}"
                     for m in report["issues"]["messages"])


def test_validator_reports_errors_in_a_broken_file(tmp_path):
    # guard against a harness that always says "valid"
    bad = tmp_path / "bad.gltf"
    bad.write_text(json.dumps({"asset": {}, "meshes": [{"primitives": [{"attributes": {"POSITION": 3}}]}]}))
    report = validate(bad)
    assert report["issues"]["numErrors"] > 0


@pytest.mark.parametrize("variant", ["rgb", "rgba-odd-size"])
def test_exported_glb_has_no_validation_errors(textured, tmp_path, variant):
    m = textured.mesh
    texture = textured.texture
    material = None
    if variant == "rgba-odd-size":
        texture = np.random.default_rng(0).integers(0, 256, size=(30, 50, 4), dtype=np.uint8)
        material = MaterialParams(metallic=0.1, roughness=0.8, base_color_factor=(0.9, 0.9, 0.9, 1.0), double_sided=True)
    path = export_glb(tmp_path / "model.glb", m.vertices, m.faces, m.uvs, texture, material, name="validated")
    report = validate(path)
    issues = report["issues"]
    print(f"glTF validator {report['validatorVersion']} on {variant}: {issues['numErrors']} errors, "
          f"{issues['numWarnings']} warnings, {issues['numInfos']} infos, {issues['numHints']} hints\n"
          + _describe(report))
    assert issues["numErrors"] == 0, _describe(report)
    assert issues["numWarnings"] == 0, _describe(report)  # none today: a new one deserves a look
    info = report["info"]
    assert info["drawCallCount"] == 1 and info["totalTriangleCount"] == len(m.faces)
    assert info["materialCount"] == 1
    image = next(r["image"] for r in info["resources"] if r.get("pointer", "").startswith("/images/"))
    assert (image["width"], image["height"]) == (texture.shape[1], texture.shape[0])


def test_glb_with_a_normal_map_has_no_validation_errors(asset, tmp_path):
    report = validate(export_mesh(tmp_path / "asset.glb", asset, name="asset"))
    issues = report["issues"]
    print(f"glTF validator {report['validatorVersion']} with a normal map: {issues['numErrors']} errors, "
          f"{issues['numWarnings']} warnings\n" + _describe(report))
    assert issues["numErrors"] == 0, _describe(report)
    # The one warning is the choice to leave TANGENT out: the spec has clients generate MikkTSpace
    # tangents then, the convention the map is baked in and the one Blender always computes itself.
    assert [m["code"] for m in issues["messages"] if m["severity"] == 1] == ["MESH_PRIMITIVE_GENERATED_TANGENT_SPACE"]
    images = [r for r in report["info"]["resources"] if r.get("pointer", "").startswith("/images/")]
    assert len(images) == 2 and all(r["mimeType"] == "image/png" for r in images)
