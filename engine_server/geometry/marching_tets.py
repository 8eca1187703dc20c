"""Marching tetrahedra: the zero level set of a per-vertex SDF on a tetrahedral mesh.

Sign convention: ``sdf < 0`` is inside, ``sdf >= 0`` outside (a vertex exactly at zero
counts as outside). A mesh vertex is placed on every grid edge whose endpoints
differ in sign, where the linear interpolant of the SDF vanishes::

    v_ab = (v_a * s_b - v_b * s_a) / (s_b - s_a)

Edges are identified by their sorted endpoint pair, so a vertex is shared by every
triangle that uses the edge, whichever tetrahedron produced it: the mesh is watertight
wherever the surface is closed and does not leave the grid. Triangles face outward
(from ``sdf < 0`` towards ``sdf > 0``) provided the tetrahedra are positively
oriented, which :func:`~engine_server.geometry.tet_grid.tet_grid` guarantees. The
output is built from plain differentiable torch ops, so gradients reach both ``sdf``
and ``vertices``, on any device.
"""
from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

TET_EDGES = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]], dtype=torch.int64)
"""(6, 2): local vertex pairs of a tetrahedron's edges; edge e joins TET_EDGES[e]."""

_REFERENCE_TET = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)


def _edge_index(a: int, b: int) -> int:
    return TET_EDGES.tolist().index(sorted([a, b]))


def _build_triangle_table() -> tuple[torch.Tensor, torch.Tensor]:
    """16-case table: (16, 2, 3) local edge ids per triangle (-1 unused) and (16,) triangle counts.

    Case bit i is set when vertex i is inside. Each triangle is oriented on the
    reference tetrahedron so its normal points from the inside vertices to the
    outside ones; an orientation-preserving affine map keeps that, and so does moving
    the vertices anywhere strictly inside their edges (the sign of the relevant
    determinants is a product of positive edge parameters).
    """
    table = torch.full((16, 2, 3), -1, dtype=torch.int64)
    count = torch.zeros(16, dtype=torch.int64)
    ref = _REFERENCE_TET
    mid = (ref[TET_EDGES[:, 0]] + ref[TET_EDGES[:, 1]]) / 2  # (6, 3) edge midpoints
    for code in range(1, 15):
        inside = [i for i in range(4) if code >> i & 1]
        outside = [i for i in range(4) if not code >> i & 1]
        if len(inside) in (1, 3):
            lone, others = (inside[0], outside) if len(inside) == 1 else (outside[0], inside)
            tris = [[_edge_index(lone, o) for o in others]]
        else:
            (a, b), (c, d) = inside, outside
            ring = [_edge_index(a, c), _edge_index(a, d), _edge_index(b, d), _edge_index(b, c)]
            tris = [[ring[0], ring[1], ring[2]], [ring[0], ring[2], ring[3]]]
        outward = ref[outside].mean(0) - ref[inside].mean(0)
        for t, tri in enumerate(tris):
            p = mid[tri]
            normal = torch.linalg.cross(p[1] - p[0], p[2] - p[0])
            if float(normal @ outward) < 0:
                tri = [tri[0], tri[2], tri[1]]
            table[code, t] = torch.tensor(tri)
        count[code] = len(tris)
    return table, count


TRIANGLE_TABLE, TRIANGLE_COUNT = _build_triangle_table()
"""Marching-tetrahedra case table (see :func:`_build_triangle_table`)."""


def _build_crossing_slots() -> torch.Tensor:
    """(16, 4): for each case, the local edges whose endpoints differ in sign (-1 padded)."""
    slots = torch.full((16, 4), -1, dtype=torch.int64)
    for code in range(16):
        crossing = [e for e, (i, j) in enumerate(TET_EDGES.tolist()) if (code >> i & 1) != (code >> j & 1)]
        slots[code, : len(crossing)] = torch.tensor(crossing, dtype=torch.int64)
    return slots


_CROSSING_SLOTS = _build_crossing_slots()


def _check_inputs(vertices: torch.Tensor, tets: torch.Tensor, sdf: torch.Tensor) -> None:
    if vertices.dim() != 2 or vertices.shape[1] != 3:
        raise ValueError(f"vertices must have shape (N, 3), got {tuple(vertices.shape)}")
    if not vertices.is_floating_point():
        raise TypeError(f"vertices must be floating point, got {vertices.dtype}")
    if tets.dim() != 2 or tets.shape[1] != 4:
        raise ValueError(f"tets must have shape (M, 4), got {tuple(tets.shape)}")
    if tets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"tets must be int64 (or int32), got {tets.dtype}")
    if sdf.shape != (vertices.shape[0],):
        raise ValueError(f"sdf must have shape ({vertices.shape[0]},) to match vertices, got {tuple(sdf.shape)}")
    if not sdf.is_floating_point():
        raise TypeError(f"sdf must be floating point, got {sdf.dtype}")
    if not (vertices.device == tets.device == sdf.device):
        raise ValueError(
            f"vertices, tets and sdf must be on one device, got {vertices.device}, {tets.device}, {sdf.device}"
        )


