"""MVDream-style camera-conditioned multi-view prior, built from stock diffusers classes.

Architecture (as MVDream's "sd-v2.1-base-4view"): Stable Diffusion's UNet where
(1) every self-attention layer attends jointly over the tokens of all N views of
one object ("3D attention"), and (2) a camera embedding, an MLP of the flattened
4x4 camera-to-world, is added to the timestep embedding.

Here (1) is a custom diffusers attention processor (``MultiViewAttnProcessor``)
set on the ``attn1`` layers, which reshapes (B*N, L, C) -> (B, N*L, C) around
ordinary scaled-dot-product attention; (2) is ``UNet2DConditionModel`` with
``class_embed_type="projection"`` and ``projection_class_embeddings_input_dim=16``,
fed ``camera_vector(c2w)``. A folder for this adapter is a diffusers pipeline
folder whose ``model_index.json`` has ``"_class_name": "MVDreamPipeline"``,
components ``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``,
and optionally ``"num_views": N`` (default 4).

The published diffusers-format MVDream (``ashawkey/mvdream-sd2.1-diffusers``) ships its
UNet as a ``MultiViewUNetModel``: MVDream's own config (``model_channels``,
``channel_mult``, ``attention_resolutions``, ``num_head_channels``, ``context_dim``,
``camera_dim`` ...) and ldm-style parameter names (``input_blocks.*``,
``middle_block.*``, ``output_blocks.*``, ``time_embed.*``, ``camera_embed.*``). It is
converted at load time: the config into the equivalent ``UNet2DConditionModel`` one
(:func:`diffusers_unet_config`), the weights by diffusers' own ldm converter with
``camera_embed.0/2`` as the projection class embedding's ``linear_1/2``. Cameras are
Blender c2w, which is MVDream's own convention: its ``get_camera(..., blender_coord=True)``
puts a camera at azimuth a, elevation e at (cos e sin a, -cos e cos a, sin e), looking at the
origin with Blender's camera axes, the engine's :func:`~engine_server.cameras.orbit_position`
and :func:`~engine_server.cameras.look_at` exactly (azimuth 0 is Blender's front view, -Y; a
test holds the two equal). Training views come in rings of ``num_views`` views 90 degrees
apart at one elevation, distance and FOV, as MVDream was trained (``camera_ranges["ring"]``).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from engine_server.guidance.adapters.base import (
    load_clip_text,
    LatentDiffusionPrior,
    TextConditioned,
    load_noise_schedule,
    load_unet,
    load_vae,
)
from engine_server.guidance.config import Conditioning, PriorDefaults, TimestepSchedule
from engine_server.guidance.prior import (
    PriorInputs,
    PriorLoadError,
    pick_weight_files,
    pipeline_components,
    preferred_variant,
    read_component_config,
    read_weights,
    register_prior,
    variant_label,
)

logger = logging.getLogger(__name__)

MV_CLASS_NAMES = {"MVDreamPipeline", "MultiViewDiffusionPipeline"}
CAMERA_DIM = 16

MVDREAM_DEFAULTS = PriorDefaults(
    guidance_scale={"sds": 50.0},
    timesteps=TimestepSchedule(start=(0.98, 0.98), end=(0.02, 0.5), anneal_fraction=0.8),
    camera_ranges={"distance": (2.2, 2.75), "fov": (40.0, 40.0), "elevation": (0.0, 30.0),
                   "default_distance": 2.5, "default_fov": 40.0},
    background_rgb=None,
    render_size=64,  # its config's size for the first 5000 steps, longer than any preset's coarse stage
    anchor="threestudio mvdream-sd21.yaml: guidance scale 50, t from 0.98 to 0.02-0.5 by 80% of the run, "
    "elevation 0..30, relative distance 0.8-1.0 (times 1/tan(fov/2): 2.2-2.75 at its eval FOV 40), "
    "64 px renders (256 after step 5000), learned background",
)
"""MVDream as threestudio distils it."""


class MultiViewState:
    """Shared by every multi-view processor of one UNet: how many consecutive batch items form one object."""

    def __init__(self, num_views: int) -> None:
        self.num_views = num_views


class MultiViewAttnProcessor:
    """Self-attention over the tokens of all views of an object: (B*N, L, C) -> (B, N*L, C) -> attention -> back."""

    def __init__(self, state: MultiViewState) -> None:
        self.state = state
        self.inner = AttnProcessor2_0()

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **kwargs) -> torch.Tensor:
        n = self.state.num_views
        if encoder_hidden_states is not None or hidden_states.dim() != 3 or n <= 1:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        bn, length, channels = hidden_states.shape
        if bn % n:
            raise ValueError(f"multi-view attention: batch {bn} is not a multiple of num_views={n}")
        joint = hidden_states.reshape(bn // n, n * length, channels)
        out = self.inner(attn, joint, None, attention_mask, temb)
        return out.reshape(bn, length, channels)


def install_multiview_attention(unet, state: MultiViewState) -> int:
    """Set ``MultiViewAttnProcessor`` on every self-attention (``attn1``) layer of ``unet``; returns how many."""
    processors = dict(unet.attn_processors)
    count = 0
    for name in processors:
        if name.endswith("attn1.processor"):
            processors[name] = MultiViewAttnProcessor(state)
            count += 1
    unet.set_attn_processor(processors)
    return count


MVDREAM_UNET_CLASS = "MultiViewUNetModel"
MVDREAM_UNET_KEYS = ("image_size", "in_channels", "out_channels", "model_channels", "channel_mult",
                     "attention_resolutions", "num_res_blocks", "context_dim", "camera_dim")
"""Config keys of MVDream's UNet that its diffusers equivalent is built from."""


