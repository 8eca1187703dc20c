from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import trimesh

from engine_server.geometry.mesh_utils import (
    chamfer_distance,
    chamfer_loss,
    clean_mesh,
    mesh_stats,
    sample_points_on_mesh,
)


def test_mesh_stats_of_known_shapes():
    box = trimesh.creation.box(extents=(1, 2, 3))
    s = mesh_stats(box.vertices, box.faces)
    assert (s.n_vertices, s.n_faces, s.n_components) == (8, 12, 1)
    assert s.euler_characteristic == 2 and s.is_watertight and s.is_winding_consistent
    assert s.signed_volume == pytest.approx(6.0) and s.area == pytest.approx(22.0)
    torus = trimesh.creation.torus(major_radius=1.0, minor_radius=0.3)
    assert mesh_stats(torus.vertices, torus.faces).euler_characteristic == 0
    flipped = mesh_stats(box.vertices, np.asarray(box.faces)[:, ::-1])
    assert flipped.signed_volume == pytest.approx(-6.0)
    opened = mesh_stats(box.vertices, box.faces[:-1])
    assert not opened.is_watertight


def test_clean_mesh_merges_soup_drops_specks_and_fixes_winding():
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
    speck = trimesh.creation.icosphere(subdivisions=1, radius=0.01)
    speck.apply_translation((0.9, 0, 0))
    # Triangle soup (every face with its own vertices), some faces flipped, plus a tiny piece.
    faces = np.asarray(sphere.faces).copy()
    rng = np.random.default_rng(0)
    flip = rng.random(len(faces)) < 0.2
    faces[flip] = faces[flip][:, ::-1]
    soup_v = np.asarray(sphere.vertices)[faces].reshape(-1, 3)
    soup_f = np.arange(len(soup_v)).reshape(-1, 3)
    v = np.concatenate([soup_v, speck.vertices])
    f = np.concatenate([soup_f, np.asarray(speck.faces) + len(soup_v)])
    before = mesh_stats(v, f)
    assert not before.is_watertight and before.n_components > 2
    cv, cf = clean_mesh(v, f, min_component_fraction=0.01)
    after = mesh_stats(cv, cf)
    assert after.n_components == 1 and after.is_watertight and after.is_winding_consistent
    assert after.n_vertices == len(sphere.vertices) and after.n_faces == len(sphere.faces)
    assert after.euler_characteristic == 2
    assert after.signed_volume == pytest.approx(sphere.volume, rel=1e-5)
    assert cv.dtype == np.float32 and cf.dtype == np.int64


def test_clean_mesh_keeps_cavities_inward():
    outer = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    inner = trimesh.creation.icosphere(subdivisions=2, radius=0.25)
    v = np.concatenate([outer.vertices, inner.vertices])
    # Both written outward: the cavity must be turned inward so the shell's volume is right.
    f = np.concatenate([outer.faces, np.asarray(inner.faces) + len(outer.vertices)])
    cv, cf = clean_mesh(v, f, min_component_fraction=0.0)
    assert mesh_stats(cv, cf).signed_volume == pytest.approx(outer.volume - inner.volume, rel=1e-5)
    # A separate, inverted solid (not inside anything) is turned outward.
    other = inner.copy()
    other.apply_translation((2, 0, 0))
    v = np.concatenate([outer.vertices, other.vertices])
    f = np.concatenate([outer.faces, np.asarray(other.faces)[:, ::-1] + len(outer.vertices)])
    cv, cf = clean_mesh(v, f, min_component_fraction=0.0)
    assert mesh_stats(cv, cf).signed_volume == pytest.approx(outer.volume + other.volume, rel=1e-5)


def test_chamfer_distance_definition():
    a = trimesh.creation.icosphere(subdivisions=4, radius=0.5)
    n = 30_000
    assert chamfer_distance(a.vertices, a.faces, a.vertices, a.faces, n_samples=n) < 0.008  # sampling floor only
    b = trimesh.creation.icosphere(subdivisions=4, radius=0.55)
    # Concentric spheres 0.05 apart; normalised by b's size (1.1).
    assert chamfer_distance(a.vertices, a.faces, b.vertices, b.faces, n_samples=n) == pytest.approx(0.05 / 1.1, rel=0.1)
    assert chamfer_distance(a.vertices, a.faces, b.vertices, b.faces, n_samples=n, scale=1.0) == pytest.approx(0.05, rel=0.1)
    with pytest.raises(ValueError, match="non-empty"):
        chamfer_distance(a.vertices, a.faces[:0], b.vertices, b.faces)


def test_differentiable_sampling_and_chamfer_loss():
    box = trimesh.creation.box(extents=(1, 1, 1))
    v = torch.tensor(box.vertices, dtype=torch.float32, requires_grad=True)
    f = torch.as_tensor(np.asarray(box.faces))
    pts = sample_points_on_mesh(v, f, 5000, generator=torch.Generator().manual_seed(0))
    assert (pts.abs().max(1).values - 0.5).abs().max() < 1e-6  # all on the box surface
    target = sample_points_on_mesh(v.detach() * 1.2, f, 5000, generator=torch.Generator().manual_seed(1))
    loss = chamfer_loss(pts, target)
    loss.backward()
    assert 0.05 < loss.item() < 0.15
    # Growing the box reduces the loss: the gradient points inward on every corner.
    assert ((v.grad * v.detach()).sum(1) < 0).all()
    assert math.isfinite(loss.item())


def test_dihedral_ratio_is_one_on_icospheres_and_grows_with_bumps():
    from engine_server.geometry.mesh_utils import dihedral_angles, dihedral_ratio, ideal_sphere_dihedral

    for level in (3, 4):
        ico = trimesh.creation.icosphere(subdivisions=level)
        assert dihedral_ratio(ico.vertices, ico.faces) == pytest.approx(1.0, abs=0.02)
    # The measure does not depend on size, only on shape and face count.
    ico = trimesh.creation.icosphere(subdivisions=4)
    assert dihedral_ratio(ico.vertices * 7.0, ico.faces) == pytest.approx(dihedral_ratio(ico.vertices, ico.faces))
    rng = np.random.default_rng(0)
    bumpy = ico.vertices * (1.0 + 0.01 * rng.standard_normal((len(ico.vertices), 1)))
    assert dihedral_ratio(bumpy, ico.faces) > 3.0
    # A cube's interior edges are flat (0) or right angles (pi / 2).
    box = trimesh.creation.box()
    angles = np.sort(dihedral_angles(box.vertices, box.faces))
    assert np.allclose(angles[:6], 0.0, atol=1e-6) and np.allclose(angles[6:], np.pi / 2)
    assert ideal_sphere_dihedral(5120) == pytest.approx(0.634 * math.sqrt(16 * math.pi / (5120 * math.sqrt(3))))
    with pytest.raises(ValueError, match="n_faces"):
        ideal_sphere_dihedral(0)
