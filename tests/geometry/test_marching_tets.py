from __future__ import annotations

import itertools

import pytest
import torch

from engine_server.geometry.marching_tets import marching_tets
from engine_server.geometry.mesh_utils import mesh_stats
from engine_server.geometry.shapes import sphere_sdf, sphere_volume, torus_sdf, torus_volume
from engine_server.geometry.tet_grid import grid_spacing, surface_tet_candidates, tet_grid


def test_sphere_resolution_64_is_closed_genus_0_with_accurate_volume():
    vertices, tets = tet_grid(64)
    verts, faces = marching_tets(vertices, tets, sphere_sdf(vertices, 0.5))
    stats = mesh_stats(verts, faces)
    assert stats.is_watertight and stats.is_winding_consistent
    assert stats.n_components == 1
    assert stats.euler_characteristic == 2
    assert stats.signed_volume > 0  # outward faces
    assert abs(stats.signed_volume / sphere_volume(0.5) - 1) < 0.02
    # Every vertex lies on the sphere up to the chord error of linear interpolation.
    assert (verts.norm(dim=1) - 0.5).abs().max() < grid_spacing(64) ** 2


def test_torus_is_closed_genus_1():
    vertices, tets = tet_grid(64)
    verts, faces = marching_tets(vertices, tets, torus_sdf(vertices, 0.5, 0.2))
    stats = mesh_stats(verts, faces)
    assert stats.is_watertight and stats.n_components == 1
    assert stats.euler_characteristic == 0
    assert abs(stats.signed_volume / torus_volume(0.5, 0.2) - 1) < 0.03


@pytest.mark.parametrize("value", [1.0, -1.0, 0.0])
def test_no_zero_crossing_gives_empty_mesh(value):
    vertices, tets = tet_grid(4)
    sdf = torch.full((vertices.shape[0],), value)
    verts, faces = marching_tets(vertices, tets, sdf)
    assert verts.shape == (0, 3) and faces.shape == (0, 3)
    verts, faces = marching_tets(vertices, tets, sdf, candidates=surface_tet_candidates(sdf, 4))
    assert verts.shape == (0, 3) and faces.shape == (0, 3)


def test_every_case_faces_outward_on_a_deformed_tet():
    """All 14 sign cases on one random positively oriented tet: normals point to the outside corners."""
    gen = torch.Generator().manual_seed(1)
    for trial in range(20):
        tet = torch.rand(4, 3, generator=gen, dtype=torch.float64)
        if torch.linalg.det(tet[1:] - tet[:1]) < 0:
            tet = tet[[0, 1, 3, 2]]
        for signs in itertools.product([-1.0, 1.0], repeat=4):
            if len(set(signs)) == 1:
                continue
            sdf = torch.tensor(signs, dtype=torch.float64) * (0.1 + torch.rand(4, generator=gen, dtype=torch.float64))
            verts, faces = marching_tets(tet, torch.tensor([[0, 1, 2, 3]]), sdf)
            n_inside = sum(s < 0 for s in signs)
            assert faces.shape[0] == (2 if n_inside == 2 else 1)
            outward = tet[sdf >= 0].mean(0) - tet[sdf < 0].mean(0)
            for f in faces:
                p = verts[f]
                normal = torch.linalg.cross(p[1] - p[0], p[2] - p[0])
                assert normal @ outward > 0
            # Interpolated vertices are zeros of the linear SDF along their edges.
            assert verts.shape[0] == (4 if n_inside == 2 else 3)


def test_deformed_grid_stays_watertight_and_outward():
    vertices, tets = tet_grid(24)
    h = grid_spacing(24)
    deformed = vertices + 0.4 * h * (2 * torch.rand_like(vertices) - 1)
    sdf = sphere_sdf(deformed, 0.55)
    verts, faces = marching_tets(deformed, tets, sdf)
    stats = mesh_stats(verts, faces)
    assert stats.is_watertight and stats.euler_characteristic == 2 and stats.signed_volume > 0


def test_candidates_path_matches_generic_path():
    vertices, tets = tet_grid(20)
    sdf = torus_sdf(vertices, 0.45, 0.2) + 0.02 * torch.randn(vertices.shape[0])
    v1, f1 = marching_tets(vertices, tets, sdf)
    v2, f2 = marching_tets(vertices, tets, sdf, candidates=surface_tet_candidates(sdf, 20))
    assert torch.equal(v1, v2)
    assert sorted(map(tuple, f1.tolist())) == sorted(map(tuple, f2.tolist()))


def test_gradcheck_sdf_and_vertices():
    vertices, tets = tet_grid(4)
    vertices = vertices.double()
    base_sdf = sphere_sdf(vertices, 0.6) + 0.05 * torch.randn(vertices.shape[0], dtype=torch.float64)
    base_sdf = torch.where(base_sdf.abs() < 0.02, torch.full_like(base_sdf, 0.05), base_sdf)  # no sign flip under eps
    offsets = 0.05 * torch.randn_like(vertices)
    sdf = base_sdf.clone().requires_grad_(True)
    deformation = offsets.clone().requires_grad_(True)

    def extract(s, d):
        verts, _ = marching_tets(vertices + d, tets, s)
        return verts

    assert extract(sdf, deformation).shape[0] > 0
    assert torch.autograd.gradcheck(extract, (sdf, deformation), eps=1e-6, atol=1e-5)


def test_gradients_reach_sdf_and_vertices_in_float32():
    vertices, tets = tet_grid(8)
    vertices = vertices.clone().requires_grad_(True)
    sdf = sphere_sdf(vertices.detach(), 0.5).requires_grad_(True)
    verts, faces = marching_tets(vertices, tets, sdf)
    verts.norm(dim=1).sum().backward()
    assert sdf.grad.abs().sum() > 0 and vertices.grad.abs().sum() > 0
    # Only vertices of sign-changing edges get a gradient.
    assert (sdf.grad != 0).sum() < sdf.numel()


def test_return_edges_identify_sign_changes():
    vertices, tets = tet_grid(8)
    sdf = sphere_sdf(vertices, 0.5)
    verts, faces, edges = marching_tets(vertices, tets, sdf, return_edges=True)
    assert edges.shape == (verts.shape[0], 2)
    assert ((sdf[edges[:, 0]] < 0) != (sdf[edges[:, 1]] < 0)).all()
    t = ((verts - vertices[edges[:, 0]]).norm(dim=1) / (vertices[edges[:, 1]] - vertices[edges[:, 0]]).norm(dim=1))
    assert ((t >= 0) & (t <= 1)).all()


def test_bad_inputs_are_named():
    vertices, tets = tet_grid(2)
    sdf = torch.zeros(vertices.shape[0])
    with pytest.raises(ValueError, match="sdf must have shape"):
        marching_tets(vertices, tets, sdf[:-1])
    with pytest.raises(ValueError, match="tets must have shape"):
        marching_tets(vertices, tets[:, :3], sdf)
    with pytest.raises(TypeError, match="tets must be int64"):
        marching_tets(vertices, tets.float(), sdf)


@pytest.mark.cuda
def test_cuda_matches_cpu():
    vertices, tets = tet_grid(32)
    sdf = torus_sdf(vertices, 0.5, 0.2)
    v1, f1 = marching_tets(vertices, tets, sdf)
    dev = torch.device("cuda")
    v2, f2 = marching_tets(vertices.to(dev), tets.to(dev), sdf.to(dev),
                           candidates=surface_tet_candidates(sdf.to(dev), 32))
    assert torch.allclose(v1, v2.cpu(), atol=1e-6)
    assert f1.shape == f2.shape
