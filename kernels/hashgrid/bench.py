"""`engine-server bench kernels`: hash-grid throughput of every available backend, side by side.

Config: L=16, F=2, table 2^19, resolutions 16..2048 (Instant-NGP's), `--points` uniform random
points (65,536 by default). Per backend, through `HashGridEncoder`:
- forward: `enc(x)` under no_grad;
- forward_backward: `enc(x)` then `out.backward(grad)` producing the table's dense `.grad`
  (set to None before each step, as `zero_grad()` does); x does not require grad.
Warm-up (one of each, which also builds the CPU kernel on first use) is excluded; each time is
the median of `--repeat` runs. Ratios are to the `torch` reference on the same device, measured
in the same run. Unavailable backends are listed in the notes with the reason.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

from kernels.hashgrid.backends import backend_names, backend_status
from kernels.hashgrid.config import HashGridConfig
from kernels.hashgrid.module import HashGridEncoder

logger = logging.getLogger(__name__)

BENCH_CONFIG = HashGridConfig(
    n_levels=16, n_features=2, log2_table_size=19, base_resolution=16, max_resolution=2048
)
"""The benchmarked grid (Instant-NGP's default)."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, device: torch.device, repeat: int) -> float:
    fn()  # warm-up: builds, autotunes, faults pages in
    _sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(backend: str, device: torch.device, points: int, repeat: int, config: HashGridConfig = BENCH_CONFIG):
    """(forward, forward+backward) median seconds of one backend on one device."""
    enc = HashGridEncoder(config, backend=backend).to(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(points, 3, generator=gen).to(device)
    grad = torch.randn(points, config.output_dim, generator=gen).to(device)

    def forward() -> None:
        with torch.no_grad():
            enc(x)

    def forward_backward() -> None:
        enc.zero_grad(set_to_none=True)
        enc(x).backward(grad)

    return _median_seconds(forward, device, repeat), _median_seconds(forward_backward, device, repeat)


def run(args: argparse.Namespace) -> dict:
    points = int(getattr(args, "points", 65536))
    repeat = max(1, int(getattr(args, "repeat", 5)))
    if points < 1:
        raise ValueError(f"--points must be >= 1, got {points}")
    statuses = backend_status()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    notes = [
        f"{points:,} points, L=16 F=2 T=19 res 16..2048, median of {repeat}; CPU threads: {torch.get_num_threads()}",
        "forward_backward = forward + backward to the table's dense .grad (x without grad); "
        "ratios vs torch on the same device",
    ]
    rows: list[dict] = []
    for device in devices:
        # The reference first: every other backend's ratio is to it.
        names = ["torch"] + [n for n in backend_names() if n != "torch"]
        reference: tuple[float, float] | None = None
        for name in names:
            status = statuses[name]
            if not status.available or device.type not in status.devices:
                if device.type == "cpu" and name != "torch":
                    notes.append(f"{name}: not measured ({status.describe()})")
                continue
            if name == "triton" and device.type == "cpu":
                continue  # the interpreter is for tests, not timing
            logger.info("measuring %s on %s", name, device)
            fwd, fwd_bwd = measure(name, device, points, repeat)
            if name == "torch":
                reference = (fwd, fwd_bwd)
            rows.append(
                {
                    "backend": name,
                    "device": device.type,
                    "forward_points_per_s": points / fwd,
                    "forward_backward_points_per_s": points / fwd_bwd,
                    "forward_ms": fwd * 1e3,
                    "forward_backward_ms": fwd_bwd * 1e3,
                    "forward_ratio": reference[0] / fwd if reference else float("nan"),
                    "forward_backward_ratio": reference[1] / fwd_bwd if reference else float("nan"),
                }
            )
    return {"title": "hash-grid encoding throughput (points/s; ratio vs torch reference)", "rows": rows, "notes": notes}
