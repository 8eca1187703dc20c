from __future__ import annotations

import pytest
import torch

from engine_server.geometry.shapes import sphere_sdf
from engine_server.geometry.tet_grid import grid_spacing, surface_tet_candidates, tet_grid


def _signed_volumes(vertices: torch.Tensor, tets: torch.Tensor) -> torch.Tensor:
    p = vertices.double()[tets]
    return torch.linalg.det(p[:, 1:] - p[:, :1]) / 6.0


@pytest.mark.parametrize("resolution", [1, 3, 8])
def test_grid_shapes_bounds_and_orientation(resolution):
    vertices, tets = tet_grid(resolution)
    assert vertices.dtype == torch.float32 and tets.dtype == torch.int64
    assert vertices.shape == ((resolution + 1) ** 3, 3)
    assert tets.shape == (6 * resolution**3, 4)
    assert vertices.min() == -1.0 and vertices.max() == 1.0
    vol = _signed_volumes(vertices, tets)
    expected = grid_spacing(resolution) ** 3 / 6
    assert torch.allclose(vol, torch.full_like(vol, expected), rtol=1e-4)  # all positive, congruent
    assert vol.sum().item() == pytest.approx(8.0, rel=1e-6)  # fills the cube exactly


def test_grid_is_conforming():
    r = 5
    vertices, tets = tet_grid(r)
    faces = tets[:, [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]].reshape(-1, 3).sort(1).values
    _, counts = torch.unique(faces, dim=0, return_counts=True)
    assert counts.max() == 2  # interior faces shared by exactly two tets, no T-junction
    assert (counts == 1).sum() == 6 * 2 * r * r  # boundary: two triangles per boundary square


def test_grid_is_cached_and_validated():
    a = tet_grid(6)
    b = tet_grid(6)
    assert a[0] is b[0] and a[1] is b[1]
    with pytest.raises(ValueError, match="resolution"):
        tet_grid(0)
    with pytest.raises(TypeError, match="int"):
        tet_grid(4.0)


def test_candidates_contain_every_surface_tet():
    r = 12
    vertices, tets = tet_grid(r)
    sdf = sphere_sdf(vertices, 0.61) + 0.05 * torch.randn(vertices.shape[0])
    inside = (sdf < 0).long()[tets].sum(1)
    surface = set(((inside > 0) & (inside < 4)).nonzero().squeeze(1).tolist())
    candidates = surface_tet_candidates(sdf, r)
    assert surface and surface <= set(candidates.tolist())
    assert candidates.numel() < tets.shape[0]
    with pytest.raises(ValueError, match="shape"):
        surface_tet_candidates(sdf[:-1], r)
