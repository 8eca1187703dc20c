"""The `triton` hash-grid backend: forward and backward Triton kernels for CUDA.

Device rules: available when `triton` is installed and a CUDA device is present (it serves
"cuda"). With TRITON_INTERPRET=1 in the environment (set before triton is imported) the same
kernels run in Triton's interpreter on CPU tensors: the backend then also serves "cpu", which
is how the tests check it without a GPU. `auto` never picks it on the CPU.

One program handles BLOCK points of one level (grid: point blocks x levels). Backward:
the table gradient by `tl.atomic_add` into a float32 buffer, the input gradient (only when x
requires grad) by atomic adds of each level's share into an (N, 3) float32 buffer.
Tables may be float32, float16 or bfloat16 (read as is, interpolated in float32; the gradient
is returned in the table's dtype); float64 tables and non-float32 positions are converted
(differentiably) to float32. Double backward is computed with the reference, as in `cpu`.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch

from kernels.hashgrid.backends import BackendStatus, BackendUnavailableError
from kernels.hashgrid.config import HashGridConfig
from kernels.hashgrid.reference import hash_encode_torch

logger = logging.getLogger(__name__)

BLOCK = 128
"""Points per program on a GPU."""
INTERPRETER_MAX_BLOCK = 4096
"""Points per program in the interpreter, whose cost is per operation, not per element."""
_TABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreter_mode() -> bool:
    """Whether Triton runs its interpreter (TRITON_INTERPRET=1) instead of compiling for a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def probe() -> BackendStatus:
    """Cheap: checks that triton is installed and a device it can run on, without importing it."""
    if importlib.util.find_spec("triton") is None:
        return BackendStatus(False, "triton is not installed (pip install triton)")
    if interpreter_mode():
        devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
        return BackendStatus(True, "Triton interpreter (TRITON_INTERPRET=1; slow, for tests)", devices)
    if not torch.cuda.is_available():
        return BackendStatus(False, "needs a CUDA GPU (or TRITON_INTERPRET=1 to run its interpreter on the CPU)")
    return BackendStatus(True, f"Triton kernels on {torch.cuda.get_device_name()}", ("cuda",))


@functools.cache
def _kernels():
    """Imports triton and the kernels (once)."""
    from kernels.hashgrid import _triton_kernels as k

    return k.forward_kernel, k.backward_kernel


def load():
    """Imports triton and defines the kernels; returns the encode function."""
    status = probe()
    if not status.available:
        raise BackendUnavailableError(f"hash-grid backend 'triton' is unavailable: {status.reason}")
    try:
        _kernels()
    except ImportError as exc:
        raise BackendUnavailableError(f"hash-grid backend 'triton' is unavailable: {exc}") from exc
    return hash_encode_triton


@functools.lru_cache(maxsize=32)
def _level_arrays(config: HashGridConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    res = torch.tensor(config.resolutions, dtype=torch.int32, device=device)
    dense = torch.tensor(config.dense_levels, dtype=torch.int32, device=device)
    return res, dense


def _launch(n: int, config: HashGridConfig) -> tuple[tuple[int, int], dict]:
    """Grid (point blocks, levels) and the shape constants of a launch."""
    block = BLOCK
    if interpreter_mode():
        block = min(INTERPRETER_MAX_BLOCK, max(BLOCK, triton_next_pow2(n)))
    grid = ((n + block - 1) // block, config.n_levels)
    return grid, dict(L=config.n_levels, F=config.n_features, FP=triton_next_pow2(config.n_features), BLOCK=block)


def triton_next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


class _TritonHashEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, table: torch.Tensor, config: HashGridConfig) -> torch.Tensor:
        forward_kernel, _ = _kernels()
        res, dense = _level_arrays(config, x.device)
        out = torch.empty(x.shape[0], config.output_dim, dtype=torch.float32, device=x.device)
        if x.shape[0] > 0:
            grid, shape = _launch(x.shape[0], config)
            forward_kernel[grid](x, table, res, dense, out, x.shape[0], config.table_size, **shape)
        ctx.config = config
        ctx.save_for_backward(x, table)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, table = ctx.saved_tensors
        config = ctx.config
        need_x, need_table = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if torch.is_grad_enabled():  # create_graph=True: differentiate the reference instead
            inputs = [t for t, need in ((x, need_x), (table, need_table)) if need]
            with torch.enable_grad():
                grads = iter(torch.autograd.grad(hash_encode_torch(x, table, config), inputs, grad_out, create_graph=True))
            return (next(grads) if need_x else None), (next(grads) if need_table else None), None
        _, backward_kernel = _kernels()
        res, dense = _level_arrays(config, x.device)
        grad_out = grad_out.float().contiguous()
        grad_table = torch.zeros(table.shape, dtype=torch.float32, device=x.device) if need_table else None
        grad_x = torch.zeros(x.shape, dtype=torch.float32, device=x.device) if need_x else None
        if x.shape[0] > 0 and (need_x or need_table):
            grid, shape = _launch(x.shape[0], config)
            backward_kernel[grid](
                x, table, res, dense, grad_out,
                grad_table if grad_table is not None else grad_out,  # placeholders, never written
                grad_x if grad_x is not None else grad_out,
                x.shape[0], config.table_size, NEED_TABLE=need_table, NEED_X=need_x, **shape,
            )  # fmt: skip
        if grad_table is not None and grad_table.dtype != table.dtype:
            grad_table = grad_table.to(table.dtype)
        return grad_x, grad_table, None


def hash_encode_triton(x: torch.Tensor, table: torch.Tensor, config: HashGridConfig) -> torch.Tensor:
    """Encode points with the Triton kernels. x: (N, 3); table: (L, 2**T, F). Returns (N, L*F) in x's dtype."""
    if x.device != table.device:
        raise ValueError(f"x on {x.device} but the table on {table.device}")
    if x.device.type != "cuda" and not interpreter_mode():
        raise ValueError(f"the 'triton' hash-grid backend needs CUDA tensors (or TRITON_INTERPRET=1), got {x.device}")
    if x.dim() != 2 or x.shape[1] != 3:
        raise ValueError(f"hash-grid input must be (N, 3), got {tuple(x.shape)}")
    expected = (config.n_levels, config.table_size, config.n_features)
    if tuple(table.shape) != expected:
        raise ValueError(f"hash-grid table must be {expected} for this config, got {tuple(table.shape)}")
    if not x.is_floating_point() or not table.is_floating_point():
        raise TypeError(f"hash-grid input and table must be floating point, got {x.dtype}, {table.dtype}")
    xf = x.float().contiguous()
    tf = (table if table.dtype in _TABLE_DTYPES else table.float()).contiguous()
    out = _TritonHashEncode.apply(xf, tf, config)
    return out if x.dtype == torch.float32 else out.to(x.dtype)
