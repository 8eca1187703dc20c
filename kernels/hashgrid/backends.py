"""Run-time choice of hash-grid backend.

Each backend registers a probe (can it run here, and if not, why) and an encode
function with the reference's signature. Probing never raises, so importing
`kernels` works on any machine; asking for an unavailable backend by name does.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Callable

import torch

from kernels.hashgrid.config import HashGridConfig
from kernels.hashgrid.reference import hash_encode_torch

logger = logging.getLogger(__name__)

EncodeFn = Callable[[torch.Tensor, torch.Tensor, HashGridConfig], torch.Tensor]


@dataclass(frozen=True)
class BackendStatus:
    available: bool
    """Whether the backend can run on this machine."""
    reason: str
    """Why not, or what it runs on."""
    devices: tuple[str, ...] = ()
    """Device types it serves ("cpu", "cuda")."""

    def describe(self) -> str:
        return ("available: " if self.available else "unavailable: ") + self.reason


@dataclass(frozen=True)
class Backend:
    name: str
    probe: Callable[[], BackendStatus]
    """Cheap availability check; must not raise."""
    load: Callable[[], EncodeFn]
    """Returns the encode function (may compile on first call)."""


_REGISTRY: dict[str, Backend] = {}
_AUTO_ORDER = {"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")}
"""Preference of `auto` per device type, fastest first. `tcnn` is never picked by `auto`: it
keeps its own parameters instead of the shared (L, 2**T, F) table, so it must be asked for
by name (see tcnn_backend.py)."""


def register(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


def backend_names() -> list[str]:
    return list(_REGISTRY)


def backend_status() -> dict[str, BackendStatus]:
    """Availability of every known backend, with the reason for each."""
    return {name: b.probe() for name, b in _REGISTRY.items()}


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot run here."""


def resolve(name: str, device: torch.device) -> str:
    """The concrete backend name for a request ('auto' or a name) on a device."""
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ("torch",)):
            backend = _REGISTRY.get(candidate)
            if backend is None:
                continue
            status = backend.probe()
            if status.available and device.type in status.devices:
                return candidate
        return "torch"
    if name not in _REGISTRY:
        raise BackendUnavailableError(f"unknown hash-grid backend {name!r}; known: {', '.join(_REGISTRY)}")
    status = _REGISTRY[name].probe()
    if not status.available:
        raise BackendUnavailableError(f"hash-grid backend {name!r} is unavailable: {status.reason}")
    if device.type not in status.devices:
        raise BackendUnavailableError(
            f"hash-grid backend {name!r} runs on {', '.join(status.devices)}, not on {device.type}"
        )
    return name


_LOADED: dict[str, EncodeFn] = {}


def get_encode_fn(name: str) -> EncodeFn:
    """The encode function of a resolved backend name (loaded once)."""
    if name not in _LOADED:
        _LOADED[name] = _REGISTRY[name].load()
    return _LOADED[name]


def resolve_and_load(name: str, device: torch.device) -> tuple[str, EncodeFn]:
    """Resolve a request and load it. Under 'auto', a backend whose load fails (say, its
    first-use build) is skipped with a warning for the next available one; a named one raises."""
    if name != "auto":
        resolved = resolve(name, device)
        return resolved, get_encode_fn(resolved)
    for candidate in _AUTO_ORDER.get(device.type, ("torch",)):
        backend = _REGISTRY.get(candidate)
        if backend is None:
            continue
        status = backend.probe()
        if not (status.available and device.type in status.devices):
            continue
        try:
            return candidate, get_encode_fn(candidate)
        except BackendUnavailableError as exc:
            logger.warning("hash-grid backend %r failed to load, trying the next: %s", candidate, exc)
    return "torch", get_encode_fn("torch")


def _lazy(module: str, attr: str) -> Callable:
    """A function that imports `module` only when called (keeps `import kernels` light)."""

    def call(*args, **kwargs):
        return getattr(importlib.import_module(module), attr)(*args, **kwargs)

    return call


def _lazy_probe(module: str) -> Callable[[], BackendStatus]:
    """The backend module's probe(), imported on first call; an import failure is a status."""

    def probe() -> BackendStatus:
        try:
            return importlib.import_module(module).probe()
        except ImportError as exc:
            return BackendStatus(False, f"cannot import {module}: {exc}")

    return probe


register(
    Backend(
        name="torch",
        probe=lambda: BackendStatus(True, "portable PyTorch reference", ("cpu", "cuda")),
        load=lambda: hash_encode_torch,
    )
)
register(
    Backend(name="cpu", probe=_lazy_probe("kernels.hashgrid.cpu"), load=_lazy("kernels.hashgrid.cpu", "load"))
)
register(
    Backend(
        name="triton",
        probe=_lazy_probe("kernels.hashgrid.triton_backend"),
        load=_lazy("kernels.hashgrid.triton_backend", "load"),
    )
)
register(
    Backend(
        name="tcnn",
        probe=_lazy_probe("kernels.hashgrid.tcnn_backend"),
        load=_lazy("kernels.hashgrid.tcnn_backend", "load"),
    )
)
