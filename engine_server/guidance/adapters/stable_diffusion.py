"""Stable Diffusion 1.x / 2.x as a text prior: distil in the VAE latent space (epsilon or v-prediction)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler

from engine_server.guidance.adapters.base import (
    load_clip_text,
    LatentDiffusionPrior,
    TextConditioned,
    load_noise_schedule,
    load_unet,
    load_vae,
)
from engine_server.guidance.config import Conditioning, PriorDefaults, TimestepSchedule
from engine_server.guidance.prior import PriorInputs, PriorLoadError, pipeline_components, register_prior

logger = logging.getLogger(__name__)

SD_COMPONENTS = {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}

SD_DEFAULTS = PriorDefaults(
    guidance_scale={"sds": 100.0, "vsd": 7.5},
    timesteps=TimestepSchedule(start=(0.02, 0.98), end=(0.02, 0.98)),
    camera_ranges={"distance": (1.0, 1.5), "fov": (40.0, 70.0), "elevation": (-10.0, 45.0),
                   "default_distance": 1.25, "default_fov": 55.0},
    background_rgb=None,
    render_size=64,  # doctor: 4 views at 256 px estimate ~47 GiB of renderer alone on CPU, at 64 px ~3 GiB
    anchor="DreamFusion / threestudio dreamfusion-sd.yaml (SDS scale 100, t 0.02-0.98, 64 px renders), "
    "prolificdreamer.yaml (VSD scale 7.5; radius-1 scene, cameras 1.0-1.5 away, FOV 40-70, elevation -10..45, "
    "64 px renders in its first stage, resized to 512 for the VAE, learned background)",
)
"""Stable Diffusion 1.x / 2.x as threestudio distils it."""


def _is_stable_diffusion(index: dict, folder: Path) -> bool:
    name = str(index.get("_class_name", ""))
    return name.startswith("StableDiffusion") and "XL" not in name and SD_COMPONENTS <= set(pipeline_components(index))


@register_prior(
    "stable-diffusion",
    matches=_is_stable_diffusion,
    expects="a StableDiffusionPipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)",
)
class StableDiffusionPrior(TextConditioned, LatentDiffusionPrior):
    """Stable Diffusion (1.x / 2.x, epsilon or v-prediction) scoring renders through its VAE latents."""

    kind = "text"
    defaults = SD_DEFAULTS

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

    @classmethod
    def from_single_file(cls, path: Path, device: torch.device, dtype: torch.dtype) -> StableDiffusionPrior:
        """An original (ldm-layout) SD 1.x / 2.x checkpoint through diffusers' single-file loading.

        diffusers builds the pipeline from the diffusers config of the family it infers from the
        checkpoint's keys (a hub repo: ``stable-diffusion-v1-5/stable-diffusion-v1-5`` for 1.x); with
        no network that config must already be in the Hugging Face cache, and the error says so.
        """
        from diffusers import StableDiffusionPipeline
        from diffusers.loaders.single_file_utils import fetch_diffusers_config, load_single_file_checkpoint
        from huggingface_hub import constants

        try:
            checkpoint = load_single_file_checkpoint(str(path), local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file becomes one clear error
            raise PriorLoadError(f"could not read {path} as a single-file checkpoint: {type(exc).__name__}: {exc}") \
                from exc
        if not any(k.startswith("model.diffusion_model.") for k in checkpoint):
            raise PriorLoadError(f"{path} holds no Stable Diffusion UNet (no 'model.diffusion_model.*' weights); "
                                 f"expected an original SD 1.x / 2.x checkpoint, found keys {sorted(checkpoint)[:5]}")
        config = fetch_diffusers_config(checkpoint)["pretrained_model_name_or_path"]
        del checkpoint
        try:
            pipe = StableDiffusionPipeline.from_single_file(
                str(path), config=config, torch_dtype=dtype, local_files_only=bool(constants.HF_HUB_OFFLINE),
                safety_checker=None, requires_safety_checker=False)
        except Exception as exc:  # noqa: BLE001 - diffusers raises many kinds here; one clear error
            offline = " (offline: HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
            raise PriorLoadError(
                f"could not load single-file checkpoint {path}: diffusers builds it from the diffusers config of "
                f"{config!r}, which must be on the hub or in the Hugging Face cache{offline} "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); load it once online, or "
                "pass a diffusers folder of the model"
            ) from exc
        schedule = DDPMScheduler.from_config(pipe.scheduler.config)
        unet = pipe.unet.to(device).eval().requires_grad_(False)
        vae = pipe.vae.to(device).eval().requires_grad_(False)
        text_encoder = pipe.text_encoder.to(device=device, dtype=dtype).eval().requires_grad_(False)
        return cls(unet, vae, text_encoder, pipe.tokenizer, schedule, device, dtype, source=str(path))

    def prepare_conditioning(
        self, cond: Conditioning, cameras: torch.Tensor, prompts: list[str] | None = None
    ) -> PriorInputs:
        """Text embeddings for B views (per-view ``prompts`` carry view suffixes)."""
        return self.text_inputs(cond, cameras.shape[0], prompts)

    def predict_output(
        self, latents_t: torch.Tensor, t: torch.Tensor, embeddings: dict[str, Any], cameras: torch.Tensor
    ) -> torch.Tensor:
        """The UNet's output (N, 4, h, w) for noisy latents (N, 4, h, w) at t (N,): eps, v or x0 as trained."""
        return self._unet(latents_t, t, embeddings["text"], cameras)
