"""The portable PyTorch hash-grid encoding: the specification every backend is tested against.

For level l with R cells per axis, a point x in [0,1]^3 (clamped) sits at p = x * R
in cell i = min(floor(p), R - 1) with local coordinates w = p - i in [0, 1]. Its 8
cell corners are looked up in the level's table, directly when the (R+1)^3 grid
fits (index = cx + cy (R+1) + cz (R+1)^2), else through the spatial hash
(cx * P0 xor cy * P1 xor cz * P2) mod 2**T, and blended trilinearly. Output
features are level-major: [level0 f0..fF-1, level1 f0.., ...].
"""
from __future__ import annotations

import torch

from kernels.hashgrid.config import PRIMES, HashGridConfig

# Corner offsets (8, 3) in the order bit0 -> x, bit1 -> y, bit2 -> z.
_CORNERS = torch.tensor([[(c >> 0) & 1, (c >> 1) & 1, (c >> 2) & 1] for c in range(8)], dtype=torch.long)


def corner_indices(cell: torch.Tensor, resolution: int, dense: bool, table_size: int) -> torch.Tensor:
    """Table rows of the 8 corners of each cell: cell (N, 3) long -> (N, 8) long."""
    c = cell[:, None, :] + _CORNERS.to(cell.device)  # (N, 8, 3)
    if dense:
        side = resolution + 1
        return c[..., 0] + c[..., 1] * side + c[..., 2] * (side * side)
    # Only the low T bits are kept, so int64 wrap-around gives the same rows as uint32 arithmetic.
    h = (c[..., 0] * PRIMES[0]) ^ (c[..., 1] * PRIMES[1]) ^ (c[..., 2] * PRIMES[2])
    return h & (table_size - 1)


def hash_encode_torch(x: torch.Tensor, table: torch.Tensor, config: HashGridConfig) -> torch.Tensor:
    """Encode points. x: (N, 3) in [0, 1] (clamped); table: (L, 2**T, F). Returns (N, L*F).

    Plain autograd gives gradients w.r.t. both the table and x.
    """
    x = x.clamp(0.0, 1.0)
    corners = _CORNERS.to(x.device)
    features = []
    for level, (res, dense) in enumerate(zip(config.resolutions, config.dense_levels)):
        pos = x * res
        cell = pos.detach().floor().long().clamp(0, res - 1)  # (N, 3)
        frac = pos - cell.to(pos.dtype)  # (N, 3), carries d/dx = res
        # Trilinear weight of each corner: product over axes of frac or (1 - frac).
        w = torch.where(corners.bool()[None], frac[:, None, :], 1.0 - frac[:, None, :]).prod(-1)  # (N, 8)
        rows = corner_indices(cell, res, dense, config.table_size)  # (N, 8)
        feats = table[level][rows]  # (N, 8, F)
        features.append((w.unsqueeze(-1).to(feats.dtype) * feats).sum(1).to(x.dtype))
    return torch.cat(features, dim=-1)