def marching_tets(
    vertices: torch.Tensor,
    tets: torch.Tensor,
    sdf: torch.Tensor,
    candidates: torch.Tensor | None = None,
    return_edges: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Extract the ``sdf = 0`` surface of a tetrahedral mesh.

    vertices: (N, 3) float, possibly deformed grid vertices.
    tets: (M, 4) int64, positively oriented.
    sdf: (N,) float, negative inside.
    candidates: optional (K,) tet indices known to contain every surface tetrahedron
        (e.g. :func:`~engine_server.geometry.tet_grid.surface_tet_candidates`); without
        it, a cheap per-tetrahedron sign count over all of ``tets`` finds them.
    return_edges: also return the (V, 2) grid edge each mesh vertex lies on.

    Returns mesh ``vertices`` (V, 3) in the dtype of the inputs and ``faces`` (F, 3)
    int64, outward facing; both empty (but well-shaped) when the SDF has no sign change.
    """
    _check_inputs(vertices, tets, sdf)
    device = vertices.device
    n = vertices.shape[0]
    if n >= 3_037_000_499:  # edge keys min * n + max must fit in int64
        raise ValueError(f"too many vertices ({n}) for marching_tets' int64 edge keys")
    inside_u8 = (sdf.detach() < 0).to(torch.uint8)  # (N,)

    if candidates is None:
        pool = tets
    else:
        pool = tets.index_select(0, candidates.to(device=device, dtype=torch.int64))
    # Cheap pass: count inside corners column by column (four 1-D gathers, no (M, 4) temporaries).
    cols = pool.t()
    count = inside_u8[cols[0]] + inside_u8[cols[1]] + inside_u8[cols[2]] + inside_u8[cols[3]]
    surf = pool.index_select(0, ((count > 0) & (count < 4)).nonzero().squeeze(1)).to(torch.int64)  # (K, 4)

    occ = inside_u8[surf].to(torch.int64)  # (K, 4) 0/1
    code = occ[:, 0] + 2 * occ[:, 1] + 4 * occ[:, 2] + 8 * occ[:, 3]  # (K,) in 1..14

    # Crossing edges of each tet straight from the case table: 3 or 4 of its 6 edges.
    slot = _CROSSING_SLOTS.to(device)[code]  # (K, 4) local edge ids, -1 padded
    has = slot >= 0
    flat = has.reshape(-1).nonzero().squeeze(1)
    tet_of = torch.div(flat, 4, rounding_mode="floor")
    local = slot.reshape(-1).index_select(0, flat)
    tet_edges = TET_EDGES.to(device)
    ea = surf.reshape(-1).index_select(0, tet_of * 4 + tet_edges[local, 0])
    eb = surf.reshape(-1).index_select(0, tet_of * 4 + tet_edges[local, 1])
    keys, inverse = torch.unique(torch.minimum(ea, eb) * n + torch.maximum(ea, eb), return_inverse=True)
    # (K, 6) mesh vertex id of each local edge (only crossing edges are ever read).
    edge_to_vertex = torch.zeros(surf.shape[0] * 6, dtype=torch.int64, device=device)
    edge_to_vertex.index_copy_(0, tet_of * 6 + local, inverse)
    edge_to_vertex = edge_to_vertex.view(-1, 6)

    a = torch.div(keys, n, rounding_mode="floor")
    b = keys - a * n
    s_a = sdf[a].unsqueeze(1)
    s_b = sdf[b].unsqueeze(1)
    mesh_vertices = (vertices[a] * s_b - vertices[b] * s_a) / (s_b - s_a)  # (V, 3)

    table = TRIANGLE_TABLE.to(device)
    faces = [torch.gather(edge_to_vertex, 1, table[code, 0])]
    two = (TRIANGLE_COUNT.to(device)[code] == 2).nonzero().squeeze(1)
    if two.numel():
        faces.append(torch.gather(edge_to_vertex.index_select(0, two), 1, table[code.index_select(0, two), 1]))
    mesh_faces = torch.cat(faces, 0)
    if return_edges:
        return mesh_vertices, mesh_faces, torch.stack([a, b], 1)
    return mesh_vertices, mesh_faces
