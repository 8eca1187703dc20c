"""Surface subdivision of a tetrahedral mesh: double the resolution where the SDF changes sign.

Every edge of a tetrahedron whose vertices change sign is split at its midpoint.
Each tetrahedron that has split edges (the surface tetrahedra, and those of their
neighbours that share one of those edges) is then cut by repeated bisection: take
its split edge of highest priority, cut the tetrahedron in two through that edge's
midpoint and the opposite edge, and repeat on the children until no split edge is
left. The priority is global (longest edge first, ties broken by the endpoint ids),
so a face shared by two tetrahedra is cut in the same order, and therefore the same
way, from both sides: the result is conforming (no hanging vertices) without any
closure iteration, and marching tetrahedra on it stays watertight whatever SDF
values the new vertices later take. Longest-edge-first keeps the children's shape
close to the parents' (Rivara's rule). Replacing one endpoint of an edge by its
midpoint keeps a tetrahedron's orientation, so positively oriented input stays so.

New vertices get the mean of the endpoint SDF values, so the piecewise-linear SDF,
and the extracted surface, are unchanged until those values are optimised.
``parents`` lets callers interpolate any other per-vertex quantity the same way.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engine_server.geometry.marching_tets import TET_EDGES, _check_inputs

logger = logging.getLogger(__name__)


@dataclass
class Subdivision:
    """A subdivided tetrahedral mesh."""

    vertices: torch.Tensor
    """(N', 3) old vertices first (unchanged order), then the new edge midpoints."""
    tets: torch.Tensor
    """(M', 4) int64, conforming and positively oriented."""
    sdf: torch.Tensor
    """(N',) the input SDF, extended with endpoint means at the midpoints."""
    parents: torch.Tensor
    """(N', 2) int64: each vertex is the mean of these two old vertices (an old vertex is its own pair)."""


def _edge_keys(tets: torch.Tensor, n: int) -> torch.Tensor:
    """(M, 6) int64 keys ``min * n + max`` of each tetrahedron's edges."""
    ends = tets[:, TET_EDGES.to(tets.device)]
    return torch.minimum(ends[..., 0], ends[..., 1]) * n + torch.maximum(ends[..., 0], ends[..., 1])


def _lookup(keys: torch.Tensor, sorted_keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Position of ``keys`` in ``sorted_keys`` and whether each is present (both shaped like keys)."""
    pos = torch.searchsorted(sorted_keys, keys).clamp(max=sorted_keys.numel() - 1)
    return pos, sorted_keys[pos] == keys


def subdivide_surface(vertices: torch.Tensor, tets: torch.Tensor, sdf: torch.Tensor) -> Subdivision:
    """Halve every edge of the sign-changing tetrahedra and re-tetrahedralise conformingly.

    vertices (N, 3), tets (M, 4) positively oriented, sdf (N,) negative inside. Values
    are interpolated with plain torch ops, so gradients flow back to ``vertices`` and
    ``sdf``. A mesh without sign changes is returned unchanged (as new tensors).
    """
    _check_inputs(vertices, tets, sdf)
    device = vertices.device
    n = vertices.shape[0]
    tets = tets.to(torch.int64)
    if n * n >= 2**62:
        raise ValueError(f"too many vertices ({n}) for int64 edge keys")
    inside_u8 = (sdf.detach() < 0).to(torch.uint8)
    count = inside_u8[tets[:, 0]] + inside_u8[tets[:, 1]] + inside_u8[tets[:, 2]] + inside_u8[tets[:, 3]]
    surface = (count > 0) & (count < 4)
    split = torch.unique(_edge_keys(tets[surface], n).reshape(-1))  # (S,) sorted keys of split edges
    own = torch.arange(n, device=device)
    if split.numel() == 0:
        return Subdivision(vertices.clone(), tets.clone(), sdf.clone(), torch.stack([own, own], 1))

    a = torch.div(split, n, rounding_mode="floor")
    b = split - a * n
    new_vertices = torch.cat([vertices, (vertices[a] + vertices[b]) / 2])
    new_sdf = torch.cat([sdf, (sdf[a] + sdf[b]) / 2])
    parents = torch.cat([torch.stack([own, own], 1), torch.stack([a, b], 1)])

    # Global priority of each split edge: longest first, then by key (shared faces agree).
    length = (vertices.detach()[a] - vertices.detach()[b]).norm(dim=-1).double()
    order = _lexsort(-length, split)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=device)

    # Tetrahedra touching a split edge are refined; the others are kept as they are.
    # Cheap prefilter: a split edge needs both endpoints among the split edges' vertices.
    marked = torch.zeros(n, dtype=torch.uint8, device=device)
    marked[a] = 1
    marked[b] = 1
    near = (marked[tets[:, 0]] + marked[tets[:, 1]] + marked[tets[:, 2]] + marked[tets[:, 3]]) >= 2
    near_idx = near.nonzero().squeeze(1)
    _, hit = _lookup(_edge_keys(tets[near_idx], n), split)
    touched = torch.zeros_like(near)
    touched[near_idx[hit.any(1)]] = True
    pieces = [tets[~touched]]
    work = tets[touched]
    edges_t = TET_EDGES.to(device)
    big = torch.iinfo(torch.int64).max
    while work.shape[0] > 0:
        # Only edges between old vertices can be split edges; child edges through a midpoint are new.
        keys = _edge_keys(work, n)
        pos, present = _lookup(keys, split)
        old_edge = (work[:, edges_t] < n).all(-1)
        present &= old_edge
        done = ~present.any(1)
        pieces.append(work[done])
        work, pos, present = work[~done], pos[~done], present[~done]
        if work.shape[0] == 0:
            break
        prio = torch.where(present, rank[pos], torch.full_like(pos, big))
        e = prio.argmin(1)  # (W,) local edge to bisect
        mid = n + pos.gather(1, e[:, None]).squeeze(1)
        i = edges_t[e, 0]
        j = edges_t[e, 1]
        rows = torch.arange(work.shape[0], device=device)
        first = work.clone()
        first[rows, j] = mid  # (v_i, m) half
        second = work.clone()
        second[rows, i] = mid  # (m, v_j) half
        work = torch.cat([first, second], 0)
    new_tets = torch.cat(pieces, 0)
    logger.debug("subdivided %d surface tets: %d -> %d tets, %d new vertices",
                 int(surface.sum()), tets.shape[0], new_tets.shape[0], split.numel())
    return Subdivision(vertices=new_vertices, tets=new_tets, sdf=new_sdf, parents=parents)


def _lexsort(primary: torch.Tensor, secondary: torch.Tensor) -> torch.Tensor:
    """Indices sorting by ``primary`` then ``secondary`` (both (S,))."""
    idx = torch.argsort(secondary, stable=True)
    return idx[torch.argsort(primary[idx], stable=True)]
