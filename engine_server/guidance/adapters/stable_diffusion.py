"""Stable Diffusion 1.x / 2.x as a text prior: distil in the VAE latent space (epsilon or v-prediction)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from engine_server.guidance.adapters.base import (
    load_clip_text,
    LatentDiffusionPrior,
    TextConditioned,
    load_noise_schedule,
    load_unet,
    load_vae,
    pipeline_components,
)
from engine_server.guidance.config import Conditioning
from engine_server.guidance.prior import PriorInputs, PriorLoadError, register_prior

logger = logging.getLogger(__name__)

SD_COMPONENTS = {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}


def _is_stable_diffusion(index: dict, folder: Path) -> bool:
    name = str(index.get("_class_name", ""))
    return name.startswith("StableDiffusion") and "XL" not in name and SD_COMPONENTS <= pipeline_components(index)


@register_prior(
    "stable-diffusion",
    matches=_is_stable_diffusion,
    expects="a StableDiffusionPipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)",
)
class StableDiffusionPrior(TextConditioned, LatentDiffusionPrior):
    """Stable Diffusion (1.x / 2.x, epsilon or v-prediction) scoring renders through its VAE latents."""

    kind = "text"

    def __init__(self, unet, vae, text_encoder, tokenizer, schedule, device, dtype, source: str = "") -> None:
        super().__init__(unet, vae, schedule, device, dtype, source)
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self._init_text()
        if unet.config.in_channels != self.latent_channels:
            raise PriorLoadError(
                f"{source}: unet takes {unet.config.in_channels} input channels but the VAE makes "
                f"{self.latent_channels}-channel latents; expected a text-to-image Stable Diffusion UNet"
            )

    @classmethod
    def from_folder(cls, folder: Path, device: torch.device, dtype: torch.dtype) -> StableDiffusionPrior:
        """Load the components of a diffusers Stable Diffusion folder."""
        logger.debug("loading Stable Diffusion components from %s", folder)
        unet = load_unet(folder, device, dtype)
        vae = load_vae(folder, device, dtype)
        text_encoder, tokenizer = load_clip_text(folder, device, dtype)
        schedule = load_noise_schedule(folder)
        return cls(unet, vae, text_encoder, tokenizer, schedule, device, dtype, source=str(folder))

    def prepare_conditioning(
        self, cond: Conditioning, cameras: torch.Tensor, prompts: list[str] | None = None
    ) -> PriorInputs:
        """Text embeddings for B views (per-view ``prompts`` carry view suffixes)."""
        return self.text_inputs(cond, cameras.shape[0], prompts)

    def predict_noise(
        self, latents_t: torch.Tensor, t: torch.Tensor, embeddings: dict[str, Any], cameras: torch.Tensor
    ) -> torch.Tensor:
        """eps (N, 4, h, w) of noisy latents (N, 4, h, w) at t (N,); v-prediction converted."""
        out = self._unet(latents_t, t, embeddings["text"], cameras)
        return self.to_epsilon(out, latents_t, t)
