"""Progress reporting shared by every pipeline: one callback, one event type, one ``Cancelled``.

No numpy at import time: the service (a protocol-only server included) imports this module for
:class:`Cancelled` and must stay free of numpy and torch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import numpy as np


@dataclass
class ProgressEvent:
    """What a pipeline reports. Previews and meshes come every few steps, not on every event."""

    stage: str
    """Stage name: "coarse", "extract", "texture", "export"."""
    step: int
    """Steps done in this stage."""
    total: int
    """Steps in this stage."""
    loss: float | None = None
    """Latest total loss (distillation stages)."""
    eta_s: float | None = None
    """Estimated seconds left in this stage."""
    preview: np.ndarray | None = None
    """(H, W, 3) uint8 render of the current object, when due."""
    mesh: tuple[np.ndarray, np.ndarray] | None = None
    """Intermediate (vertices (V, 3) float32, faces (F, 3) int64), when due."""


ProgressCallback = Callable[[ProgressEvent], None]


class Cancelled(Exception):
    """The caller asked the pipeline to stop; the worker ends the job as ``cancelled``."""


class StageTimer:
    """ETA of a stage from the mean time per step so far."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.start = time.perf_counter()
        self.done = 0

    def tick(self, done: int) -> float:
        self.done = done
        elapsed = time.perf_counter() - self.start
        return elapsed / max(done, 1) * max(self.total - done, 0)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start
