from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from engine_server.geometry.mesh_sdf import (
    closest_point_on_triangles,
    mesh_to_sdf,
    normalize_mesh,
    unsigned_distance,
    winding_number,
)


def test_normalize_mesh_fits_unit_box_and_inverts():
    mesh = trimesh.creation.box(extents=(4.0, 2.0, 1.0))
    mesh.apply_translation((10.0, -3.0, 2.0))
    v, transform = normalize_mesh(mesh.vertices)
    assert np.allclose(v.max(0), [0.5, 0.25, 0.125]) and np.allclose(v.min(0), [-0.5, -0.25, -0.125])
    assert np.allclose(transform.invert(v), mesh.vertices)
    homogeneous = np.c_[v, np.ones(len(v))] @ transform.matrix().T
    assert np.allclose(homogeneous[:, :3], mesh.vertices)
    with pytest.raises(ValueError, match="bounding box"):
        normalize_mesh(np.zeros((3, 3)))


def test_winding_number_tree_matches_exact_sum():
    mesh = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
    points = torch.rand(1500, 3) * 2 - 1
    fast = winding_number(points, mesh.vertices, mesh.faces)
    exact = winding_number(points, mesh.vertices, mesh.faces, beta=1e9)  # never uses the far field
    assert (fast - exact).abs().max() < 0.05
    r = points.norm(dim=1)
    assert (exact[r < 0.45] - 1).abs().max() < 1e-3
    assert exact[r > 0.55].abs().max() < 1e-3


def _reference_distance(points: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Brute force: min over triangles of (plane distance if the projection is inside, else edge distances)."""
    out = np.full(len(points), np.inf)
    for a, b, c in triangles:
        n = np.cross(b - a, c - a)
        n /= np.linalg.norm(n)
        proj = points - ((points - a) @ n)[:, None] * n
        inside = np.ones(len(points), bool)
        for p0, p1 in ((a, b), (b, c), (c, a)):
            inside &= (np.cross(p1 - p0, proj - p0) @ n) >= 0
        d = np.where(inside, np.abs((points - a) @ n), np.inf)
        for p0, p1 in ((a, b), (b, c), (c, a)):
            t = np.clip(((points - p0) @ (p1 - p0)) / ((p1 - p0) @ (p1 - p0)), 0, 1)
            d = np.minimum(d, np.linalg.norm(points - (p0 + t[:, None] * (p1 - p0)), axis=1))
        out = np.minimum(out, d)
    return out


def test_closest_point_on_triangles_against_brute_force():
    mesh = trimesh.creation.icosphere(subdivisions=1, radius=0.5)
    rng = np.random.default_rng(0)
    points = rng.uniform(-1, 1, (400, 3))
    expected = _reference_distance(points, np.asarray(mesh.triangles))
    tri = torch.as_tensor(np.array(mesh.triangles))
    p = torch.as_tensor(points)[:, None].expand(-1, len(tri), -1)
    ours = (closest_point_on_triangles(p, tri[None].expand(len(points), -1, -1, -1)) - p).norm(dim=-1).min(1).values
    assert np.allclose(ours.numpy(), expected, atol=1e-9)


def test_unsigned_distance_is_exact_near_surface():
    mesh = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    rng = np.random.default_rng(1)
    directions = rng.normal(size=(500, 3))
    points = directions / np.linalg.norm(directions, axis=1, keepdims=True) * rng.uniform(0.42, 0.58, (500, 1))
    expected = _reference_distance(points, np.asarray(mesh.triangles))
    ours = unsigned_distance(points, mesh.vertices, mesh.faces).numpy()
    assert np.abs(ours - expected).max() < 1e-5
    far = unsigned_distance(np.array([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]]), mesh.vertices, mesh.faces).numpy()
    assert np.allclose(far, _reference_distance(np.array([[0.0, 0, 0], [2.0, 0, 0]]), np.asarray(mesh.triangles)),
                       atol=0.05)  # far field: within the coarse sample spacing


def _sphere_queries(n=20000):
    rng = np.random.default_rng(2)
    points = rng.uniform(-1, 1, (n, 3))
    r = np.linalg.norm(points, axis=1)
    keep = np.abs(r - 0.5) > 0.05  # clear of the surface, where the sign is well defined
    return points[keep], r[keep]


def test_mesh_to_sdf_signs_and_magnitudes_on_a_sphere():
    mesh = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
    points, r = _sphere_queries()
    sdf = mesh_to_sdf(points, mesh.vertices, mesh.faces).numpy()
    assert ((sdf < 0) == (r < 0.5)).all()
    near = np.abs(r - 0.5) < 0.09
    assert np.abs(sdf[near] - (r[near] - 0.5)).max() < 0.01  # polygonal vs true sphere


def test_mesh_to_sdf_is_robust_to_holes_and_flipped_faces():
    mesh = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
    rng = np.random.default_rng(3)
    faces = np.asarray(mesh.faces).copy()
    faces = faces[rng.random(len(faces)) > 0.03]  # ~3% of the faces missing: many small holes
    flip = rng.random(len(faces)) < 0.15
    faces[flip] = faces[flip][:, ::-1]  # and 15% wound the wrong way
    points, r = _sphere_queries()
    sdf = mesh_to_sdf(points, mesh.vertices, faces).numpy()
    assert ((sdf < 0) == (r < 0.5)).mean() > 0.999
    # Without the orientation repair the flipped faces really do corrupt the sign.
    broken = mesh_to_sdf(points, mesh.vertices, faces, repair_orientation=False).numpy()
    assert ((broken < 0) == (r < 0.5)).mean() < ((sdf < 0) == (r < 0.5)).mean()


def test_mesh_to_sdf_inverted_mesh_and_bad_input():
    mesh = trimesh.creation.box(extents=(1, 1, 1))
    points = np.array([[0.0, 0.0, 0.0], [0.9, 0.0, 0.0], [0.47, 0.1, 0.0], [0.1, 0.53, 0.2]])
    sdf = mesh_to_sdf(points, mesh.vertices, np.asarray(mesh.faces)[:, ::-1]).numpy()
    assert sdf[0] == pytest.approx(-0.5, abs=0.05) and sdf[1] == pytest.approx(0.4, abs=0.05)  # far field
    assert sdf[2] == pytest.approx(-0.03, abs=1e-6) and sdf[3] == pytest.approx(0.03, abs=1e-6)  # exact band
    with pytest.raises(ValueError, match="faces"):
        mesh_to_sdf(points, mesh.vertices, np.asarray(mesh.faces)[:, :2])
    with pytest.raises(ValueError, match="outside"):
        mesh_to_sdf(points, mesh.vertices, np.asarray(mesh.faces) + 100)
