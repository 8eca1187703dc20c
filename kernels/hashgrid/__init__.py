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

from kernels.hashgrid.backends import BackendStatus, BackendUnavailableError, backend_names, backend_status
from kernels.hashgrid.config import HashGridConfig
from kernels.hashgrid.module import HashGridEncoder
from kernels.hashgrid.reference import hash_encode_torch

__all__ = [
    "BackendStatus",
    "BackendUnavailableError",
    "HashGridConfig",
    "HashGridEncoder",
    "backend_names",
    "backend_status",
    "hash_encode_torch",
]
