"""The draft pipeline makes the object the prompt names: shape, colour, a closed surface, a valid GLB.

Four prompts of different shapes and colours run once each (module-scoped) on the real
bundled prior; every assertion reads those runs. The runs use the draft preset (QUICK: a smaller
texture, no previews); the shape measures come from engine_server.pipelines.quality. The GLB of one run goes through the
Khronos validator and Blender's glTF importer with the scripts tests/export uses.
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
import trimesh

from engine_server.export import load_glb
from engine_server.guidance import load_prior
from engine_server.pipelines.quality import DRAFT_PROMPTS, colour_word, draft_shape_checks, shape_measures
from engine_server.pipelines.text_to_3d import TextTo3D, TextTo3DRequest

pytestmark = pytest.mark.slow  # four draft runs: about three minutes on two CPU cores

TESTS = Path(__file__).resolve().parents[1]
VALIDATOR = TESTS / "tools" / "validate_gltf.mjs"
BLENDER_CHECK = TESTS / "export" / "blender_import_check.py"
NODE = shutil.which("node")

QUICK = {"texture_size": 128, "preview_every": 1000, "checkpoint_every": 1000}
"""The draft as it is, with a smaller texture and no previews or checkpoints."""

PROMPTS = DRAFT_PROMPTS


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """shape -> (result, measures) for each prompt, one draft run each."""
    torch.set_num_threads(1)  # oversubscribing a shared 2-core machine costs far more than it gains
    prior = load_prior("bundled")
    out = tmp_path_factory.mktemp("quality")
    results = {}
    for shape, prompt in PROMPTS.items():
        pipe = TextTo3D(TextTo3DRequest(prompt=prompt, seed=0, overrides=dict(QUICK)), prior=prior)
        result = pipe.run(out / f"{shape}.glb")
        results[shape] = (result, shape_measures(result.vertices, result.faces))
    return results


def _summary(runs) -> dict:
    return {s: {k: round(v, 3) for k, v in runs[s][1].items()} for s in PROMPTS}


@pytest.mark.parametrize("check", ["one closed piece", "sphere roundest", "sphere fills its box least",
                                   "cone narrows upwards", "cube as wide as tall", "cylinder taller than wide"])
def test_the_four_shapes_are_told_apart(runs, check):
    """The bars of quality.draft_shape_checks (the same ones `engine-server bench draft` prints)."""
    checks = draft_shape_checks({shape: runs[shape][1] for shape in PROMPTS})
    assert checks[check], _summary(runs)


@pytest.mark.parametrize("shape", list(PROMPTS))
def test_dominant_texture_colour_is_the_prompts(runs, shape):
    result, _ = runs[shape]
    word = PROMPTS[shape].split()[1]
    assert colour_word(result.texture, result.uvs, result.faces) == word, shape


def test_cube_is_boxier_than_the_cylinder(runs):
    """Until issue 23 a strict xfail: the prior drew a cube alike from every azimuth, so the distilled one was as round
    at mid-height as the cylinder. The prior fine-tuned with its shape-camera embedding turns the cube with the camera."""
    m = {shape: runs[shape][1] for shape in PROMPTS}
    # Fill: ideal 1.0 (cube) vs 0.79 (cylinder). Mid-height section roundness: square 0.64, circle 1.0.
    assert m["cube"]["fill"] > m["cylinder"]["fill"] + 0.01, _summary(runs)
    assert m["cube"]["roundness"] < m["cylinder"]["roundness"] - 0.03, _summary(runs)


def test_assets_are_smooth_within_the_face_budget_with_a_normal_map(runs):
    """Issue 17: the sphere's median dihedral angle within 1.5x an ideal sphere's at its face count;
    every mesh within the draft's 5000 faces, closed, with a normal map and PBR factors."""
    from engine_server.geometry.mesh_utils import dihedral_ratio, mesh_stats
    from engine_server.texture.asset import ROUGHNESS

    for shape in PROMPTS:
        result, _ = runs[shape]
        asset = result.sidecar["asset"]
        assert asset["faces"] == len(result.faces) <= asset["faces_requested"] == 5000, asset
        mesh = result.mesh
        assert mesh.normal_map is not None and mesh.normal_map.shape == mesh.base_color.shape
        assert (mesh.material.metallic, mesh.material.roughness) == (0.0, ROUGHNESS)
        loaded = load_glb(result.glb_path)
        closed = trimesh.Trimesh(loaded.vertices, loaded.faces)  # merges the UV-seam copies
        assert mesh_stats(closed.vertices, closed.faces).is_watertight, shape
    sphere = runs["sphere"][0]
    assert sphere.sidecar["asset"]["dihedral_ratio"] <= 1.5, sphere.sidecar["asset"]
    merged = trimesh.Trimesh(sphere.vertices, sphere.faces)
    assert dihedral_ratio(merged.vertices, merged.faces) <= 1.5


def test_glb_is_valid_gltf(runs):
    if NODE is None or not (TESTS / "tools" / "node_modules" / "gltf-validator").is_dir():
        pytest.skip("Node.js or tests/tools' gltf-validator is missing (npm install --prefix tests/tools)")
    result, _ = runs["cube"]
    proc = subprocess.run([NODE, str(VALIDATOR), str(result.glb_path)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    issues = json.loads(proc.stdout)["issues"]
    assert issues["numErrors"] == 0, issues["messages"]


def test_glb_imports_in_blender_with_its_texture(runs, tmp_path):
    if importlib.util.find_spec("bpy") is None:
        pytest.skip("Blender-as-a-module is not installed: pip install bpy==5.0.1 (needs Python 3.11)")
    result, _ = runs["sphere"]
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(BLENDER_CHECK), str(result.glb_path), str(report)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"Blender import failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    (obj,) = json.loads(report.read_text())["objects"]
    assert obj["num_polygons"] == len(load_glb(result.glb_path).faces)
    (material,) = obj["materials"]
    assert material["principled"] and material["chain"] == ["TEX_IMAGE"]
    assert material["image"]["size"] == [result.texture.shape[1], result.texture.shape[0]]
    # What Blender shows on the surface is the prompt's blue.
    colours = np.array(obj["polygon_colours"])[:, :3]
    assert np.median(colours[:, 2]) > np.median(colours[:, 0]) + 0.2
