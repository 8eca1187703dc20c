"""Prior adapters: the bundled model's and the diffusers ones.

Importing an adapter's module registers it (``@register_prior``). The bundled one is registered when
``engine_server.guidance`` is imported; the diffusers ones, whose modules import diffusers and
transformers (seconds on a CPU), only when a prior that needs them is looked up
(:func:`register_all`, called by ``load_prior`` and friends) or one of the names below is used.
"""
from __future__ import annotations

import importlib

_WHERE = {
    "BundledPriorAdapter": "bundled",
    "MultiViewAttnProcessor": "multi_view",
    "MultiViewPrior": "multi_view",
    "CameraProjection": "novel_view",
    "NovelViewPrior": "novel_view",
    "StableDiffusionPrior": "stable_diffusion",
}

__all__ = sorted(_WHERE)


def register_all() -> None:
    """Import (and so register) every adapter module."""
    for module in sorted(set(_WHERE.values())):
        importlib.import_module(f"{__name__}.{module}")


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
