"""Run-time choice of hash-grid backend, on the shared registry (`kernels.registry`).

Each backend registers a probe (can it run here, and if not, why) and an encode
function with the reference's signature. Probing never raises, so importing
`kernels` works on any machine; asking for an unavailable backend by name does.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

from kernels.hashgrid.config import HashGridConfig
from kernels.hashgrid.reference import hash_encode_torch
from kernels.registry import Backend, BackendRegistry, BackendStatus, BackendUnavailableError, lazy_backend

logger = logging.getLogger(__name__)

__all__ = [
    "REGISTRY",
    "Backend",
    "BackendStatus",
    "BackendUnavailableError",
    "EncodeFn",
    "backend_names",
    "backend_status",
    "register",
    "resolve",
    "resolve_and_load",
]

EncodeFn = Callable[[torch.Tensor, torch.Tensor, HashGridConfig], torch.Tensor]
"""(x (N, 3) in [0, 1], table (L, 2**T, F), config) -> (N, L*F) features."""

REGISTRY: BackendRegistry[EncodeFn] = BackendRegistry(
    "hash-grid", auto_order={"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")}
)
"""`auto` prefers, fastest first, per device type. `tcnn` is never picked by `auto`: it keeps its
own parameters instead of the shared (L, 2**T, F) table, so it must be asked for by name
(see tcnn_backend.py)."""

register = REGISTRY.register
backend_names = REGISTRY.names
backend_status = REGISTRY.status
resolve = REGISTRY.resolve
resolve_and_load = REGISTRY.load

register(
    Backend(
        name="torch",
        probe=lambda: BackendStatus(True, "portable PyTorch reference", ("cpu", "cuda")),
        load=lambda: hash_encode_torch,
    )
)
register(lazy_backend("cpu", "kernels.hashgrid.cpu"))
register(lazy_backend("triton", "kernels.hashgrid.triton_backend"))
register(lazy_backend("tcnn", "kernels.hashgrid.tcnn_backend"))
