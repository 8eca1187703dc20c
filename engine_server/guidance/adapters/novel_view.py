"""Zero123-family novel-view prior: a reference image plus the relative camera of each rendered view.

Layout of the diffusers ports of Zero123 ("bennyguo/zero123-xl-diffusers" as
threestudio uses it, "kxic/zero123-xl-diffusers" of the diffusers community
pipeline): ``vae/`` AutoencoderKL, ``image_encoder/`` CLIPVisionModelWithProjection,
``unet/`` UNet2DConditionModel with 8 input channels (noisy latent concatenated
with the reference view's *unscaled* VAE latent), ``scheduler/``, an optional
``feature_extractor/`` CLIPImageProcessor, and a linear camera projection
``clip_camera_projection/`` (weights ``proj.*``) or ``cc_projection/``
(weights ``projection.*``) mapping [CLIP image embedding, relative camera]
(768 + 4 -> 768) to the UNet's cross-attention context.

The relative camera is Zero123's [polar delta (rad), sin(azimuth delta),
cos(azimuth delta), radius delta], polar = 90 deg - elevation, i.e.
[-radians(d_elevation), sin(d_azimuth), cos(d_azimuth), d_radius].
Classifier-free guidance's unconditional branch is a zero context and a zero
reference latent, as in Zero123's training.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from transformers import CLIPVisionModelWithProjection

from engine_server.cameras import azimuth_elevation
from engine_server.guidance.adapters.base import (
    LatentDiffusionPrior,
    load_noise_schedule,
    load_unet,
    load_vae,
)
from engine_server.guidance.config import Conditioning, PriorDefaults, TimestepSchedule
from engine_server.guidance.prior import (
    EmbeddingCache,
    PriorInputs,
    PriorLoadError,
    load_component,
    pick_weight_files,
    pipeline_components,
    preferred_variant,
    read_weights,
    register_prior,
    tensor_key,
)

logger = logging.getLogger(__name__)

ZERO123_CLASS_NAMES = {"Zero123Pipeline", "Zero1to3StableDiffusionPipeline", "Zero1to3Pipeline"}
PROJECTION_COMPONENTS = ("clip_camera_projection", "cc_projection")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CAMERA_FEATURES = 4

ZERO123_DEFAULTS = PriorDefaults(
    guidance_scale={"sds": 3.0},
    timesteps=TimestepSchedule(start=(0.02, 0.98), end=(0.02, 0.98)),
    camera_ranges={"distance": (1.5, 2.2), "fov": (49.1, 49.1), "elevation": (-10.0, 60.0),
                   "default_distance": 2.0, "default_fov": 49.1},
    background_rgb=(1.0, 1.0, 1.0),
    render_size=None,
    anchor="Zero123 (Liu et al. 2023): Objaverse renders on white, objects in [-0.5, 0.5]^3, cameras 1.5-2.2 "
    "away at FOV 49.1; threestudio zero123.yaml: guidance scale 3, t 0.02-0.98, elevation -10..60",
)
"""Zero123-family priors as trained (cameras, background) and as threestudio distils them."""


class CameraProjection(ModelMixin, ConfigMixin):
    """[CLIP image embedding, relative camera] -> cross-attention context: one linear layer."""

    @register_to_config
    def __init__(self, embedding_dim: int = 768, additional_embeddings: int = CAMERA_FEATURES,
                 output_dim: int | None = None) -> None:
        super().__init__()
        self.proj = nn.Linear(embedding_dim + additional_embeddings, output_dim or embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., embedding_dim + 4) -> (..., output_dim)."""
        return self.proj(x)


def load_camera_projection(folder: Path, device: torch.device, dtype: torch.dtype) -> nn.Linear:
    """The linear camera projection of a Zero123 folder, whichever of the two known layouts it uses."""
    for component in PROJECTION_COMPONENTS:
        sub = folder / component
        if sub.is_dir():
            break
    else:
        raise PriorLoadError(f"{folder} has no {' or '.join(PROJECTION_COMPONENTS)}/ folder; expected the "
                             "Zero123 camera projection (a linear layer, CLIP embedding + 4 -> context) there")
    state = _read_state_dict(sub, preferred_variant(dtype))
    weights = {k: v for k, v in state.items() if k.endswith("weight") and v.dim() == 2}
    if len(weights) != 1:
        raise PriorLoadError(f"{sub}: expected exactly one linear layer's weight, found {sorted(state)}")
    (w_key, weight), = weights.items()
    bias = state.get(w_key[: -len("weight")] + "bias")
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _read_state_dict(sub: Path, preferred: str | None) -> dict[str, torch.Tensor]:
    picked = pick_weight_files(sorted(p.name for p in sub.iterdir()), preferred)
    if picked is None or len(picked[1]) != 1:
        raise PriorLoadError(f"{sub} holds no single weights file (*.safetensors or *.bin, default or fp16 "
                             f"variant); found {sorted(p.name for p in sub.iterdir())}")
    return read_weights(sub / picked[1][0])


def _is_zero123(index: dict, folder: Path) -> bool:
    comps = set(pipeline_components(index))
    if str(index.get("_class_name", "")) in ZERO123_CLASS_NAMES:
        return True
    return "image_encoder" in comps and "unet" in comps and any(c in comps for c in PROJECTION_COMPONENTS)


