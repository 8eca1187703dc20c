from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from engine_server.geometry.dmtet import DMTet, DMTetConfig
from engine_server.geometry.mesh_sdf import normalize_mesh
from engine_server.geometry.mesh_utils import chamfer_distance, chamfer_loss, mesh_stats, sample_points_on_mesh
from engine_server.geometry.shapes import box_sdf, sphere_sdf


@pytest.mark.parametrize("name", ["box", "icosphere"])
def test_mesh_initialisation_reproduces_the_input(name):
    mesh = (trimesh.creation.box(extents=(2.0, 2.0, 2.0)) if name == "box"
            else trimesh.creation.icosphere(subdivisions=3, radius=1.0))
    vertices, transform = normalize_mesh(mesh.vertices)
    model = DMTet.from_mesh(vertices, mesh.faces, DMTetConfig(resolution=64))
    v, f = model.extract_mesh()
    stats = mesh_stats(v, f)
    assert stats.is_watertight and stats.n_components == 1 and stats.euler_characteristic == 2
    assert stats.signed_volume > 0
    cd = chamfer_distance(v, f, vertices, mesh.faces, n_samples=50_000)
    assert cd < 0.02
    # Back in the input's frame, the result sits on the original mesh.
    assert chamfer_distance(transform.invert(v), f, mesh.vertices, mesh.faces, n_samples=20_000) < 0.02


def test_mesh_initialisation_rejects_meshes_outside_the_grid():
    mesh = trimesh.creation.box(extents=(3.0, 3.0, 3.0))
    with pytest.raises(ValueError, match="normalize"):
        DMTet.from_mesh(mesh.vertices, mesh.faces, DMTetConfig(resolution=8))


@pytest.mark.slow
def test_fit_sphere_to_cube_through_the_extracted_mesh():
    """Optimise SDF + deformation with a Chamfer loss on points sampled on the extracted mesh."""
    cube = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    gen = torch.Generator().manual_seed(0)
    target = sample_points_on_mesh(torch.as_tensor(cube.vertices, dtype=torch.float32),
                                   torch.as_tensor(np.asarray(cube.faces)), 20_000, generator=gen)
    model = DMTet.from_sdf_fn(lambda p: sphere_sdf(p, 0.55), DMTetConfig(resolution=32))
    v0, f0 = model.extract_mesh()
    start = chamfer_distance(v0, f0, cube.vertices, cube.faces, n_samples=30_000)
    optimizer = torch.optim.Adam([
        {"params": [model.sdf], "lr": 5e-3},
        {"params": [model.deformation_raw], "lr": 5e-2},
    ])
    # Small tensors: one thread avoids OpenMP overhead (and stalls when the CPU is shared).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(70):
            mesh = model()
            points = sample_points_on_mesh(mesh["vertices"], mesh["faces"], 3000, generator=gen)
            loss = chamfer_loss(points, target[torch.randint(0, len(target), (3000,), generator=gen)])
            reg = model.regularizers(mesh)
            total = loss + 0.01 * reg["sdf_sign_flip"] + 0.05 * reg["normal_consistency"] + 1e-3 * reg["deformation"]
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    v, f = model.extract_mesh()
    cd = chamfer_distance(v, f, cube.vertices, cube.faces, n_samples=50_000)
    stats = mesh_stats(v, f)
    assert start > 0.04  # the sphere really was far from the cube
    assert cd < 0.02
    assert stats.is_watertight and stats.n_components == 1 and stats.signed_volume > 0
    # The deformation stayed within its bound.
    assert model.deformation.abs().max() <= model.config.deformation_bound * model.spacing + 1e-7


def test_density_initialisation_redistances():
    def density(p):
        return 10.0 * torch.exp(-(p.norm(dim=-1) / 0.4) ** 2)  # > 5 inside r = 0.4 * sqrt(ln 2)

    model = DMTet.from_sdf_fn(density, DMTetConfig(resolution=24), kind="density", threshold=5.0)
    radius = 0.4 * np.sqrt(np.log(2.0))
    expected = sphere_sdf(model.base_vertices, radius)
    near = expected.abs() < 0.2
    # Metric, not density units: close to the true signed distance near the surface.
    assert (model.sdf.detach()[near] - expected[near]).abs().max() < 0.02
    v, f = model.extract_mesh()
    assert abs(mesh_stats(v, f).signed_volume / (4 / 3 * np.pi * radius**3) - 1) < 0.05
    with pytest.raises(ValueError, match="kind"):
        DMTet.from_sdf_fn(density, DMTetConfig(resolution=4), kind="occupancy")


def test_regularisers_and_gradients():
    model = DMTet.from_sdf_fn(lambda p: box_sdf(p, 0.4), DMTetConfig(resolution=16))
    with torch.no_grad():
        model.deformation_raw.normal_(0, 3.0)  # saturate the tanh: offsets stay bounded
    assert model.deformation.abs().max() <= model.config.deformation_bound * model.spacing + 1e-7
    mesh = model()
    reg = model.regularizers(mesh)
    assert set(reg) == {"sdf_sign_flip", "deformation", "laplacian", "normal_consistency"}
    total = sum(reg.values())
    total.backward()
    assert torch.isfinite(total)
    assert model.sdf.grad.abs().sum() > 0 and model.deformation_raw.grad.abs().sum() > 0
    empty = DMTet(DMTetConfig(resolution=4), torch.ones(125))
    out = empty()
    assert out["faces"].shape == (0, 3)
    assert all(v.item() == 0 for k, v in empty.regularizers(out).items() if k != "deformation")


def test_subdivision_refines_and_round_trips_through_state_dict():
    model = DMTet.from_sdf_fn(lambda p: sphere_sdf(p, 0.5), DMTetConfig(resolution=12))
    v0, f0 = model.extract_mesh(clean=False)
    model.subdivide_surface()
    v1, f1 = model.extract_mesh(clean=False)
    assert len(f1) > 2 * len(f0)
    assert mesh_stats(v1, f1).signed_volume == pytest.approx(mesh_stats(v0, f0).signed_volume, rel=1e-5)
    state = model.state_dict()
    fresh = DMTet(DMTetConfig(resolution=12))
    fresh.load_state_dict(state)
    v2, f2 = fresh.extract_mesh(clean=False)
    assert np.allclose(v1, v2) and np.array_equal(f1, f2)
    assert fresh.spacing == pytest.approx(model.spacing)
    # A lattice model's state holds only parameters: the grid is rebuilt from the config.
    assert set(DMTet(DMTetConfig(resolution=4)).state_dict()) == {"sdf", "deformation_raw"}
