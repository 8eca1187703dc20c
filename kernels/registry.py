"""Run-time backends of a kernel: one small registry, generic over what a backend provides.

Each kernel keeps one `BackendRegistry`: named backends, each a cheap probe (can it run
here, and if not, why) and a loader of its implementation, plus the `auto` preference
per device type.

    REGISTRY = BackendRegistry[Ops]("rasterizer", auto_order={"cuda": ("nvdiffrast", "torch"), "cpu": ("torch",)})
    REGISTRY.register(Backend("torch", probe=..., load=...))
    REGISTRY.register(lazy_backend("nvdiffrast", "kernels.rasterize.nvdiffrast_backend"))
    name, ops = REGISTRY.load("auto", device)

The rules every kernel relies on:
- probing never raises and never builds anything, so importing `kernels` works on any
  machine; a probe that raises anyway is reported as unavailable, with the error.
  Probes are asked again on every call (a backend's answer may change, e.g. after its
  first-use build fails); one whose answer cannot change may cache it itself;
- `auto` takes the first backend in the device type's order that is available on that
  device; one whose load fails is logged and skipped; the fallback (`torch`) serves any
  device type without an order of its own, and when nothing in the order could load;
- a backend asked for by name raises `BackendUnavailableError` saying why it cannot run;
- implementations are loaded once and cached; a failed load is remembered, reported by
  `status()`, and not retried.

Loaders report an expected failure (a missing library, a failed build) by raising
`BackendUnavailableError` with a message naming the backend and the reason; any other
exception is a bug and propagates.
"""
from __future__ import annotations

import importlib
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Generic, Iterator, TypeVar

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

T = TypeVar("T")


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot run here (or does not exist, or failed to load)."""


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


@dataclass(frozen=True)
class Backend(Generic[T]):
    """One named backend: a cheap probe and a loader of what it provides."""

    name: str
    """Name used in configs and on the command line."""
    probe: Callable[[], BackendStatus]
    """Cheap availability check; must not raise, import heavy libraries or build anything."""
    load: Callable[[], T]
    """Returns the backend's implementation (may import or compile on first call)."""


def lazy_backend(name: str, module: str) -> Backend[Any]:
    """A backend whose `module` defines `probe() -> BackendStatus` and `load()`, imported on first use.

    Keeps `import kernels` light; a module that cannot be imported is reported as unavailable.
    """

    def probe() -> BackendStatus:
        try:
            return importlib.import_module(module).probe()
        except ImportError as exc:
            return BackendStatus(False, f"cannot import {module}: {exc}")

    def load() -> Any:
        try:
            loaded = importlib.import_module(module)
        except ImportError as exc:
            raise BackendUnavailableError(f"backend {name!r} is unavailable: cannot import {module}: {exc}") from exc
        return loaded.load()

    return Backend(name=name, probe=probe, load=load)


def _device_type(device: torch.device | str) -> str:
    return device if isinstance(device, str) else device.type


class BackendRegistry(Generic[T]):
    """Named backends of one kernel, the `auto` preference per device type, and loaded implementations."""

    def __init__(self, kernel: str, auto_order: dict[str, tuple[str, ...]], fallback: str = "torch") -> None:
        """kernel: name used in messages ("hash-grid"); auto_order: device type -> backend names,
        fastest first; fallback: the portable backend that serves every device type."""
        self.kernel = kernel
        self.auto_order = auto_order
        self.fallback = fallback
        self._backends: dict[str, Backend[T]] = {}
        self._loaded: dict[str, T] = {}
        self._failures: dict[str, BackendUnavailableError] = {}
        self._lock = threading.RLock()

    def register(self, backend: Backend[T]) -> None:
        """Add (or replace) a backend; a replaced one's loaded implementation is forgotten."""
        with self._lock:
            self._backends[backend.name] = backend
            self._loaded.pop(backend.name, None)
            self._failures.pop(backend.name, None)

    def names(self) -> list[str]:
        """Every registered backend name, in registration order."""
        return list(self._backends)

    def probe(self, name: str) -> BackendStatus:
        """Status of one registered backend; never raises for a registered name."""
        if name in self._failures:
            return BackendStatus(False, f"failed to load: {self._failures[name]}")
        try:
            return self._backends[name].probe()
        except Exception as exc:  # noqa: BLE001  (a probe must never break import or `auto`)
            logger.warning("probing %s backend %r raised; reporting it unavailable", self.kernel, name, exc_info=True)
            return BackendStatus(False, f"its probe raised {type(exc).__name__}: {exc}")

    def status(self) -> dict[str, BackendStatus]:
        """Availability of every known backend, with the reason for each."""
        return {name: self.probe(name) for name in self._backends}

    def _usable(self, name: str, device_type: str) -> bool:
        if name not in self._backends:
            return False
        status = self.probe(name)
        return status.available and device_type in status.devices

    def _auto_candidates(self, device_type: str) -> Iterator[str]:
        """Available backends for `device_type` in `auto`'s order of preference (probed as reached)."""
        for name in self.auto_order.get(device_type, (self.fallback,)):
            if self._usable(name, device_type):
                yield name

    def resolve(self, name: str, device: torch.device | str) -> str:
        """The concrete backend name for a request ('auto' or a name) on a device; raises if a named one cannot run.

        Probes only: under `auto`, a backend that then fails to load is skipped by `load`, not here.
        """
        device_type = _device_type(device)
        if name == "auto":
            return next(self._auto_candidates(device_type), self.fallback)
        if name not in self._backends:
            raise BackendUnavailableError(f"unknown {self.kernel} backend {name!r}; known: {', '.join(self._backends)}")
        if name in self._failures:
            raise BackendUnavailableError(str(self._failures[name])) from self._failures[name]
        status = self.probe(name)
        if not status.available:
            raise BackendUnavailableError(f"{self.kernel} backend {name!r} is unavailable: {status.reason}")
        if device_type not in status.devices:
            raise BackendUnavailableError(
                f"{self.kernel} backend {name!r} runs on {', '.join(status.devices)}, not on {device_type}"
            )
        return name

    def get(self, name: str) -> T:
        """The implementation of a registered backend (loaded once); raises BackendUnavailableError if it cannot load."""
        if name not in self._backends:
            raise BackendUnavailableError(f"unknown {self.kernel} backend {name!r}; known: {', '.join(self._backends)}")
        with self._lock:
            if name in self._loaded:
                return self._loaded[name]
            if name in self._failures:
                raise BackendUnavailableError(str(self._failures[name])) from self._failures[name]
            logger.debug("loading %s backend %s", self.kernel, name)
            try:
                impl = self._backends[name].load()
            except BackendUnavailableError as exc:
                self._failures[name] = exc
                raise
            self._loaded[name] = impl
            return impl

    def load(self, name: str, device: torch.device | str) -> tuple[str, T]:
        """Resolve a request ('auto' or a name) on a device and load it: (backend name, implementation).

        Under 'auto', a backend whose load fails (say, its first-use build) is logged and skipped
        for the next available one; a named one raises BackendUnavailableError.
        """
        if name != "auto":
            resolved = self.resolve(name, device)
            return resolved, self.get(resolved)
        for candidate in self._auto_candidates(_device_type(device)):
            try:
                return candidate, self.get(candidate)
            except BackendUnavailableError as exc:
                logger.warning("%s backend %r failed to load, trying the next: %s", self.kernel, candidate, exc)
        return self.fallback, self.get(self.fallback)