def diffusers_unet_config(mv: dict) -> dict:
    """The ``UNet2DConditionModel`` config equivalent to an MVDream ``MultiViewUNetModel`` config."""
    missing = [k for k in MVDREAM_UNET_KEYS if k not in mv]
    if missing:
        raise PriorLoadError(f"an MVDream {MVDREAM_UNET_CLASS} config lacks {missing}; expected "
                             f"{', '.join(MVDREAM_UNET_KEYS)} and num_head_channels (or num_heads)")
    try:
        channels = [int(mv["model_channels"]) * int(m) for m in mv["channel_mult"]]
        factors = [2**i for i in range(len(channels))]
        with_attention = {int(r) for r in mv["attention_resolutions"]}
        head_channels = int(mv.get("num_head_channels", -1))
        heads = [c // head_channels if head_channels > 0 else int(mv["num_heads"]) for c in channels]
        return {
            "sample_size": int(mv["image_size"]),
            "in_channels": int(mv["in_channels"]),
            "out_channels": int(mv["out_channels"]),
            "block_out_channels": channels,
            "layers_per_block": int(mv["num_res_blocks"]),
            "down_block_types": ["CrossAttnDownBlock2D" if f in with_attention else "DownBlock2D" for f in factors],
            "up_block_types": ["CrossAttnUpBlock2D" if f in with_attention else "UpBlock2D"
                               for f in reversed(factors)],
            "attention_head_dim": heads,
            "cross_attention_dim": int(mv["context_dim"]),
            "transformer_layers_per_block": int(mv.get("transformer_depth", 1)),
            "use_linear_projection": True,
            "class_embed_type": "projection",
            "projection_class_embeddings_input_dim": int(mv["camera_dim"]),
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise PriorLoadError(f"an MVDream {MVDREAM_UNET_CLASS} config has a bad value ({type(exc).__name__}: "
                             f"{exc}): {mv}") from exc


def load_mvdream_unet(folder: Path, device: torch.device, dtype: torch.dtype) -> UNet2DConditionModel:
    """The published ``MultiViewUNetModel`` (ldm-style names) converted into a ``UNet2DConditionModel``."""
    from diffusers.loaders.single_file_utils import LDM_UNET_KEY, convert_ldm_unet_checkpoint

    sub = folder / "unet"
    config = diffusers_unet_config(read_component_config(folder, "unet"))
    picked = pick_weight_files(sorted(p.name for p in sub.iterdir()), preferred_variant(dtype))
    if picked is None:
        raise PriorLoadError(f"{sub} holds no MultiViewUNetModel weights (*.safetensors or *.bin, default or fp16 "
                             f"variant); found {sorted(p.name for p in sub.iterdir())}")
    state: dict[str, torch.Tensor] = {}
    for name in picked[1]:
        state.update(read_weights(sub / name))
    if "camera_embed.0.weight" not in state or not any(k.startswith("input_blocks.") for k in state):
        raise PriorLoadError(f"{sub / picked[1][0]} has no ldm-style MVDream UNet weights (input_blocks.*, "
                             f"camera_embed.*); found {sorted(state)[:5]}")
    ldm = {LDM_UNET_KEY + k.replace("camera_embed.", "label_emb.0.", 1): v for k, v in state.items()}
    try:
        converted = convert_ldm_unet_checkpoint(ldm, config)
        unet = UNet2DConditionModel(**config)
        unet.load_state_dict(converted, strict=True)
    except (KeyError, RuntimeError, ValueError) as exc:
        raise PriorLoadError(f"could not convert {sub} ({MVDREAM_UNET_CLASS}, weights variant "
                             f"{variant_label(picked[0])}) into a diffusers UNet: {type(exc).__name__}: {exc}") from exc
    logger.info("converted the MVDream UNet of %s (%s weights)", folder, variant_label(picked[0]))
    unet = unet.to(device) if dtype == torch.float32 else unet.to(device=device, dtype=dtype)
    return unet.eval().requires_grad_(False)


def _is_multiview(index: dict, folder: Path) -> bool:
    return str(index.get("_class_name", "")) in MV_CLASS_NAMES


@register_prior(
    "multi-view",
    matches=_is_multiview,
    expects="an MVDreamPipeline folder (model_index.json, unet/ (MVDream's MultiViewUNetModel, or a "
    "UNet2DConditionModel with a 16-d projection class embedding for cameras), vae/, text_encoder/, tokenizer/, "
    "scheduler/)",
)
class MultiViewPrior(TextConditioned, LatentDiffusionPrior):
    """Camera-conditioned multi-view text prior: N views denoised jointly, each with its camera."""

    kind = "multiview"

    def __init__(self, unet, vae, text_encoder, tokenizer, schedule, device, dtype, num_views: int = 4,
                 source: str = "") -> None:
        super().__init__(unet, vae, schedule, device, dtype, source)
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self._init_text()
        self.state = MultiViewState(num_views)
        self.num_attention_layers = install_multiview_attention(unet, self.state)

    @property
    def num_views(self) -> int:
        """Views of one object denoised jointly (consecutive items of a batch)."""
        return self.state.num_views

    @num_views.setter
    def num_views(self, value: int) -> None:
        if value < 1:
            raise ValueError(f"num_views must be >= 1, got {value}")
        self.state.num_views = int(value)

    @property
    def defaults(self) -> PriorDefaults:
        """MVDream's defaults, its training views in rings of this model's ``num_views``."""
        return dataclasses.replace(MVDREAM_DEFAULTS, camera_ranges=self.camera_ranges)

    @property
    def camera_ranges(self) -> dict:
        """The cameras of MVDream's training renders (as threestudio samples them), in rings of num_views."""
        return {**MVDREAM_DEFAULTS.camera_ranges, "ring": self.num_views}

    @property
    def views_per_sample(self) -> int:  # type: ignore[override]
        """Views sharing one timestep: all views of an object."""
        return self.state.num_views

    @classmethod
    def from_folder(cls, folder: Path, device: torch.device, dtype: torch.dtype) -> MultiViewPrior:
        """Load an MVDream folder: the published layout (its UNet converted) or the diffusers-native one."""
        from engine_server.guidance.prior import read_model_index

        index = read_model_index(folder)
        missing = {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} - set(pipeline_components(index))
        if missing:
            raise PriorLoadError(f"{folder}: model_index.json lacks components {sorted(missing)} of an MVDream folder")
        unet_cfg = read_component_config(folder, "unet")
        if unet_cfg.get("_class_name") == MVDREAM_UNET_CLASS:
            unet = load_mvdream_unet(folder, device, dtype)
        elif unet_cfg.get("_class_name") != "UNet2DConditionModel":
            raise PriorLoadError(
                f"{folder}/unet is a {unet_cfg.get('_class_name')!r}; expected MVDream's {MVDREAM_UNET_CLASS} or "
                "a diffusers UNet2DConditionModel with class_embed_type='projection'"
            )
        elif unet_cfg.get("class_embed_type") != "projection" or \
                unet_cfg.get("projection_class_embeddings_input_dim") != CAMERA_DIM:
            raise PriorLoadError(
                f"{folder}/unet has class_embed_type={unet_cfg.get('class_embed_type')!r}, "
                f"projection_class_embeddings_input_dim={unet_cfg.get('projection_class_embeddings_input_dim')!r}; "
                f"expected 'projection' and {CAMERA_DIM} (the camera embedding of a multi-view model)"
            )
        else:
            unet = load_unet(folder, device, dtype)
        vae = load_vae(folder, device, dtype)
        text_encoder, tokenizer = load_clip_text(folder, device, dtype)
        schedule = load_noise_schedule(folder)
        num_views = int(index.get("num_views", 4))
        return cls(unet, vae, text_encoder, tokenizer, schedule, device, dtype, num_views, source=str(folder))

    def prepare_conditioning(
        self, cond: Conditioning, cameras: torch.Tensor, prompts: list[str] | None = None
    ) -> PriorInputs:
        """Text embeddings for B views; the views' cameras go to ``predict_output`` instead of the prompt."""
        n = cameras.shape[0]
        if n % self.num_views:
            raise ValueError(f"a multi-view prior needs a multiple of {self.num_views} views per batch, got {n}")
        return self.text_inputs(cond, n, prompts)

    def predict_output(
        self, latents_t: torch.Tensor, t: torch.Tensor, embeddings: dict[str, Any], cameras: torch.Tensor
    ) -> torch.Tensor:
        """The UNet's output (N, 4, h, w); N is a multiple of num_views, consecutive groups are one object's views."""
        return self._unet(latents_t, t, embeddings["text"], cameras)
