"""The one step loop of every iterative pipeline stage, with checkpoint and RNG save-restore.

As in threestudio, a pipeline stage (a :class:`Trainable`) supplies only its training step
(the loss), the state to checkpoint and what to show; :class:`StepLoop` does the rest, the
same way for every stage: resume from the checkpoint, then per step cancel check -> loss ->
non-finite check -> zero_grad / backward / step -> ETA -> progress event (with a preview,
and whatever else the stage shows, when due) -> periodic checkpoint; a final checkpoint
at the end.

A resumed stage must draw the same cameras, noise and timesteps as an uninterrupted one,
so every generator the stage names, torch's global RNG (and CUDA's, when in use) travel
with its models and optimizer: a resumed run is bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from engine_server.pipelines.events import Cancelled, ProgressCallback, ProgressEvent, StageTimer
from engine_server.wire.files import atomic_write

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2
"""Layout of the checkpoint dict; a checkpoint of another layout is ignored (the stage starts over)."""


class Trainable(Protocol):
    """What a stage gives :class:`StepLoop` (threestudio's system)."""

    step: int
    """Steps done; the loop advances it, the training step reads it (schedules)."""
    optimizer: Any
    """Steps the parameters the loss reaches (``zero_grad``, ``step``, ``state_dict``, ``load_state_dict``:
    :class:`~engine_server.pipelines.optim.Adam` or a ``torch.optim`` optimizer)."""
    device: torch.device
    """Where the checkpointed tensors go back to."""

    def training_step(self) -> tuple[torch.Tensor, dict]:
        """One step's scalar loss and a dict of logged values."""

    def checkpoint_state(self) -> dict:
        """The models' state (the loop adds the step, the optimizer and the RNGs)."""

    def restore_state(self, state: dict) -> None:
        """Put back what :meth:`checkpoint_state` returned."""

    def generators(self) -> dict[str, torch.Generator]:
        """The generators a step draws from, by name (besides torch's global RNG)."""

    def snapshot(self) -> dict:
        """Extra :class:`ProgressEvent` fields when a preview is due: ``preview``, optionally ``mesh``."""

    @property
    def checkpoint_key(self) -> str | None:
        """What a checkpoint must have been made from to be resumed (a hash of inputs and config), or None."""


def save_torch(path: Path, state: dict) -> None:
    """``torch.save`` to ``path`` atomically (temp file, fsync, rename)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, buf.getvalue())


def _rng_states(system: Trainable) -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    states.update({name: gen.get_state() for name, gen in system.generators().items()})
    return states


def _restore_rngs(system: Trainable, states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    for name, gen in system.generators().items():
        gen.set_state(states[name])


@dataclass
class StepLoop:
    """Runs a :class:`Trainable` from its checkpoint (if any) to ``total`` steps."""

    stage: str
    """Stage name of the progress events and errors ("coarse", "refine")."""
    total: int
    """Steps of the stage."""
    preview_every: int
    """Steps between events that carry a preview (and the last step's)."""
    checkpoint_every: int
    """Steps between checkpoints (a final one is written at the end)."""
    checkpoint_path: Path | None
    """Where the stage's checkpoint lives; None: no checkpoints."""
    progress: ProgressCallback
    """Receives one event per step."""
    cancelled: Callable[[], bool]
    """Asked once before each step; True raises :class:`Cancelled`."""

    def save(self, system: Trainable) -> None:
        """Write the stage's state (models, optimizer, step, RNGs) when a checkpoint path is set."""
        if self.checkpoint_path is None:
            return
        save_torch(self.checkpoint_path, {
            "format": CHECKPOINT_FORMAT,
            "key": system.checkpoint_key,
            "step": system.step,
            "model": system.checkpoint_state(),
            "optimizer": system.optimizer.state_dict(),
            "rng": _rng_states(system),
        })

    def resume(self, system: Trainable) -> bool:
        """Restore the stage from its checkpoint; False when there is none it can use."""
        path = self.checkpoint_path
        if path is None or not path.exists():
            return False
        state = torch.load(path, map_location=system.device, weights_only=False)
        if state.get("format") != CHECKPOINT_FORMAT or state.get("key") != system.checkpoint_key:
            logger.warning("ignoring the %s checkpoint %s: it belongs to another input, config or version",
                           self.stage, path)
            return False
        system.restore_state(state["model"])
        system.optimizer.load_state_dict(state["optimizer"])
        _restore_rngs(system, state["rng"])
        system.step = int(state["step"])
        logger.info("resumed the %s stage at step %d from %s", self.stage, system.step, path)
        return True

    def run(self, system: Trainable) -> list[float]:
        """Run the remaining steps (resuming when a checkpoint matches); the losses of the steps run."""
        self.resume(system)
        start = system.step
        timer = StageTimer(self.total - start)
        losses: list[float] = []
        self.progress(ProgressEvent(self.stage, start, self.total))  # the stage has begun (a bar at 0 at once)
        while system.step < self.total:
            if self.cancelled():
                raise Cancelled()
            loss, logs = system.training_step()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at {self.stage} step {system.step}")
            system.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            system.optimizer.step()
            system.step += 1
            losses.append(float(loss.detach()))
            logger.debug("%s step %d/%d: loss %.4g %s", self.stage, system.step, self.total, losses[-1], logs)
            eta = timer.tick(system.step - start)
            due = system.step % self.preview_every == 0 or system.step == self.total
            self.progress(ProgressEvent(self.stage, system.step, self.total, losses[-1], eta,
                                        **(system.snapshot() if due else {})))
            if system.step % self.checkpoint_every == 0 and system.step < self.total:
                self.save(system)
        self.save(system)
        return losses
