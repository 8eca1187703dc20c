"""The bundled prior: a small diffusion model trained here on procedural objects, shipped with the engine.

Modules: ``vocab`` (prompt parsing), ``procedural`` (SDF objects + renderer),
``model`` (network, save/load), ``train``, ``evaluate`` (+ model card),
``prior`` (run-time API: :class:`~engine_server.models.bundled.prior.BundledPrior`),
``commands`` (CLI). Importing this package does not import torch.
"""
from __future__ import annotations

import json
from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
"""Folder of the shipped weights."""


def bundled_info() -> dict:
    """What ``engine-server info`` shows about the bundled model (no torch import)."""
    from engine_server.models.bundled.vocab import vocabulary

    info: dict = {"path": str(WEIGHTS_DIR), "vocabulary": vocabulary()}
    cfg_path = WEIGHTS_DIR / "config.json"
    if not cfg_path.is_file():
        info["status"] = f"missing ({cfg_path} not found; run engine-server train-bundled --export)"
        return info
    cfg = json.loads(cfg_path.read_text())
    train_path = WEIGHTS_DIR / "training_info.json"
    train = json.loads(train_path.read_text()) if train_path.is_file() else {}
    size = sum(f.stat().st_size for f in WEIGHTS_DIR.iterdir() if f.is_file())
    info.update({
        "status": "ok",
        "resolution": cfg["resolution"],
        "prediction_type": cfg["prediction_type"],
        "background_rgb": cfg.get("extra", {}).get("background_rgb"),
        "trained_steps": train.get("step"),
        "size_mb": round(size / 1e6, 2),
    })
    return info
