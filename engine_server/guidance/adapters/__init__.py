"""Prior adapters (the diffusers ones and the bundled model's); importing this package registers them."""
from __future__ import annotations

from engine_server.guidance.adapters.bundled import BundledPriorAdapter
from engine_server.guidance.adapters.multi_view import MultiViewAttnProcessor, MultiViewPrior
from engine_server.guidance.adapters.novel_view import CameraProjection, NovelViewPrior
from engine_server.guidance.adapters.stable_diffusion import StableDiffusionPrior

__all__ = ["BundledPriorAdapter", "CameraProjection", "MultiViewAttnProcessor", "MultiViewPrior", "NovelViewPrior", "StableDiffusionPrior"]
