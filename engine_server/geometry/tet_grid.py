"""The tetrahedral lattice DMTet deforms: a cube grid over [-1, 1]^3, six tetrahedra per cube.

Each cube is split along its main diagonal (corner 000 to corner 111) into the six
Kuhn / Freudenthal tetrahedra, one per ordering of the axes. Every cube uses the
same diagonal direction, so the face diagonals of neighbouring cubes agree and the
tetrahedra form a conforming mesh (no T-junctions); all six are congruent, with
edges 1, sqrt(2), sqrt(3) in grid units. The grid vertices are exactly the sample
points of an ``(R + 1)^3`` volume, which is what marching cubes consumes, so the two
can be compared on identical SDF samples.

Layout (relied on by :func:`surface_tet_candidates`):

- vertex ``(i, j, k)`` at ``(-1 + 2i/R, -1 + 2j/R, -1 + 2k/R)`` has index
  ``(i * (R + 1) + j) * (R + 1) + k`` (``numpy.meshgrid(..., indexing="ij")`` order);
- cube ``(i, j, k)`` has index ``(i * R + j) * R + k`` and owns tetrahedra
  ``6 * cube .. 6 * cube + 5``.

All tetrahedra are positively oriented: ``det(v1 - v0, v2 - v0, v3 - v0) > 0``.
"""
from __future__ import annotations

import functools
import itertools
import logging

import torch

logger = logging.getLogger(__name__)

MAX_RESOLUTION = 512
"""Largest accepted resolution (6 * 512^3 tetrahedra is already 6 GB of indices)."""


def _kuhn_corner_table() -> torch.Tensor:
    """(6, 4) corner offsets (dx, dy, dz) as bit triples -> (6, 4, 3) int64, positively oriented."""
    tets = []
    for perm in itertools.permutations(range(3)):
        corner = [0, 0, 0]
        path = [tuple(corner)]
        for axis in perm:
            corner[axis] = 1
            path.append(tuple(corner))
        # The volume sign equals the permutation's parity: swap the last two for odd ones.
        inversions = sum(1 for a in range(3) for b in range(a + 1, 3) if perm[a] > perm[b])
        if inversions % 2:
            path[2], path[3] = path[3], path[2]
        tets.append(path)
    return torch.tensor(tets, dtype=torch.int64)


KUHN_CORNERS = _kuhn_corner_table()
"""(6, 4, 3): corner offsets of the six tetrahedra of a unit cube, positively oriented."""


def _check_resolution(resolution: int) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, int):
        raise TypeError(f"tet grid resolution must be an int, got {type(resolution).__name__}")
    if not 1 <= resolution <= MAX_RESOLUTION:
        raise ValueError(f"tet grid resolution must be in [1, {MAX_RESOLUTION}], got {resolution}")
    return resolution


@functools.lru_cache(maxsize=8)
def _tet_grid_cached(resolution: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    r = resolution
    n = r + 1
    axis = torch.linspace(-1.0, 1.0, n, dtype=torch.float32)
    # Exact endpoints and symmetric spacing: linspace may round the last value.
    axis[0], axis[-1] = -1.0, 1.0
    gx, gy, gz = torch.meshgrid(axis, axis, axis, indexing="ij")
    vertices = torch.stack([gx, gy, gz], dim=-1).reshape(-1, 3)

    idx = torch.arange(r, dtype=torch.int64)
    ci, cj, ck = torch.meshgrid(idx, idx, idx, indexing="ij")
    base = ((ci * n + cj) * n + ck).reshape(-1)  # (R^3,) vertex index of each cube's 000 corner
    c = KUHN_CORNERS
    offsets = (c[..., 0] * n + c[..., 1]) * n + c[..., 2]  # (6, 4)
    tets = (base[:, None, None] + offsets[None]).reshape(-1, 4)
    logger.debug("tet grid %d: %d vertices, %d tetrahedra", r, vertices.shape[0], tets.shape[0])
    return vertices.to(device), tets.to(device)


def tet_grid(resolution: int, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The cached lattice at ``resolution`` cubes per axis.

    Returns ``vertices`` (N, 3) float32 with N = (R+1)^3 filling [-1, 1]^3 and
    ``tets`` (M, 4) int64 with M = 6 R^3, positively oriented. The tensors are shared
    by every caller of the same resolution and device: do not modify them in place.
    """
    return _tet_grid_cached(_check_resolution(resolution), str(torch.device(device)))


def grid_spacing(resolution: int) -> float:
    """Edge length of one cube of the lattice (the grid spans 2 units)."""
    return 2.0 / _check_resolution(resolution)


def surface_cubes(sdf: torch.Tensor, resolution: int) -> torch.Tensor:
    """Indices (K,) of the cubes whose eight corners do not all share one side of the surface.

    ``sdf`` (N,) holds values at the lattice vertices; inside is ``sdf < 0``. This is a
    dense, slice-based test over the (R+1)^3 volume: no gather over the tetrahedra.
    """
    r = _check_resolution(resolution)
    n = r + 1
    if sdf.dim() != 1 or sdf.shape[0] != n**3:
        raise ValueError(f"sdf must have shape ({n ** 3},) for resolution {r}, got {tuple(sdf.shape)}")
    inside = (sdf.detach() < 0).view(n, n, n).to(torch.uint8)
    lo, hi = slice(0, r), slice(1, n)
    count = torch.zeros((r, r, r), dtype=torch.uint8, device=sdf.device)
    for sx in (lo, hi):
        for sy in (lo, hi):
            for sz in (lo, hi):
                count += inside[sx, sy, sz]
    mixed = (count > 0) & (count < 8)
    return mixed.reshape(-1).nonzero().squeeze(1)


def surface_tet_candidates(sdf: torch.Tensor, resolution: int) -> torch.Tensor:
    """Indices (6K,) of the tetrahedra of the lattice's mixed-sign cubes (a superset of the surface tets).

    Pass the result as ``candidates`` to :func:`~engine_server.geometry.marching_tets.marching_tets`
    to skip the per-tetrahedron occupancy pass over the whole grid. Valid for any
    deformation of the lattice vertices: it depends only on the signs and the topology.
    """
    cubes = surface_cubes(sdf, resolution)
    return (cubes[:, None] * 6 + torch.arange(6, device=cubes.device)).reshape(-1)