def relative_camera(cameras: torch.Tensor, reference_c2w: torch.Tensor) -> torch.Tensor:
    """Zero123's relative camera (B, 4) of views (B, 4, 4) w.r.t. the reference view (4, 4)."""
    cams = cameras.to(torch.float32)
    ref = reference_c2w.to(cams.device, torch.float32)
    az, el = azimuth_elevation(cams)
    az0, el0 = azimuth_elevation(ref)
    radius = cams[:, :3, 3].norm(dim=-1)
    radius0 = ref[:3, 3].norm()
    d_az = torch.deg2rad(az - az0)
    return torch.stack([torch.deg2rad(-(el - el0)), torch.sin(d_az), torch.cos(d_az), radius - radius0], dim=-1)


@register_prior(
    "novel-view",
    matches=_is_zero123,
    expects="a Zero123 folder (model_index.json, unet/ with 8 input channels, vae/, image_encoder/, scheduler/, "
    "clip_camera_projection/ or cc_projection/)",
)
class NovelViewPrior(LatentDiffusionPrior):
    """Image-conditioned novel-view prior (Zero123 family)."""

    kind = "image"
    defaults = ZERO123_DEFAULTS
    background_rgb = ZERO123_DEFAULTS.background_rgb
    """White: Zero123 was trained on white backgrounds (the reference and renders are composited on it)."""
    camera_ranges = ZERO123_DEFAULTS.camera_ranges
    """Zero123's training cameras (the reference view's default distance and FOV among them)."""

    def __init__(self, unet, vae, image_encoder, projection: nn.Linear, schedule, device, dtype,
                 image_mean=CLIP_MEAN, image_std=CLIP_STD, source: str = "") -> None:
        super().__init__(unet, vae, schedule, device, dtype, source)
        self.image_encoder = image_encoder
        self.projection = projection
        if unet.config.in_channels != 2 * self.latent_channels:
            raise PriorLoadError(
                f"{source}: unet takes {unet.config.in_channels} input channels; a Zero123 UNet takes "
                f"{2 * self.latent_channels} (noisy latent + reference latent)"
            )
        ctx = unet.config.cross_attention_dim
        if projection.out_features != ctx:
            raise PriorLoadError(
                f"{source}: camera projection outputs {projection.out_features} features, the unet's "
                f"cross-attention takes {ctx}"
            )
        self.image_size = int(image_encoder.config.image_size)
        self._mean = torch.tensor(image_mean, device=self.device, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(image_std, device=self.device, dtype=torch.float32).view(1, 3, 1, 1)
        self._reference_cache = EmbeddingCache(4)

    @classmethod
    def from_folder(cls, folder: Path, device: torch.device, dtype: torch.dtype) -> NovelViewPrior:
        """Load the components of a Zero123-family diffusers folder."""
        unet = load_unet(folder, device, dtype)
        vae = load_vae(folder, device, dtype)
        image_encoder = load_component(folder, "image_encoder", CLIPVisionModelWithProjection.from_pretrained,
                                       "a transformers CLIPVisionModelWithProjection", dtype=dtype)
        image_encoder = image_encoder.to(device=device, dtype=dtype).eval().requires_grad_(False)
        projection = load_camera_projection(folder, device, dtype)
        schedule = load_noise_schedule(folder)
        mean, std = CLIP_MEAN, CLIP_STD
        pre = folder / "feature_extractor" / "preprocessor_config.json"
        if pre.is_file():
            cfg = json.loads(pre.read_text())
            mean, std = tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
        return cls(unet, vae, image_encoder, projection, schedule, device, dtype, mean, std, source=str(folder))

    @torch.no_grad()
    def _encode_reference(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP image embedding (1, 1, D) and unscaled VAE latent (1, 4, h, w) of a reference (3, H, W)."""
        img = image.to(self.device, torch.float32)[None].clamp(0, 1)
        clip_in = F.interpolate(img, size=(self.image_size, self.image_size), mode="bicubic",
                                align_corners=False, antialias=True)
        clip_in = (clip_in - self._mean) / self._std
        embed = self.image_encoder(clip_in.to(self.dtype)).image_embeds[:, None, :]
        vae_in = F.interpolate(img, size=(self.resolution, self.resolution), mode="bilinear",
                               align_corners=False, antialias=True)
        latent = self.vae.encode((vae_in * 2 - 1).to(self.dtype)).latent_dist.mode()
        return embed, latent

    def prepare_conditioning(
        self, cond: Conditioning, cameras: torch.Tensor, prompts: list[str] | None = None
    ) -> PriorInputs:
        """Context (B, 1, D) from the reference's CLIP embedding and each view's relative camera, and the
        reference latent (B, 4, h, w); ``prompts`` are ignored (Zero123 takes no text)."""
        if cond.reference_image is None or cond.reference_c2w is None:
            raise ValueError("an image-conditioned prior needs Conditioning.reference_image and reference_c2w")
        ref = cond.reference_image
        embed, latent = self._reference_cache.get(tensor_key(ref), lambda: (ref, *self._encode_reference(ref)))[1:]
        n = cameras.shape[0]
        with torch.no_grad():
            rel = relative_camera(cameras.to(self.device), cond.reference_c2w).to(self.dtype)[:, None, :]
            context = self.projection(torch.cat([embed.expand(n, -1, -1), rel], dim=-1))
        latents = latent.expand(n, -1, -1, -1)
        return PriorInputs(
            cond={"context": context, "reference": latents},
            uncond={"context": torch.zeros_like(context), "reference": torch.zeros_like(latents)},
        )

    def predict_output(
        self, latents_t: torch.Tensor, t: torch.Tensor, embeddings: dict[str, Any], cameras: torch.Tensor
    ) -> torch.Tensor:
        """The UNet's output (N, 4, h, w) for noisy latents at t, given the reference latent and camera context."""
        sample = torch.cat([latents_t.to(self.dtype), embeddings["reference"]], dim=1)
        return self._unet(sample, t, embeddings["context"], cameras)

