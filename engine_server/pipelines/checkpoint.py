"""Pipeline checkpoints: torch state written atomically, with every RNG a resumed run needs.

A resumed stage must draw the same cameras, noise and timesteps as an uninterrupted
one, so the data generator, torch's global RNG and the guidance's noise generator
travel with the models and optimizer.
"""
from __future__ import annotations

import io
from pathlib import Path

import torch

from engine_server.wire.files import atomic_write


def save_torch(path: Path, state: dict) -> None:
    """``torch.save`` to ``path`` atomically (temp file, fsync, rename)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, buf.getvalue())


def save_checkpoint(path: Path, state: dict, gen: torch.Generator, guidance) -> None:
    """Write ``state`` (models, optimizer, step, ...) plus the RNG states, atomically."""
    save_torch(path, {**state, "rng": gen.get_state(), "torch_rng": torch.get_rng_state(),
                      "guidance_rng": guidance.generator.get_state() if hasattr(guidance, "generator") else None})


def restore_rngs(state: dict, gen: torch.Generator, guidance) -> None:
    """Put back the RNG states that :func:`save_checkpoint` stored."""
    gen.set_state(state["rng"])
    torch.set_rng_state(state["torch_rng"])
    if state.get("guidance_rng") is not None and hasattr(guidance, "generator"):
        guidance.generator.set_state(state["guidance_rng"])
