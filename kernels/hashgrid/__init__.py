"""Multi-resolution hash-grid encoding with run-time backends.

    from kernels.hashgrid import HashGridConfig, HashGridEncoder
    enc = HashGridEncoder(HashGridConfig(n_levels=16, log2_table_size=19), backend="auto")
    feats = enc(x)  # x: (N, 3) in [0, 1] -> (N, 32)

Backends (`backend_status()` says which can run here and why not):
- `torch`: reference.py, the specification, everywhere;
- `cpu`: C++/OpenMP kernel built on first use (cpu.py, csrc/), `auto`'s choice on the CPU;
- `triton`: Triton kernels on CUDA (triton_backend.py), `auto`'s choice on CUDA;
- `tcnn`: tiny-cuda-nn with its own parameter layout, by name only (tcnn_backend.py).
`engine-server bench kernels` (bench.py) measures them side by side.
"""
from __future__ import annotations

from importlib import import_module

from kernels.hashgrid.config import HashGridConfig  # torch-free: presets and the CLI read it without torch

_LAZY = {
    "BackendStatus": "backends",
    "BackendUnavailableError": "backends",
    "backend_names": "backends",
    "backend_status": "backends",
    "HashGridEncoder": "module",
    "hash_encode_torch": "reference",
}
"""Names whose modules import torch: loaded on first use, so ``import kernels.hashgrid`` stays light."""


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f"kernels.hashgrid.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'kernels.hashgrid' has no attribute {name!r}")


__all__ = ["HashGridConfig", *_LAZY]
