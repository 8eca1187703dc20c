"""Multi-resolution hash-grid encoding with run-time backends.

    from kernels.hashgrid import HashGridConfig, HashGridEncoder
    enc = HashGridEncoder(HashGridConfig(n_levels=16, log2_table_size=19), backend="auto")
    feats = enc(x)  # x: (N, 3) in [0, 1] -> (N, 32)
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
