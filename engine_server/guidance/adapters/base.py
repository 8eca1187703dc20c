"""Pieces shared by the diffusers priors: the VAE latent space, the noise schedule, the UNet call, text prompts."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from engine_server.guidance.config import Conditioning
from engine_server.guidance.prior import (
    EmbeddingCache,
    PriorInputs,
    PriorLoadError,
    camera_vector,
    load_component,
    to_epsilon,
)

logger = logging.getLogger(__name__)


def load_unet(folder: Path, device: torch.device, dtype: torch.dtype) -> UNet2DConditionModel:
    """The ``unet/`` component as a frozen UNet2DConditionModel on ``device`` (weight variant for ``dtype``)."""
    unet = load_component(folder, "unet", UNet2DConditionModel.from_pretrained, "a diffusers UNet2DConditionModel",
                          dtype=dtype)
    return unet.to(device).eval().requires_grad_(False)


def load_vae(folder: Path, device: torch.device, dtype: torch.dtype) -> AutoencoderKL:
    """The ``vae/`` component as a frozen AutoencoderKL on ``device`` (weight variant for ``dtype``)."""
    vae = load_component(folder, "vae", AutoencoderKL.from_pretrained, "a diffusers AutoencoderKL", dtype=dtype)
    return vae.to(device).eval().requires_grad_(False)


def load_clip_text(folder: Path, device: torch.device, dtype: torch.dtype):
    """The frozen CLIP text encoder and its tokenizer of a diffusers folder (SD and multi-view models)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    text_encoder = load_component(folder, "text_encoder", CLIPTextModel.from_pretrained,
                                  "a transformers CLIPTextModel", dtype=dtype)
    text_encoder = text_encoder.to(device=device, dtype=dtype).eval().requires_grad_(False)
    tokenizer = load_component(folder, "tokenizer", CLIPTokenizer.from_pretrained, "a CLIP tokenizer")
    return text_encoder, tokenizer


def load_noise_schedule(folder: Path) -> DDPMScheduler:
    """The ``scheduler/`` config read as a DDPM schedule (betas, alphas_cumprod, prediction type)."""
    return load_component(folder, "scheduler", DDPMScheduler.from_pretrained, "a diffusers scheduler config")


