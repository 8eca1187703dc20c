"""Regularisers used when optimising a DMTet (DMTet, nvdiffrec and Magic3D use these)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sdf_sign_flip_loss(sdf: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Penalty on grid edges whose SDF changes sign (the DMTet / nvdiffrec SDF regulariser).

    sdf: (N,) per-vertex SDF; edges: (E, 2) the sign-changing edges (as returned by
    ``marching_tets(..., return_edges=True)``). Each endpoint is pushed towards the
    other's side with a binary cross-entropy on the SDF as a logit, which discourages
    spurious surface sheets and floaters. Zero when there are no such edges.
    """
    if edges.numel() == 0:
        return sdf.sum() * 0.0
    s_a, s_b = sdf[edges[:, 0]], sdf[edges[:, 1]]
    # Target 1 means "outside" (sdf > 0): the logit is the sdf itself.
    return 0.5 * (
        F.binary_cross_entropy_with_logits(s_a, (s_b > 0).to(s_a.dtype))
        + F.binary_cross_entropy_with_logits(s_b, (s_a > 0).to(s_b.dtype))
    )


def _unique_edges(faces: torch.Tensor, n: int) -> torch.Tensor:
    """(E, 2) undirected edges of a triangle mesh with ``n`` vertices, each once."""
    e = torch.sort(faces[:, [[0, 1], [1, 2], [2, 0]]].reshape(-1, 2), dim=1).values
    key = torch.unique(e[:, 0] * n + e[:, 1])
    return torch.stack([torch.div(key, n, rounding_mode="floor"), key % n], 1)


def laplacian_smoothness_loss(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Mean squared uniform-Laplacian length ``|v - mean(neighbours)|^2`` over a mesh's vertices.

    vertices (V, 3), faces (F, 3). Zero for an empty mesh.
    """
    if faces.numel() == 0:
        return vertices.sum() * 0.0
    e = _unique_edges(faces, vertices.shape[0])
    both = torch.cat([e, e.flip(1)])
    n = vertices.shape[0]
    total = torch.zeros_like(vertices).index_add_(0, both[:, 0], vertices[both[:, 1]])
    degree = torch.zeros(n, dtype=vertices.dtype, device=vertices.device).index_add_(
        0, both[:, 0], torch.ones(both.shape[0], dtype=vertices.dtype, device=vertices.device))
    used = degree > 0
    lap = vertices[used] - total[used] / degree[used, None]
    return lap.pow(2).sum(-1).mean()


def normal_consistency_loss(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Mean ``1 - cos`` between the normals of faces sharing an edge (Magic3D's mesh smoothness).

    vertices (V, 3), faces (F, 3). Zero when no edge is shared.
    """
    if faces.numel() == 0:
        return vertices.sum() * 0.0
    tri = vertices[faces]
    normal = F.normalize(torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1), dim=-1, eps=1e-12)
    e = torch.sort(faces[:, [[0, 1], [1, 2], [2, 0]]].reshape(-1, 2), dim=1).values
    key = e[:, 0] * vertices.shape[0] + e[:, 1]
    order = torch.argsort(key)
    key, face_of = key[order], (order // 3)
    pair = (key[1:] == key[:-1]).nonzero().squeeze(1)
    if pair.numel() == 0:
        return vertices.sum() * 0.0
    cos = (normal[face_of[pair]] * normal[face_of[pair + 1]]).sum(-1)
    return (1.0 - cos).mean()


def deformation_loss(deformation: torch.Tensor, spacing: float) -> torch.Tensor:
    """Mean squared vertex offset (N, 3) in units of the grid spacing: keeps the grid regular."""
    return (deformation / spacing).pow(2).sum(-1).mean()
