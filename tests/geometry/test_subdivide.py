from __future__ import annotations

import torch

from engine_server.geometry.marching_tets import TET_EDGES, marching_tets
from engine_server.geometry.mesh_utils import mesh_stats
from engine_server.geometry.shapes import sphere_sdf, torus_sdf
from engine_server.geometry.subdivide import subdivide_surface
from engine_server.geometry.tet_grid import grid_spacing, tet_grid


def _faces_of(tets: torch.Tensor) -> torch.Tensor:
    return tets[:, [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]].reshape(-1, 3).sort(1).values


def _surface_mask(tets, sdf):
    count = (sdf < 0).long()[tets].sum(1)
    return (count > 0) & (count < 4)


def test_subdivision_is_conforming_oriented_and_volume_preserving():
    r = 10
    vertices, tets = tet_grid(r)
    sdf = sphere_sdf(vertices, 0.52)
    sub = subdivide_surface(vertices, tets, sdf)
    assert sub.tets.shape[0] > tets.shape[0]
    p = sub.vertices.double()[sub.tets]
    vol = torch.linalg.det(p[:, 1:] - p[:, :1]) / 6
    assert (vol > 0).all()
    assert vol.sum().item() == torch.tensor(8.0, dtype=torch.float64).item() or abs(vol.sum().item() - 8.0) < 1e-6
    _, counts = torch.unique(_faces_of(sub.tets), dim=0, return_counts=True)
    assert counts.max() == 2  # no hanging vertex: every interior face has a twin
    assert (counts == 1).sum() == 12 * r * r  # the outer boundary is untouched
    # Old vertices come first and unchanged; new ones are midpoints of their parents.
    n = vertices.shape[0]
    assert torch.equal(sub.vertices[:n], vertices)
    mid = (vertices[sub.parents[n:, 0]] + vertices[sub.parents[n:, 1]]) / 2
    assert torch.allclose(sub.vertices[n:], mid)
    assert torch.allclose(sub.sdf[n:], (sdf[sub.parents[n:, 0]] + sdf[sub.parents[n:, 1]]) / 2)


def test_surface_tets_get_half_size_edges():
    vertices, tets = tet_grid(8)
    sdf = torus_sdf(vertices, 0.5, 0.25)
    sub = subdivide_surface(vertices, tets, sdf)
    h = grid_spacing(8)
    before = _surface_mask(tets, sdf)
    after = _surface_mask(sub.tets, sub.sdf)
    longest = lambda v, t: (v[t[:, TET_EDGES[:, 0]]] - v[t[:, TET_EDGES[:, 1]]]).norm(dim=-1).max(1).values
    assert torch.allclose(longest(vertices, tets[before]).max(), torch.tensor(3**0.5 * h))
    # After one subdivision, every sign-changing tet has edges at most half the old longest edge.
    assert longest(sub.vertices, sub.tets[after]).max() <= 3**0.5 * h / 2 + 1e-6


def test_surface_is_unchanged_and_stays_watertight_when_new_values_move():
    vertices, tets = tet_grid(12)
    sdf = sphere_sdf(vertices, 0.5)
    sub = subdivide_surface(vertices, tets, sdf)
    v0, f0 = marching_tets(vertices, tets, sdf)
    v1, f1 = marching_tets(sub.vertices, sub.tets, sub.sdf)
    s0, s1 = mesh_stats(v0, f0), mesh_stats(v1, f1)
    assert f1.shape[0] > 2 * f0.shape[0]  # doubled resolution near the surface
    assert abs(s1.signed_volume - s0.signed_volume) < 1e-5  # same piecewise-linear surface
    n = vertices.shape[0]
    moved = sub.sdf.clone()
    moved[n:] += 0.3 * grid_spacing(12) * torch.randn(moved.shape[0] - n)
    v2, f2 = marching_tets(sub.vertices, sub.tets, moved)
    s2 = mesh_stats(v2, f2)
    assert s2.is_watertight and s2.is_winding_consistent and s2.signed_volume > 0


def test_no_sign_change_is_a_no_op_and_gradients_flow():
    vertices, tets = tet_grid(3)
    sub = subdivide_surface(vertices, tets, torch.ones(vertices.shape[0]))
    assert torch.equal(sub.tets, tets) and torch.equal(sub.vertices, vertices)
    sdf = sphere_sdf(vertices, 0.5).requires_grad_(True)
    sub = subdivide_surface(vertices, tets, sdf)
    sub.sdf.sum().backward()
    assert sdf.grad.sum() == sub.sdf.shape[0]  # each new value is a mean of two parents
