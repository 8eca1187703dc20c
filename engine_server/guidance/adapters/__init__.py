"""Diffusers prior adapters; importing this package registers them with ``register_prior``."""
from __future__ import annotations

from engine_server.guidance.adapters.multi_view import MultiViewAttnProcessor, MultiViewPrior
from engine_server.guidance.adapters.novel_view import CameraProjection, NovelViewPrior
from engine_server.guidance.adapters.stable_diffusion import StableDiffusionPrior

__all__ = ["CameraProjection", "MultiViewAttnProcessor", "MultiViewPrior", "NovelViewPrior", "StableDiffusionPrior"]
