"""Feature-preserving smoothing, decimation to a face count, closest-point projection."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from engine_server.geometry import marching_tets, tet_grid
from engine_server.geometry.mesh_utils import dihedral_ratio, mesh_stats
from engine_server.geometry.shapes import box_sdf, sphere_sdf
from engine_server.geometry.surface import SmoothConfig, SurfaceProjector, decimate, smooth_surface


def _extract(sdf_fn, resolution: int = 40) -> tuple[np.ndarray, np.ndarray]:
    from engine_server.geometry.mesh_utils import clean_mesh

    verts, tets = tet_grid(resolution)
    v, f = marching_tets(verts, tets, sdf_fn(verts))
    return clean_mesh(v.numpy(), f.numpy())


def _noisy(v: np.ndarray, amount: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (v + amount * rng.standard_normal(v.shape)).astype(np.float32)


def _share_within(v: np.ndarray, f: np.ndarray, axes: np.ndarray, degrees: float = 5.0) -> float:
    """Area share of faces whose normal is within ``degrees`` of one of ``axes`` (either sign)."""
    n = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    area = np.linalg.norm(n, axis=1)
    cos = np.abs((n / np.maximum(area, 1e-30)[:, None]) @ axes.T).max(1)
    return float(area[cos > np.cos(np.radians(degrees))].sum() / area.sum())


def test_smoothing_removes_bumps_from_a_sphere_and_keeps_its_volume():
    v, f = _extract(lambda p: sphere_sdf(p, 0.4))
    bumpy = _noisy(v, 0.004)
    before = dihedral_ratio(bumpy, f)
    smooth = smooth_surface(bumpy, f)
    assert before > 3.0 and dihedral_ratio(smooth, f) < 0.5 * before
    assert mesh_stats(smooth, f).signed_volume == pytest.approx(mesh_stats(bumpy, f).signed_volume, rel=0.02)


def test_smoothing_keeps_a_cubes_faces_flat_and_its_edges_sharp():
    v, f = _extract(lambda p: box_sdf(p, 0.3))
    bumpy = _noisy(v, 0.003)
    axes = np.eye(3)
    smooth = smooth_surface(bumpy, f)
    assert _share_within(smooth, f, axes) > _share_within(bumpy, f, axes) + 0.2
    assert _share_within(smooth, f, axes) > 0.8
    # Edges stay where they were: the box keeps its extent.
    assert np.allclose(smooth.max(0) - smooth.min(0), v.max(0) - v.min(0), atol=0.02)


def test_smoothing_rejects_bad_input():
    with pytest.raises(ValueError, match="sigma_normal"):
        SmoothConfig(sigma_normal=0)
    with pytest.raises(ValueError, match="iterations"):
        SmoothConfig(vertex_iterations=-1)
    with pytest.raises(ValueError, match=r"\(V, 3\)"):
        smooth_surface(np.zeros((4, 2)), np.zeros((1, 3), int))


@pytest.mark.parametrize("target", [500, 2000, 4999])
def test_decimate_never_exceeds_the_target_and_stays_closed(target):
    ico = trimesh.creation.icosphere(subdivisions=5)
    v, f = decimate(np.asarray(ico.vertices), np.asarray(ico.faces), target)
    assert len(f) <= target and len(f) > 0.9 * target
    stats = mesh_stats(v, f)
    assert stats.is_watertight and stats.n_components == 1 and stats.signed_volume > 0


def test_decimate_holds_the_cap_when_the_library_stops_above_it():
    # At low aggressiveness fast-simplification stops well above the target (13k of 5k on an extraction).
    ico = trimesh.creation.icosphere(subdivisions=5)
    v, f = decimate(np.asarray(ico.vertices), np.asarray(ico.faces), 800, aggressiveness=0.5)
    assert len(f) <= 800 and mesh_stats(v, f).is_watertight


def test_decimate_keeps_a_small_mesh_and_rejects_silly_targets():
    box = trimesh.creation.box()
    v, f = decimate(np.asarray(box.vertices), np.asarray(box.faces), 100)
    assert len(f) == 12
    with pytest.raises(ValueError, match="face-count target"):
        decimate(np.asarray(box.vertices), np.asarray(box.faces), 3)


def test_projector_finds_the_nearest_surface_point_and_its_smooth_normal():
    ico = trimesh.creation.icosphere(subdivisions=4, radius=0.5)
    proj = SurfaceProjector(np.asarray(ico.vertices), np.asarray(ico.faces))
    rng = np.random.default_rng(0)
    d = rng.standard_normal((1000, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    points = torch.as_tensor(d * rng.uniform(0.45, 0.55, (1000, 1)), dtype=torch.float32)
    p, n = proj.project(points)
    # On the icosphere (radius within its flat facets' sag) and the normal is the sphere's, radially out.
    assert torch.allclose(p.norm(dim=1), torch.full((1000,), 0.5), atol=0.005)
    assert float((n * torch.as_tensor(d, dtype=torch.float32)).sum(1).min()) > 0.995


def test_a_spiky_surface_that_cannot_stay_closed_comes_back_open_with_a_warning(caplog):
    """A job must keep its result: when no setting keeps a very spiky closed surface closed within the budget, the
    decimated mesh comes back open (the cap still holds) and the log says so."""
    import logging

    from engine_server.geometry.mesh_utils import mesh_stats

    sphere = trimesh.creation.icosphere(subdivisions=4)
    spikes = 1 + 0.5 * np.random.default_rng(0).standard_normal((len(sphere.vertices), 1)).clip(-0.99, 3)
    with caplog.at_level(logging.WARNING, logger="engine_server.geometry.surface"):
        v, f = decimate((sphere.vertices * spikes).astype(np.float32), sphere.faces, 40)
    assert len(f) <= 40 and not mesh_stats(v, f).is_watertight
    assert "the mesh is open" in caplog.text
