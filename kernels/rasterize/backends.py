"""Run-time choice of rasterizer backend: portable PyTorch everywhere, nvdiffrast on CUDA when importable.

A backend provides `RasterOps` (rasterize, interpolate, antialias) with the conventions
of `kernels.rasterize.reference`. Probing never raises, so importing `kernels` works on
any machine; asking for an unavailable backend by name does, with the reason.
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Callable

import torch

from kernels.rasterize.reference import antialias_torch, interpolate_torch, rasterize_torch
from kernels.rasterize.registry import Backend, BackendRegistry, BackendStatus

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RasterOps:
    """What a rasterizer backend provides; inputs arrive checked, contiguous and on one device."""

    rasterize: Callable[[torch.Tensor, torch.Tensor, tuple[int, int]], torch.Tensor]
    """(clip (B, V, 4) float32, faces (F, 3) long, (H, W)) -> rast (B, H, W, 4)."""
    interpolate: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    """(attr (B or 1, V, C), rast (B, H, W, 4), faces (F, 3) long) -> (B, H, W, C)."""
    antialias: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    """(color (B, H, W, C), rast, clip (B, V, 4), faces (F, 3) long) -> (B, H, W, C)."""


REGISTRY: BackendRegistry[RasterOps] = BackendRegistry(
    "rasterizer", auto_order={"cuda": ("nvdiffrast", "torch"), "cpu": ("torch",)}
)


def _probe_nvdiffrast() -> BackendStatus:
    try:
        found = importlib.util.find_spec("nvdiffrast") is not None
    except (ImportError, ValueError) as exc:
        return BackendStatus(False, f"nvdiffrast not importable: {exc}")
    if not found:
        return BackendStatus(
            False, "nvdiffrast is not installed (pip install git+https://github.com/NVlabs/nvdiffrast)"
        )
    if not torch.cuda.is_available():
        return BackendStatus(False, "nvdiffrast is installed but CUDA is not available")
    return BackendStatus(True, "nvdiffrast CUDA rasterizer", ("cuda",))


def _load_nvdiffrast() -> RasterOps:
    from kernels.rasterize.nvdiffrast_backend import NvdiffrastOps

    ops = NvdiffrastOps()
    return RasterOps(rasterize=ops.rasterize, interpolate=ops.interpolate, antialias=ops.antialias)


REGISTRY.register(
    Backend(
        name="torch",
        probe=lambda: BackendStatus(True, "portable PyTorch rasterizer", ("cpu", "cuda")),
        load=lambda: RasterOps(rasterize=rasterize_torch, interpolate=interpolate_torch, antialias=antialias_torch),
    )
)
REGISTRY.register(Backend(name="nvdiffrast", probe=_probe_nvdiffrast, load=_load_nvdiffrast))


def backend_names() -> list[str]:
    return REGISTRY.names()


def backend_status() -> dict[str, BackendStatus]:
    """Availability of every rasterizer backend, with the reason for each."""
    return REGISTRY.status()


def get_ops(backend: str, device: torch.device) -> RasterOps:
    """The ops of `backend` ('auto' or a name) for tensors on `device`; raises BackendUnavailableError."""
    return REGISTRY.get(REGISTRY.resolve(backend, device))
