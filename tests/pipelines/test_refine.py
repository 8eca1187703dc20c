"""Mesh refinement (engine_server.pipelines.refine): texture-only and geometry refine with the bundled prior."""
from __future__ import annotations

import math

import numpy as np
import pytest
import trimesh

from engine_server.export import load_glb
from engine_server.pipelines.events import Cancelled
from engine_server.pipelines.refine import (
    MeshRefiner,
    RefineConfig,
    RefineMesh,
    RefineMeshRequest,
    check_input_mesh,
)
from engine_server.pipelines.presets import DEFAULT_PRESET
from engine_server.pipelines.quality import sphericity


@pytest.fixture(scope="module")
def prior():
    from engine_server.guidance import load_prior

    return load_prior("bundled")


def blender_cube(size: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Blender's default cube: 8 vertices, 12 triangles, side 2, centred at the origin."""
    box = trimesh.creation.box(extents=(size, size, size))
    return np.asarray(box.vertices, np.float32), np.asarray(box.faces, np.int64)


def test_sphericity_definition():
    v, f = blender_cube()
    assert sphericity(v, f) == pytest.approx((math.pi / 6.0) ** (1.0 / 3.0), rel=1e-6)  # ~0.806
    s = trimesh.creation.icosphere(subdivisions=4)
    assert sphericity(s.vertices, s.faces) > 0.99


@pytest.mark.slow
def test_texture_refine_keeps_topology_and_paints_green(prior, tmp_path):
    v, f = blender_cube()
    # Place it somewhere in the world: the result must stay in the object's local frame.
    world = np.eye(4)
    world[:3, 3] = (3.0, -1.0, 0.5)
    events = []
    request = RefineMeshRequest(prompt="a green cube", vertices=v, faces=f, world_matrix=world, mode="texture",
                                overrides={"refine_steps": 40, "texture_size": 64, "preview_every": 20})
    result = RefineMesh(request, prior=prior, progress=events.append).run(tmp_path / "green.glb")

    # Same topology: every output face is the input face (same order) through vmapping,
    # and every output vertex sits exactly on its input vertex.
    vm = result.vmapping
    assert vm is not None
    np.testing.assert_array_equal(vm[result.faces], f)
    np.testing.assert_array_equal(result.vertices, v[vm])
    assert set(vm.tolist()) == set(range(len(v)))

    tex = result.texture.reshape(-1, 3).astype(np.int32)
    r, g, b = tex[:, 0], tex[:, 1], tex[:, 2]
    green = ((g > r + 10) & (g > b + 10)).mean()
    assert green > 0.6, f"only {green:.2f} of the texels are green-dominant; mean {tex.mean(0)}"
    assert tex[:, 1].mean() > tex[:, 0].mean() + 10 and tex[:, 1].mean() > tex[:, 2].mean() + 10

    loaded = load_glb(result.glb_path)
    assert loaded.faces.shape == result.faces.shape
    np.testing.assert_allclose(loaded.vertices, result.vertices, atol=1e-5)
    assert result.sidecar["mode"] == "texture"
    stages = [e.stage for e in events]
    assert stages.count("refine") == 41 and stages[-1] == "export"  # the stage's begin event, then 40 steps
    assert any(e.preview is not None for e in events)


def test_texture_refine_reuses_given_uvs(prior):
    v, f = blender_cube()
    # Per-vertex UVs (glTF convention) from a simple planar projection: usable, so kept as they are.
    uvs = np.clip((v[:, :2] - v[:, :2].min(0)) / np.ptp(v[:, :2], 0) * 0.9 + 0.05, 0, 1).astype(np.float32)
    uvs[:, 0] += 0.01 * v[:, 2]  # so no triangle collapses in UV space
    config = RefineConfig(mode="texture", refine_steps=2, texture_size=32)
    from engine_server.guidance import Conditioning

    out = MeshRefiner(prior, Conditioning(prompt="a red cube"), config).run(v, f, uvs)
    np.testing.assert_array_equal(out.faces, f)
    np.testing.assert_array_equal(out.vmapping, np.arange(len(v)))
    np.testing.assert_allclose(out.uvs, uvs, atol=1e-6)


@pytest.mark.slow
def test_geometry_refine_towards_a_sphere(prior, tmp_path):
    from engine_server.geometry import DMTet, DMTetConfig, mesh_stats

    v, f = blender_cube()
    request = RefineMeshRequest(prompt="a sphere", vertices=v, faces=f, mode="full",
                                overrides={"refine_steps": 80, "tet_resolution": 24, "texture_size": 64})
    pipeline = RefineMesh(request, prior=prior)
    result = pipeline.run(tmp_path / "sphere.glb")

    # The baseline is the cube as the DMTet first extracts it (its edges are already bevelled
    # by the grid), so the gain is the prompt's doing, not the remeshing's.
    cfg = pipeline.config
    start = DMTet.from_mesh(v / 2.0, f, DMTetConfig(resolution=cfg.tet_resolution, grid_scale=cfg.grid_scale))
    sv, sf = start.extract_mesh()
    merged = trimesh.Trimesh(result.vertices, result.faces)
    merged.merge_vertices()
    before, initial, after = sphericity(v, f), sphericity(sv, sf), sphericity(merged.vertices, merged.faces)
    print(f"sphericity: cube {before:.3f}, DMTet start {initial:.3f}, refined {after:.3f}")
    assert after > initial + 0.015
    stats = mesh_stats(merged.vertices, merged.faces)
    assert stats.n_components == 1 and stats.is_watertight
    # The result sits where the input was (a side-2 cube centred at the origin).
    lo, hi = result.vertices.min(0), result.vertices.max(0)
    np.testing.assert_allclose(0.5 * (lo + hi), 0.0, atol=0.15)
    assert 1.6 < float((hi - lo).max()) < 2.5


def test_cancel_stops_the_run(prior):
    from engine_server.guidance import Conditioning

    v, f = blender_cube()
    calls = {"n": 0}

    def cancelled() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    steps = []
    refiner = MeshRefiner(prior, Conditioning(prompt="a green cube"), RefineConfig(mode="texture", refine_steps=50),
                          progress=lambda e: steps.append(e.step), cancelled=cancelled)
    with pytest.raises(Cancelled):
        refiner.run(v, f)
    assert 1 <= len(steps) < 50


def test_checkpoint_resume(prior, tmp_path):
    from engine_server.guidance import Conditioning

    v, f = blender_cube()
    cond = Conditioning(prompt="a blue cube")
    config = RefineConfig(mode="texture", refine_steps=4, checkpoint_every=2, texture_size=32)
    full = MeshRefiner(prior, cond, config, seed=3).run(v, f)

    state = {"n": 0}

    def stop_after_two() -> bool:
        state["n"] += 1
        return state["n"] > 3  # steps 0 and 1 run (plus the check before step 2's work)

    with pytest.raises(Cancelled):
        MeshRefiner(prior, cond, config, seed=3, checkpoint_dir=tmp_path, cancelled=stop_after_two).run(v, f)
    assert (tmp_path / "refine.pt").exists()
    resumed_refiner = MeshRefiner(prior, cond, config, seed=3, checkpoint_dir=tmp_path)
    resumed = resumed_refiner.run(v, f)
    assert len(resumed.losses) == 2  # only the remaining steps ran
    np.testing.assert_allclose(resumed.losses, full.losses[2:], rtol=1e-4)
    np.testing.assert_array_equal(resumed.texture, full.texture)


@pytest.mark.parametrize(
    "vertices, faces, message",
    [
        (np.zeros((0, 3)), np.zeros((0, 3), np.int64), "non-empty"),
        (np.array([[0, 0, 0], [1, 0, 0], [np.nan, 1, 0]]), np.array([[0, 1, 2]]), "NaN"),
        (np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]]), np.array([[0, 1, 3]]), "face indices"),
        (np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]]), np.zeros((0, 3), np.int64), "faces"),
        (np.ones((3, 3)), np.array([[0, 1, 2]]), "zero size"),
    ],
)
def test_bad_meshes_fail_clearly(vertices, faces, message):
    with pytest.raises(ValueError, match=message):
        check_input_mesh(vertices, faces)
    with pytest.raises(ValueError, match=message):
        RefineMesh(RefineMeshRequest(prompt="a sphere", vertices=vertices, faces=faces), prior=object())


