"""A small registry of run-time backends for one kernel, generic over what a backend provides.

Nothing here is rasterizer-specific: it is the hash-grid kernel's registry pattern
(probe / load / `auto` by device type / clear errors) written once, so that it can
move to `kernels/registry.py` and serve every kernel.

    registry = BackendRegistry[Ops]("rasterizer", auto_order={"cuda": ("nvdiffrast", "torch"), "cpu": ("torch",)})
    registry.register(Backend("torch", probe=..., load=...))
    ops = registry.get(registry.resolve("auto", device))
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Generic, TypeVar

import torch

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend can run here, and why (not)."""

    available: bool
    """Whether the backend can run on this machine."""
    reason: str
    """Why not, or what it runs on."""
    devices: tuple[str, ...] = ()
    """Device types it serves ("cpu", "cuda")."""

    def describe(self) -> str:
        return ("available: " if self.available else "unavailable: ") + self.reason


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot run here (or does not exist)."""


@dataclass(frozen=True)
class Backend(Generic[T]):
    """One named backend: a cheap probe and a loader of what it provides."""

    name: str
    """Name used in configs and on the command line."""
    probe: Callable[[], BackendStatus]
    """Cheap availability check; must not raise."""
    load: Callable[[], T]
    """Returns the backend's implementation (may import or compile on first call)."""


class BackendRegistry(Generic[T]):
    """Named backends of one kernel, the `auto` preference per device type, and loaded implementations."""

    def __init__(self, kernel: str, auto_order: dict[str, tuple[str, ...]], fallback: str = "torch") -> None:
        self.kernel = kernel
        self.auto_order = auto_order
        self.fallback = fallback
        self._backends: dict[str, Backend[T]] = {}
        self._loaded: dict[str, T] = {}
        self._status: dict[str, BackendStatus] = {}

    def register(self, backend: Backend[T]) -> None:
        self._backends[backend.name] = backend
        self._status.pop(backend.name, None)
        self._loaded.pop(backend.name, None)

    def names(self) -> list[str]:
        return list(self._backends)

    def probe(self, name: str) -> BackendStatus:
        """Status of one backend, probed once and cached."""
        if name not in self._status:
            self._status[name] = self._backends[name].probe()
        return self._status[name]

    def status(self) -> dict[str, BackendStatus]:
        """Availability of every known backend, with the reason for each."""
        return {name: self.probe(name) for name in self._backends}

    def resolve(self, name: str, device: torch.device) -> str:
        """The concrete backend name for a request ('auto' or a name) on a device; raises if it cannot run."""
        if name == "auto":
            for candidate in self.auto_order.get(device.type, (self.fallback,)):
                if candidate not in self._backends:
                    continue
                status = self.probe(candidate)
                if status.available and device.type in status.devices:
                    return candidate
            return self.fallback
        if name not in self._backends:
            raise BackendUnavailableError(f"unknown {self.kernel} backend {name!r}; known: {', '.join(self._backends)}")
        status = self.probe(name)
        if not status.available:
            raise BackendUnavailableError(f"{self.kernel} backend {name!r} is unavailable: {status.reason}")
        if device.type not in status.devices:
            raise BackendUnavailableError(
                f"{self.kernel} backend {name!r} runs on {', '.join(status.devices)}, not on {device.type}"
            )
        return name

    def get(self, name: str) -> T:
        """The implementation of a resolved backend name (loaded once)."""
        if name not in self._loaded:
            logger.debug("loading %s backend %s", self.kernel, name)
            self._loaded[name] = self._backends[name].load()
        return self._loaded[name]
