"""Triton kernels of the `triton` hash-grid backend (imported only when that backend loads).

Semantics as in reference.py; see triton_backend.py for the launch and autograd wrapper.
"""
from __future__ import annotations

import triton
import triton.language as tl

from kernels.hashgrid.config import PRIMES

P1 = tl.constexpr(PRIMES[1])
P2 = tl.constexpr(PRIMES[2])


@triton.jit
def _locate(x_ptr, offs, mask, res, axis: tl.constexpr):
    """Cell (uint32) and local coordinate of one axis for a block of points."""
    v = tl.load(x_ptr + offs * 3 + axis, mask=mask, other=0.0)
    v = tl.minimum(tl.maximum(v, 0.0), 1.0)
    p = v * res.to(tl.float32)
    cell = tl.minimum(tl.maximum(tl.floor(p).to(tl.int32), 0), res - 1)
    return cell.to(tl.uint32), p - cell.to(tl.float32)


@triton.jit
def _row(cx, cy, cz, side, dense, table_mask, c: tl.constexpr):
    """Table row (int64) of corner c (bit0 -> x, bit1 -> y, bit2 -> z)."""
    ix = cx + (c & 1)
    iy = cy + ((c >> 1) & 1)
    iz = cz + ((c >> 2) & 1)
    hashed = (ix ^ (iy * P1) ^ (iz * P2)) & table_mask
    direct = ix + iy * side + iz * side * side
    return tl.where(dense != 0, direct, hashed).to(tl.int64)


@triton.jit
def _factor(f, bit: tl.constexpr):
    if bit:
        return f
    else:
        return 1.0 - f


@triton.jit
def _sign(bit: tl.constexpr):
    if bit:
        return 1.0
    else:
        return -1.0


@triton.jit
def forward_kernel(
    x_ptr, table_ptr, res_ptr, dense_ptr, out_ptr, n, table_size,
    L: tl.constexpr, F: tl.constexpr, FP: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """One level (program_id 1) for BLOCK points; features as a (BLOCK, FP) tile, FP = F padded to 2^k."""
    level = tl.program_id(1)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    feats = tl.arange(0, FP)
    mask2 = mask[:, None] & (feats < F)[None, :]
    res = tl.load(res_ptr + level)
    dense = tl.load(dense_ptr + level)
    table_mask = (table_size - 1).to(tl.uint32)
    side = (res + 1).to(tl.uint32)
    cx, fx = _locate(x_ptr, offs, mask, res, 0)
    cy, fy = _locate(x_ptr, offs, mask, res, 1)
    cz, fz = _locate(x_ptr, offs, mask, res, 2)
    base = table_ptr + level.to(tl.int64) * table_size * F
    acc = tl.zeros([BLOCK, FP], dtype=tl.float32)
    for c in tl.static_range(8):
        row = _row(cx, cy, cz, side, dense, table_mask, c)
        w = (_factor(fx, c & 1) * _factor(fy, (c >> 1) & 1)) * _factor(fz, (c >> 2) & 1)
        feat = tl.load(base + row[:, None] * F + feats[None, :], mask=mask2, other=0.0).to(tl.float32)
        acc += w[:, None] * feat
    tl.store(out_ptr + offs[:, None] * (L * F) + level * F + feats[None, :], acc, mask=mask2)


@triton.jit
def backward_kernel(
    x_ptr, table_ptr, res_ptr, dense_ptr, grad_out_ptr, grad_table_ptr, grad_x_ptr, n, table_size,
    L: tl.constexpr, F: tl.constexpr, FP: tl.constexpr, BLOCK: tl.constexpr,
    NEED_TABLE: tl.constexpr, NEED_X: tl.constexpr,
):  # fmt: skip
    """Gradients of one level for BLOCK points: table by atomic adds, x (summed over levels) likewise."""
    level = tl.program_id(1)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    feats = tl.arange(0, FP)
    mask2 = mask[:, None] & (feats < F)[None, :]
    res = tl.load(res_ptr + level)
    dense = tl.load(dense_ptr + level)
    table_mask = (table_size - 1).to(tl.uint32)
    side = (res + 1).to(tl.uint32)
    cx, fx = _locate(x_ptr, offs, mask, res, 0)
    cy, fy = _locate(x_ptr, offs, mask, res, 1)
    cz, fz = _locate(x_ptr, offs, mask, res, 2)
    level_offset = level.to(tl.int64) * table_size * F
    g = tl.load(grad_out_ptr + offs[:, None] * (L * F) + level * F + feats[None, :], mask=mask2, other=0.0)
    d0 = tl.zeros([BLOCK], dtype=tl.float32)
    d1 = tl.zeros([BLOCK], dtype=tl.float32)
    d2 = tl.zeros([BLOCK], dtype=tl.float32)
    for c in tl.static_range(8):
        row = _row(cx, cy, cz, side, dense, table_mask, c)
        wx = _factor(fx, c & 1)
        wy = _factor(fy, (c >> 1) & 1)
        wz = _factor(fz, (c >> 2) & 1)
        ptrs = row[:, None] * F + feats[None, :] + level_offset
        if NEED_TABLE:
            tl.atomic_add(grad_table_ptr + ptrs, ((wx * wy) * wz)[:, None] * g, mask=mask2)
        if NEED_X:
            # d w_c / d frac_a: the other two axes' factors, + for the upper corner, - for the lower.
            s = tl.sum(g * tl.load(table_ptr + ptrs, mask=mask2, other=0.0).to(tl.float32), axis=1)
            d0 += s * _sign(c & 1) * (wy * wz)
            d1 += s * _sign((c >> 1) & 1) * (wx * wz)
            d2 += s * _sign((c >> 2) & 1) * (wx * wy)
    if NEED_X:
        resf = res.to(tl.float32)
        # torch.clamp passes the gradient on [0, 1], boundaries included.
        v = tl.load(x_ptr + offs * 3 + 0, mask=mask, other=0.0)
        tl.atomic_add(grad_x_ptr + offs * 3 + 0, tl.where((v >= 0.0) & (v <= 1.0), d0 * resf, 0.0), mask=mask)
        v = tl.load(x_ptr + offs * 3 + 1, mask=mask, other=0.0)
        tl.atomic_add(grad_x_ptr + offs * 3 + 1, tl.where((v >= 0.0) & (v <= 1.0), d1 * resf, 0.0), mask=mask)
        v = tl.load(x_ptr + offs * 3 + 2, mask=mask, other=0.0)
        tl.atomic_add(grad_x_ptr + offs * 3 + 2, tl.where((v >= 0.0) & (v <= 1.0), d2 * resf, 0.0), mask=mask)