class LatentDiffusionPrior:
    """A latent diffusion model from diffusers: VAE latent space, a UNet, a DDPM noise schedule.

    Subclasses set ``kind`` and implement ``prepare_conditioning`` and ``predict_output`` (the UNet's
    native output); ``predict_noise`` converts it to eps for guidance, samplers step in it directly.
    """

    kind = "text"
    views_per_sample = 1
    encode_chunk = 1
    """Views encoded per VAE call (a chunk's largest encoder block is what the backward pass recomputes at once)."""

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        schedule: DDPMScheduler,
        device: torch.device,
        dtype: torch.dtype,
        source: str = "",
    ) -> None:
        self.unet = unet
        self.vae = vae
        # The encoder's activations are recomputed block by block in the backward pass instead of kept
        # per view: 3.1 -> 0.21 GiB saved per 512 px view for SD's VAE in fp32, for ~35% more encode time.
        vae.enable_gradient_checkpointing()
        self.device = torch.device(device)
        self.dtype = dtype
        self.source = source
        self.num_train_timesteps = int(schedule.config.num_train_timesteps)
        self.scheduler_config = dict(schedule.config)
        """The diffusers scheduler config the model was trained with (samplers build their scheduler from it)."""
        self.prediction_type = str(schedule.config.prediction_type)
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise PriorLoadError(f"{source}: unsupported scheduler prediction_type {self.prediction_type!r}")
        self.alphas_cumprod = schedule.alphas_cumprod.to(self.device, torch.float32)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.scaling_factor = float(vae.config.scaling_factor)
        self.latent_channels = int(vae.config.latent_channels)
        self.resolution = int(unet.config.sample_size) * self.vae_scale_factor

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r}, kind={self.kind}, {self.device}, {self.dtype})"

    # -- latent space ---------------------------------------------------------------------------

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Renders (B, 3, H, W) in [0, 1] -> scaled VAE latents (B, 4, H/f, W/f) float32, differentiable.

        Uses the posterior mean (no sampling noise) times the VAE's scaling factor. The encoder is
        gradient-checkpointed and called on ``encode_chunk`` views at a time: each view keeps only its
        blocks' outputs for the backward pass, which recomputes one chunk's block at a time.
        """
        x = images.to(self.device, self.dtype) * 2.0 - 1.0
        latents = torch.cat([self.vae.encode(chunk).latent_dist.mean for chunk in x.split(self.encode_chunk)])
        return latents.float() * self.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, 4, h, w) -> images (B, 3, h*f, w*f) in [0, 1] (previews, tests)."""
        x = self.vae.decode(latents.to(self.dtype) / self.scaling_factor).sample
        return (x.float() * 0.5 + 0.5).clamp(0, 1)

    # -- denoiser -------------------------------------------------------------------------------

    def class_labels(self, cameras: torch.Tensor | None, n: int) -> torch.Tensor | None:
        """Camera class labels (N, 16) when the UNet has a class embedding (MVDream, VSD's camera LoRA)."""
        if self.unet.class_embedding is None:
            return None
        if cameras is None:
            raise ValueError(f"{type(self).__name__}: this denoiser is camera-conditioned; pass cameras (N, 4, 4)")
        if cameras.shape[0] != n:
            raise ValueError(f"got {cameras.shape[0]} cameras for a batch of {n} latents")
        return camera_vector(cameras.to(self.device)).to(self.dtype)

    def _unet(
        self, sample: torch.Tensor, t: torch.Tensor, context: torch.Tensor, cameras: torch.Tensor | None
    ) -> torch.Tensor:
        out = self.unet(
            sample.to(self.dtype),
            t,
            encoder_hidden_states=context,
            class_labels=self.class_labels(cameras, sample.shape[0]),
            return_dict=False,
        )[0]
        return out.float()

    def predict_output(
        self, latents_t: torch.Tensor, t: torch.Tensor, embeddings: dict[str, Any], cameras: torch.Tensor
    ) -> torch.Tensor:
        """The UNet's native prediction (N, 4, h, w) float32, in ``prediction_type``, of noisy latents at t (N,)."""
        raise NotImplementedError

    def predict_noise(
        self, latents_t: torch.Tensor, t: torch.Tensor, embeddings: dict[str, Any], cameras: torch.Tensor
    ) -> torch.Tensor:
        """eps (N, 4, h, w) of noisy latents (N, 4, h, w) at t (N,): the native output converted."""
        out = self.predict_output(latents_t, t, embeddings, cameras)
        return to_epsilon(out, latents_t, t, self.alphas_cumprod, self.prediction_type)


class TextConditioned:
    """Mixin: CLIP text prompts encoded once and cached (per prompt, and per batch of prompts)."""

    tokenizer: Any
    text_encoder: Any
    device: torch.device
    dtype: torch.dtype

    def _init_text(self) -> None:
        self._prompt_cache = EmbeddingCache(256)
        self._batch_cache = EmbeddingCache(64)
        self._inputs_cache = EmbeddingCache(64)

    @torch.no_grad()
    def _encode_prompt(self, prompt: str) -> torch.Tensor:
        ids = self.tokenizer(
            [prompt],
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return self.text_encoder(ids)[0].to(self.dtype)  # (1, L, D)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings (B, L, D) of ``prompts``, from the cache when seen before."""
        key = tuple(prompts)

        def make() -> torch.Tensor:
            rows = [self._prompt_cache.get(p, lambda p=p: self._encode_prompt(p)) for p in prompts]
            return torch.cat(rows, dim=0)

        return self._batch_cache.get(key, make)

    def text_inputs(self, cond: Conditioning, n: int, prompts: list[str] | None) -> PriorInputs:
        """Conditional / negative-prompt text embeddings for ``n`` views."""
        if prompts is None:
            if cond.prompt is None:
                raise ValueError(f"{type(self).__name__} is text-conditioned: Conditioning.prompt is required")
            prompts = [cond.prompt] * n
        if len(prompts) != n:
            raise ValueError(f"got {len(prompts)} prompts for {n} views")
        negative = [cond.negative_prompt] * n
        return self._inputs_cache.get(  # reused across steps, so its CFG batch is built once too
            (tuple(prompts), cond.negative_prompt),
            lambda: PriorInputs(cond={"text": self.encode_prompts(prompts)},
                                uncond={"text": self.encode_prompts(negative)}),
        )
