"""The `triton` hash-grid backend against the reference.

Runs on a CUDA GPU, or on CPU tensors in Triton's interpreter when TRITON_INTERPRET=1 was set
before triton was imported (test_hashgrid.py runs this file that way in a subprocess). Without
either it skips. Inputs are small: the interpreter costs about a millisecond per operation.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from kernels.hashgrid import HashGridConfig, HashGridEncoder, hash_encode_torch
from kernels.hashgrid import triton_backend

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if torch.cuda.is_available():
    DEVICE = torch.device("cuda")
elif triton_backend.interpreter_mode():
    DEVICE = torch.device("cpu")
else:
    pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1 (see test_hashgrid.py)", allow_module_level=True)

# Two dense levels and two hashed ones; F=3 exercises the padded feature tile.
MIXED = HashGridConfig(n_levels=4, n_features=2, log2_table_size=9, base_resolution=3, max_resolution=29)
MIXED_F3 = HashGridConfig(n_levels=4, n_features=3, log2_table_size=9, base_resolution=3, max_resolution=29)


def _points(n: int) -> torch.Tensor:
    special = torch.tensor(
        [[0, 0, 0], [1, 1, 1], [0, 1, 0.5], [1, 0, 0.25], [0.5, 0.5, 0.5], [-0.2, 0.3, 1.4], [1.5, -1.0, 0.7]]
    )
    return torch.cat([special, torch.rand(n, 3)]).to(DEVICE)


def _check(config: HashGridConfig, table_dtype: torch.dtype, table_tol: float) -> None:
    encode = triton_backend.load()
    x = _points(250)
    table = torch.randn(config.n_levels, config.table_size, config.n_features, device=DEVICE).to(table_dtype)
    grad_out = torch.randn(x.shape[0], config.output_dim, device=DEVICE)
    results = []
    for fn, t in ((hash_encode_torch, table.float()), (encode, table)):
        xr, tr = x.clone().requires_grad_(True), t.clone().requires_grad_(True)
        out = fn(xr, tr, config)
        gx, gt = torch.autograd.grad(out, (xr, tr), grad_out)
        results.append((out.detach(), gx, gt))
    (ref_out, ref_gx, ref_gt), (out, gx, gt) = results
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-4, atol=1e-5 * ref_gx.abs().max().item())
    assert gt.dtype == table_dtype
    torch.testing.assert_close(gt.float(), ref_gt.to(table_dtype).float(), rtol=table_tol, atol=1e-5)
    outside = (x < 0) | (x > 1)
    assert torch.all(gx[outside] == 0) and gx[:2].abs().sum() > 0


def test_triton_matches_reference_float32():
    _check(MIXED, torch.float32, 1e-5)


def test_triton_matches_reference_three_features_half_table():
    _check(MIXED_F3, torch.float16, 1e-2)


def test_triton_through_the_module_with_table_gradient_only():
    enc = HashGridEncoder(MIXED, backend="triton").to(DEVICE)
    x = _points(100)
    out = enc(x)
    out.sum().backward()
    ref_table = enc.table.detach().clone().requires_grad_(True)
    hash_encode_torch(x, ref_table, MIXED).sum().backward()
    assert enc.backend_for(x.device) == "triton"
    torch.testing.assert_close(enc.table.grad, ref_table.grad, rtol=1e-5, atol=1e-6)
