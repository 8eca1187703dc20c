"""The shared backend registry's rules (kernels/registry.py), on small registries built here."""
from __future__ import annotations

import logging

import pytest
import torch

import kernels.hashgrid
import kernels.rasterize
from kernels.registry import Backend, BackendRegistry, BackendStatus, BackendUnavailableError, lazy_backend


class Counter:
    """Loads of each backend, to check that implementations are cached and failures not retried."""

    def __init__(self) -> None:
        self.loads: dict[str, int] = {}

    def backend(self, name: str, devices: tuple[str, ...], available: bool = True, fails: bool = False) -> Backend[str]:
        def load() -> str:
            self.loads[name] = self.loads.get(name, 0) + 1
            if fails:
                raise BackendUnavailableError(f"toy backend {name!r} is unavailable: its build failed")
            return f"impl-{name}"

        reason = "runs" if available else "library missing"
        return Backend(name, probe=lambda: BackendStatus(available, reason, devices), load=load)


def _registry(counter: Counter, fast_fails: bool = False, fast_available: bool = True) -> BackendRegistry[str]:
    reg: BackendRegistry[str] = BackendRegistry(
        "toy", auto_order={"cuda": ("gpu", "torch"), "cpu": ("fast", "simd", "torch")}
    )
    reg.register(counter.backend("torch", ("cpu", "cuda")))
    reg.register(counter.backend("fast", ("cpu",), available=fast_available, fails=fast_fails))
    reg.register(counter.backend("simd", ("cpu",)))
    reg.register(counter.backend("gpu", ("cuda",)))
    return reg


def test_auto_follows_the_order_of_the_device_type():
    counter = Counter()
    reg = _registry(counter)
    assert reg.resolve("auto", torch.device("cpu")) == "fast"
    assert reg.load("auto", torch.device("cpu")) == ("fast", "impl-fast")
    assert reg.resolve("auto", "cuda") == "gpu"  # probes only: no CUDA needed to resolve
    assert reg.resolve("auto", "mps") == "torch"  # no order of its own: the fallback
    assert counter.loads == {"fast": 1}  # resolving loads nothing; loading loads only the choice
    # An unavailable backend is passed over for the next one.
    assert _registry(Counter(), fast_available=False).load("auto", "cpu") == ("simd", "impl-simd")


def test_loaded_implementations_are_cached():
    counter = Counter()
    reg = _registry(counter)
    for _ in range(3):
        assert reg.load("auto", "cpu")[1] == "impl-fast"
        assert reg.load("simd", "cpu")[1] == "impl-simd"
    assert counter.loads == {"fast": 1, "simd": 1}


def test_auto_skips_a_backend_that_fails_to_load_and_remembers_it(caplog):
    counter = Counter()
    reg = _registry(counter, fast_fails=True)
    with caplog.at_level(logging.WARNING, logger="kernels.registry"):
        assert reg.load("auto", "cpu") == ("simd", "impl-simd")
    assert "'fast' failed to load" in caplog.text and "its build failed" in caplog.text
    assert reg.load("auto", "cpu") == ("simd", "impl-simd")
    assert counter.loads["fast"] == 1  # not retried
    status = reg.status()["fast"]
    assert not status.available and "its build failed" in status.reason
    # Asked for by name, the same failure is an error with its reason.
    with pytest.raises(BackendUnavailableError, match="'fast' is unavailable: its build failed"):
        reg.load("fast", "cpu")
    assert counter.loads["fast"] == 1


def test_a_backend_asked_for_by_name_raises_a_clear_error():
    reg = _registry(Counter(), fast_available=False)
    with pytest.raises(BackendUnavailableError, match=r"unknown toy backend 'nope'; known: torch, fast, simd, gpu"):
        reg.load("nope", "cpu")
    with pytest.raises(BackendUnavailableError, match="toy backend 'fast' is unavailable: library missing"):
        reg.resolve("fast", "cpu")
    with pytest.raises(BackendUnavailableError, match="toy backend 'gpu' runs on cuda, not on cpu"):
        reg.load("gpu", torch.device("cpu"))
    assert reg.load("simd", "cpu") == ("simd", "impl-simd")  # a name is taken even when `auto` would not pick it


def test_a_failing_fallback_is_an_error_not_a_silent_success():
    counter = Counter()
    reg: BackendRegistry[str] = BackendRegistry("toy", auto_order={"cpu": ("torch",)})
    reg.register(counter.backend("torch", ("cpu",), fails=True))
    with pytest.raises(BackendUnavailableError, match="'torch' is unavailable"):
        reg.load("auto", "cpu")


def test_probe_never_raises():
    def broken_probe() -> BackendStatus:
        raise OSError("driver query failed")

    reg = _registry(Counter())
    reg.register(Backend("broken", probe=broken_probe, load=lambda: "impl-broken"))
    reg.register(lazy_backend("missing", "kernels.no_such_backend_module"))
    reg.auto_order["cpu"] = ("broken", "missing", "torch")
    status = reg.status()
    assert not status["broken"].available and "OSError: driver query failed" in status["broken"].reason
    assert not status["missing"].available and "kernels.no_such_backend_module" in status["missing"].reason
    assert reg.load("auto", "cpu") == ("torch", "impl-torch")
    with pytest.raises(BackendUnavailableError, match="'broken' is unavailable: its probe raised OSError"):
        reg.load("broken", "cpu")
    with pytest.raises(BackendUnavailableError, match="'missing' is unavailable: cannot import"):
        reg.load("missing", "cpu")


def test_every_kernel_shares_one_error_and_status_type():
    assert kernels.hashgrid.BackendUnavailableError is BackendUnavailableError
    assert kernels.rasterize.BackendUnavailableError is BackendUnavailableError
    assert kernels.hashgrid.BackendStatus is kernels.rasterize.BackendStatus is BackendStatus
    for status in (kernels.hashgrid.backend_status(), kernels.rasterize.backend_status()):
        assert status["torch"].available and {"cpu", "cuda"} <= set(status["torch"].devices)
