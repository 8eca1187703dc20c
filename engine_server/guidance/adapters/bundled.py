"""Thin adapter: the project's bundled pixel-space prior (``engine_server.models.bundled.prior``) as a ``Prior``.

Registered as "bundled" with the shipped weights folder, so ``load_prior("bundled")``
loads them through the same registry as the diffusers adapters (and
``load_prior(folder, adapter="bundled")`` another trained copy).

The bundled model denoises 3-channel images in [-1, 1] directly (``encode_images``
is 2x - 1, so the distillation gradient lands on the renders with no encoder),
is conditioned per view on its camera (so it gets cameras, not view-dependent
prompt suffixes) and on an optional reference view, and predicts v. It has no
diffusers UNet; LoRA adapters (VSD's, BSD's) go on its plain ``network`` through peft. Its unconditional
branch is "no prompt, no reference, same cameras", as the model was trained.
Negative prompts are ignored: the model has no text encoder for them.
The model's weights stay fp32 whatever dtype is asked for (it is small); score distillation runs its
forward pass in bfloat16 on CPUs that compute it natively (``distill_dtype``: 0.68x the fp32 time on two
such cores, the distillation gradient within a few percent), sampling in fp32.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from engine_server.guidance.config import Conditioning
from engine_server.guidance.prior import (
    BUNDLED,
    EmbeddingCache,
    PriorInputs,
    PriorLoadError,
    register_prior,
    tensor_key,
    to_epsilon,
)
from engine_server.models.bundled.evaluate import caption_match
from engine_server.models.bundled.prior import DEFAULT_WEIGHTS_DIR, BundledPrior, Reference, UnknownPromptError

logger = logging.getLogger(__name__)


@register_prior(BUNDLED, expects="the bundled model's weights (config.json + model.safetensors)",
                folder=DEFAULT_WEIGHTS_DIR)
class BundledPriorAdapter:
    """``Prior`` over a ``BundledPrior``: pixel space, camera-conditioned, optionally image-conditioned."""

    kind = "multiview"
    """Camera-aware: each view is conditioned on its own camera (denoised independently)."""
    views_per_sample = 1
    unet = None

    def __init__(self, bundled: BundledPrior, distill_dtype: torch.dtype | None = None) -> None:
        from engine_server.devices import cpu_has_native_bf16

        self.bundled = bundled
        self.network = bundled.model
        """The denoiser network, where LoRA adapters go (:func:`~engine_server.guidance.score.lora_network`)."""
        self.device = bundled.device
        self.dtype = torch.float32
        if distill_dtype is None:
            distill_dtype = torch.bfloat16 if self.device.type == "cpu" and cpu_has_native_bf16() else torch.float32
        self.distill_dtype = distill_dtype
        """Precision of the forward passes score distillation makes (``predict_noise``); sampling stays fp32."""
        self.num_train_timesteps = int(bundled.num_train_timesteps)
        self.prediction_type = str(bundled.prediction_type)
        self.alphas_cumprod = bundled.alphas_cumprod.to(self.device, torch.float32)
        self.resolution = int(bundled.resolution)
        self.source = str(bundled.path or "bundled")
        self._captions = EmbeddingCache(64)
        self._references = EmbeddingCache(4)

    @classmethod
    def from_folder(cls, folder: Path, device: torch.device, dtype: torch.dtype | None = None) -> BundledPriorAdapter:
        """The weights in ``folder`` (fp32 whatever ``dtype``); a missing or broken folder is a ``PriorLoadError``."""
        try:
            bundled = BundledPrior.load(folder, device=device)
        except (FileNotFoundError, ValueError, OSError) as exc:
            raise PriorLoadError(f"the bundled model is not available: could not load its weights from "
                                 f"{folder} ({exc})") from exc
        return cls(bundled)

    def __repr__(self) -> str:
        return f"BundledPriorAdapter({self.source!r}, {self.device})"

    @property
    def background_rgb(self) -> tuple[float, float, float]:
        """The plain background the model was trained on (pipelines render onto it)."""
        return self.bundled.background_rgb

    @property
    def scheduler_config(self) -> dict:
        """The diffusers DDIM config the model is sampled with (zero-terminal-SNR, trailing spacing, v)."""
        return dict(self.bundled.scheduler.config)

    @property
    def camera_ranges(self) -> dict:
        """The model's training camera ranges (distance, fov, elevation)."""
        return self.bundled.camera_ranges

    @property
    def lighting(self) -> dict:
        """The world-fixed lights of the model's training renders."""
        return self.bundled.lighting

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Renders (B, 3, H, W) in [0, 1] -> the model's space, [-1, 1] (identity up to scale)."""
        return images.to(self.device, torch.float32) * 2.0 - 1.0

    def prepare_conditioning(
        self, cond: Conditioning, cameras: torch.Tensor, prompts: list[str] | None = None
    ) -> PriorInputs:
        """Parsed prompt and (resized) reference view for B views; per-view ``prompts`` are not used."""
        n = cameras.shape[0]
        caption = None
        if cond.prompt:
            try:
                caption = self._captions.get(cond.prompt, lambda: self.bundled.parse_prompt(cond.prompt))
            except UnknownPromptError as exc:
                raise ValueError(f"the bundled prior does not know this prompt: {exc}") from exc
        reference = None
        if cond.reference_image is not None:
            if cond.reference_c2w is None:
                raise ValueError("Conditioning.reference_image needs reference_c2w for the bundled prior")
            ref = cond.reference_image
            reference = self._references.get(tensor_key(ref), lambda: (ref, self._reference(cond)))[1]
        if caption is None and reference is None:
            raise ValueError("the bundled prior needs Conditioning.prompt or a reference image")
        return PriorInputs(
            cond={"caption": [caption] * n, "reference": [reference] * n},
            uncond={"caption": [None] * n, "reference": [None] * n},
        )

    def _reference(self, cond: Conditioning) -> Reference:
        img = cond.reference_image.to(self.device, torch.float32).clamp(0, 1)
        res = self.resolution
        if tuple(img.shape[-2:]) != (res, res):
            img = F.interpolate(img[None], size=(res, res), mode="bilinear", align_corners=False,
                                antialias=img.shape[-1] > res)[0]
        return Reference(image=img, c2w=cond.reference_c2w.to(self.device, torch.float32), fov=cond.fov_y_deg)

    def predict_noise(
        self, latents_t: torch.Tensor, t: torch.Tensor, embeddings: dict[str, Any], cameras: torch.Tensor
    ) -> torch.Tensor:
        """eps (N, 3, H, W) of noisy images (N, 3, H, W) at timesteps t (N,): the native output converted,
        computed in ``distill_dtype``."""
        with torch.autocast(self.device.type, dtype=self.distill_dtype,
                            enabled=self.distill_dtype != torch.float32):
            out = self.predict_output(latents_t, t, embeddings, cameras)
        return to_epsilon(out.float(), latents_t, t, self.alphas_cumprod, self.prediction_type)

    def predict_output(
        self, latents_t: torch.Tensor, t: torch.Tensor, embeddings: dict[str, Any], cameras: torch.Tensor
    ) -> torch.Tensor:
        """The native v-prediction (N, 3, H, W): one model call per run of views sharing a reference
        (captions go per row, so both branches of a text-only guidance step are one batch).

        Samplers step in this (at zero terminal SNR the first step's eps equals the input, v does not).
        """
        captions, references = embeddings["caption"], embeddings["reference"]
        cameras = cameras.to(self.device, torch.float32)
        outs = []
        start = 0
        n = latents_t.shape[0]
        while start < n:
            end = start + 1
            while end < n and references[end] is references[start]:
                end += 1
            outs.append(self.bundled.predict(latents_t[start:end], t[start:end], list(captions[start:end]),
                                             cameras[start:end], references[start], guidance_scale=1.0))
            start = end
        return torch.cat(outs).float() if len(outs) > 1 else outs[0].float()

    def check_views(
        self, images: torch.Tensor, cameras: torch.Tensor, fovs: torch.Tensor, prompt: str
    ) -> tuple[torch.Tensor, list[str | None]]:
        """Whether views (N, 3, R, R) in [0, 1] at cameras (N, 4, 4), FOVs (N,) show ``prompt``'s object.

        Returns a score (N,) (higher is closer) and per view None or what is wrong. See
        :func:`engine_server.models.bundled.evaluate.caption_match`: the silhouette against the
        training renderer's for the caption at that camera, and the colour word of the foreground.
        """
        caption = self._captions.get(prompt, lambda: self.bundled.parse_prompt(prompt))
        return caption_match(images.float().cpu(), cameras.float().cpu(), fovs.float().cpu(), caption)
