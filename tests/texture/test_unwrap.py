"""xatlas unwrapping: topology kept, UVs in range and sane, per-corner UVs, input checks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from engine_server.texture import UnwrapConfig, UVMesh, flip_v, unwrap, usable_uvs, uv_mesh_from_corner_uvs


@pytest.fixture(scope="module")
def sphere():
    m = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
    return m.vertices.astype(np.float32), m.faces.astype(np.int64)


@pytest.fixture(scope="module")
def sphere_uv(sphere):
    v, f = sphere
    return unwrap(v, f, UnwrapConfig(texture_size=256))


def _uv_area(uvs: np.ndarray, faces: np.ndarray) -> np.ndarray:
    t = uvs[faces].astype(np.float64)
    e1, e2 = t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]
    return 0.5 * np.abs(e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0])


def test_unwrap_keeps_faces_and_maps_back(sphere, sphere_uv):
    v, f = sphere
    um = sphere_uv
    assert um.faces.shape == f.shape
    assert len(um.vertices) >= len(v)  # seams split vertices
    np.testing.assert_array_equal(um.vmapping[um.faces], f)  # same triangles, same order
    np.testing.assert_array_equal(um.vertices, v[um.vmapping])
    assert um.uvs.min() >= 0.0 and um.uvs.max() <= 1.0


def test_unwrap_has_low_stretch_and_no_overlap(sphere, sphere_uv):
    v, f = sphere
    um = sphere_uv
    uv_area = _uv_area(um.uvs, um.faces)
    p = v[f].astype(np.float64)
    area3d = 0.5 * np.linalg.norm(np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]), axis=1)
    ratio = uv_area / area3d
    rel = ratio / np.median(ratio)
    assert np.mean((rel > 0.5) & (rel < 2.0)) > 0.95
    # Charts do not overlap: the triangles' UV areas add up to no more than the covered area
    # measured by rasterizing (within the rasterization's resolution).
    from engine_server.texture import rasterize_uv

    r = rasterize_uv(um, 512, conservative=False)
    covered = r.inside.float().mean().item()
    assert uv_area.sum() == pytest.approx(covered, rel=0.03)


def test_unwrap_accepts_torch_and_handles_degenerate_faces():
    v = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [2, 2, 0]], dtype=torch.float32)
    f = torch.tensor([[0, 1, 2], [1, 3, 2], [0, 0, 1], [0, 3, 4]])  # last two have zero area
    um = unwrap(v, f)
    assert um.faces.shape == (4, 3)
    area = _uv_area(um.uvs, um.faces)
    assert area[0] > 0 and area[1] > 0
    assert area[2] == pytest.approx(0.0, abs=1e-9) and area[3] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize(
    ("vertices", "faces", "error"),
    [
        (np.zeros((4, 2)), np.array([[0, 1, 2]]), ValueError),
        (np.zeros((4, 3)), np.array([[0, 1, 2, 3]]), ValueError),
        (np.zeros((4, 3)), np.array([[0, 1, 4]]), ValueError),
        (np.zeros((4, 3)), np.array([[0.0, 1.0, 2.0]]), TypeError),
        (np.full((4, 3), np.nan), np.array([[0, 1, 2]]), ValueError),
        (np.zeros((4, 3)), np.zeros((0, 3), dtype=int), ValueError),
    ],
)
def test_unwrap_rejects_bad_meshes(vertices, faces, error):
    with pytest.raises(error):
        unwrap(vertices, faces)


def test_unwrap_config_rejects_bad_values():
    with pytest.raises(ValueError, match="padding"):
        UnwrapConfig(padding=-1)
    with pytest.raises(ValueError, match="texture_size"):
        UnwrapConfig(texture_size=2)


def test_corner_uvs_split_vertices_only_on_seams():
    # A unit square of two triangles; the shared edge (1, 2) has the same UVs on both sides
    # at vertex 1 but different UVs at vertex 2, so only vertex 2 splits.
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]], dtype=np.float32)
    f = np.array([[0, 1, 2], [1, 3, 2]])
    corner = np.array(
        [[[0.0, 0.0], [0.5, 0.0], [0.0, 0.5]], [[0.5, 0.0], [1.0, 1.0], [0.6, 0.6]]], dtype=np.float32
    )
    um = uv_mesh_from_corner_uvs(v, f, corner)
    assert len(um.vertices) == 5
    np.testing.assert_array_equal(um.vmapping[um.faces], f)
    np.testing.assert_allclose(um.uvs[um.faces], corner)
    with pytest.raises(ValueError, match="corner_uvs"):
        uv_mesh_from_corner_uvs(v, f, corner[:, :2])


def test_usable_uvs_and_flip_v():
    f = np.array([[0, 1, 2]])
    good = np.array([[0.1, 0.1], [0.9, 0.1], [0.1, 0.9]])
    assert usable_uvs(good, f)
    assert not usable_uvs(np.zeros((3, 2)), f)  # no area
    assert not usable_uvs(good + 1.0, f)  # outside [0, 1]
    assert not usable_uvs(np.where(good > 0.5, np.nan, good), f)
    np.testing.assert_allclose(flip_v(good)[:, 1], 1.0 - good[:, 1], rtol=1e-6)
    np.testing.assert_allclose(flip_v(flip_v(good)), good, rtol=1e-6)


def test_uvmesh_validates_shapes():
    with pytest.raises(ValueError, match="uvs"):
        UVMesh(vertices=np.zeros((3, 3)), faces=np.array([[0, 1, 2]]), uvs=np.zeros((2, 2)), vmapping=np.arange(3))
    with pytest.raises(ValueError, match="index"):
        UVMesh(vertices=np.zeros((3, 3)), faces=np.array([[0, 1, 3]]), uvs=np.zeros((3, 2)), vmapping=np.arange(3))