def test_bad_options_fail_clearly():
    with pytest.raises(ValueError, match="refine mode"):
        RefineConfig.from_preset("draft", mode="geometry")
    with pytest.raises(ValueError, match="unknown refine option"):
        RefineConfig.from_preset("draft", stepz=3)
    with pytest.raises(ValueError, match="unknown refine option"):  # one name per knob: the preset's
        RefineConfig.from_preset("draft", steps=3)
    with pytest.raises(ValueError, match="refine_steps must be >= 0"):  # preset knobs are checked by the preset
        RefineConfig.from_preset("draft", refine_steps=-1)
    cfg = RefineConfig.from_preset("standard", mode="texture", refine_steps=7, texture_size=128, sdf_lr=0.5)
    assert (cfg.refine_steps, cfg.texture_size, cfg.mode, cfg.sdf_lr) == (7, 128, "texture", 0.5)
    assert RefineConfig.from_preset("standard").refine_steps == 1000  # the preset's refine_steps
    request = RefineMeshRequest(prompt="a cube", vertices=np.eye(3), faces=np.array([[0, 1, 2]]))
    assert request.preset == DEFAULT_PRESET


def test_cli_refine(tmp_path, capsys):
    from engine_server.cli import main
    from engine_server.export import export_glb

    v, f = blender_cube()
    mesh_path = tmp_path / "cube.glb"
    uv = np.zeros((len(v), 2), np.float32)
    export_glb(mesh_path, v, f, uv, np.full((4, 4, 3), 200, np.uint8))
    out = tmp_path / "out.glb"
    assert main(["refine", str(mesh_path), "a red cube", "--out", str(out), "--mode", "texture", "--steps", "3"]) == 0
    assert out.exists() and out.with_suffix(".json").exists()
    loaded = load_glb(out)
    assert len(loaded.faces) == len(f)
    capsys.readouterr()

    assert main(["refine", str(tmp_path / "missing.glb"), "a red cube", "--out", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "no such mesh file" in err[0]
    assert main(["refine", str(mesh_path), "a purple elephant", "--out", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "elephant" in err[0]
