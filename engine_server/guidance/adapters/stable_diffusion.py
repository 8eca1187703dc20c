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
from engine_server.guidance.prior import (
    SINGLE_FILE_CONFIGS,
    PriorInputs,
    PriorLoadError,
    live_ids,
    looks_like_hub_id,
    pipeline_components,
    register_prior,
)

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


OPEN_CLIP_KEY = "cond_stage_model.model.token_embedding.weight"
"""A key only SD 2.x single files hold: their OpenCLIP text encoder (SD 1.x's is ``cond_stage_model.transformer.*``)."""
PARAMETERIZATION = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
"""An original (ldm) config's ``model.params.parameterization`` -> diffusers' ``prediction_type``."""


def checkpoint_family(checkpoint: dict, path: Path) -> str:
    """"1.x" or "2.x" for an original SD checkpoint's state dict, or a ``PriorLoadError`` naming what it is.

    2.x: an OpenCLIP text encoder, or (a file without one) diffusers' own test, 1024-wide cross-attention.
    """
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    if not any(k.startswith("model.diffusion_model.") for k in checkpoint):
        raise PriorLoadError(f"{path} holds no Stable Diffusion UNet (no 'model.diffusion_model.*' weights); "
                             f"expected an original SD 1.x / 2.x checkpoint, found keys {sorted(checkpoint)[:5]}")
    if OPEN_CLIP_KEY in checkpoint:
        return "2.x"
    kind = infer_diffusers_model_type(checkpoint)
    if kind not in ("v1", "v2"):
        raise PriorLoadError(f"{path} is a {kind!r} checkpoint (as diffusers names its family); expected an SD 1.x / "
                             "2.x text-to-image checkpoint (4-channel UNet, CLIP or OpenCLIP text encoder)")
    return "2.x" if kind == "v2" else "1.x"


def declared_prediction(yaml_path: Path) -> str:
    """The ``prediction_type`` an original ``.yaml`` declares (``model.params.parameterization``; absent: eps)."""
    import yaml

    try:
        doc = yaml.safe_load(yaml_path.read_text())
        value = (doc.get("model", {}).get("params") or {}).get("parameterization", "eps")
    except (OSError, yaml.YAMLError, AttributeError) as exc:
        raise PriorLoadError(f"{yaml_path} is no original Stable Diffusion config (model: params: ...): "
                             f"{type(exc).__name__}: {exc}") from exc
    if value not in PARAMETERIZATION:
        raise PriorLoadError(f"{yaml_path}: parameterization {value!r}; expected one of {sorted(PARAMETERIZATION)}")
    return PARAMETERIZATION[value]


def single_file_config(path: Path, family: str, config: str | None) -> tuple[str, str, str | None]:
    """(diffusers config, what chose it, the prediction type ``NAME.yaml`` declares or None) for an SD file.

    ``config`` when given (a hub id or a local diffusers folder). Else ``NAME.yaml`` beside ``NAME.safetensors``
    (the web UIs' convention) picks the live mirror of the file's family with its ``parameterization``. Else
    an SD 1.x file gets 1.5's; an SD 2.x file does not say base (epsilon, 512 px) or 768-v (v-prediction),
    the same architecture, and is refused rather than guessed.
    """
    yaml_path = path.with_suffix(".yaml")
    declared = declared_prediction(yaml_path) if yaml_path.is_file() else None
    if config is not None:
        folder = Path(config).expanduser()
        if folder.is_dir():
            if not (folder / "model_index.json").is_file():
                raise PriorLoadError(f"config folder {folder} has no model_index.json; expected a diffusers "
                                     "Stable Diffusion folder (its configs are what the single file is built from)")
        elif not looks_like_hub_id(config):
            raise PriorLoadError(f"no diffusers config folder at {folder}; expected a local diffusers folder or a hub "
                                 f"id such as {live_ids()}")
        return config, "the config given", declared
    if declared is not None:
        found = SINGLE_FILE_CONFIGS.get((family, declared))
        if found is None:
            raise PriorLoadError(f"{path}: no live diffusers config is known for SD {family} with {declared} "
                                 f"({yaml_path.name}); pass one (--model-config REPO_OR_FOLDER)")
        return found, f"{yaml_path.name}: {declared}", declared
    if family == "2.x":
        raise PriorLoadError(
            f"{path} is an SD 2.x checkpoint, and nothing in it says whether it is 2.x-base (epsilon, 512 px) or "
            f"2.x-768-v (v-prediction): pass its diffusers config (--model-config REPO_OR_FOLDER, e.g. "
            f"{SINGLE_FILE_CONFIGS[('2.x', 'epsilon')]!r} or {SINGLE_FILE_CONFIGS[('2.x', 'v_prediction')]!r}), or "
            f"put its original config beside it as {yaml_path.name} (v2-inference.yaml for base, "
            "v2-inference-v.yaml, with parameterization: \"v\", for 768-v)")
    return SINGLE_FILE_CONFIGS[(family, "epsilon")], "the file's SD 1.x keys", None


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
    def from_single_file(cls, path: Path, device: torch.device, dtype: torch.dtype,
                         config: str | None = None) -> StableDiffusionPrior:
        """An original (ldm-layout) SD 1.x / 2.x checkpoint through diffusers' single-file loading.

        diffusers builds the pipeline from a diffusers config (:func:`single_file_config`: ``config``,
        else the live mirror a ``NAME.yaml`` beside the file or its SD 1.x keys imply); a hub id's
        configs come from the Hugging Face cache when offline, and the error says so.
        """
        from diffusers import StableDiffusionPipeline
        from diffusers.loaders.single_file_utils import load_single_file_checkpoint
        from huggingface_hub import constants

        try:
            checkpoint = load_single_file_checkpoint(str(path), local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file becomes one clear error
            raise PriorLoadError(f"could not read {path} as a single-file checkpoint: {type(exc).__name__}: {exc}") \
                from exc
        family = checkpoint_family(checkpoint, path)
        del checkpoint
        config, chosen_by, declared = single_file_config(path, family, config)
        try:
            pipe = StableDiffusionPipeline.from_single_file(
                str(path), config=config, torch_dtype=dtype, local_files_only=bool(constants.HF_HUB_OFFLINE),
                safety_checker=None, requires_safety_checker=False)
        except Exception as exc:  # noqa: BLE001 - diffusers raises many kinds here; one clear error
            where = "a local folder" if Path(config).expanduser().is_dir() else \
                "on the hub or in the Hugging Face cache" + (" (offline: HF_HUB_OFFLINE is set)"
                                                             if constants.HF_HUB_OFFLINE else "")
            raise PriorLoadError(
                f"could not load single-file checkpoint {path}: diffusers builds it from the diffusers config of "
                f"{config!r} ({chosen_by}), which must be {where} "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); load it once online, or "
                "pass a diffusers folder of the model"
            ) from exc
        predicts = str(pipe.scheduler.config.prediction_type)
        if declared is not None and predicts != declared:
            raise PriorLoadError(
                f"{path}: {path.with_suffix('.yaml').name} says {declared} but the config {config!r} predicts "
                f"{predicts}; pass the config of the model's own family (base: epsilon, 768-v: v_prediction)")
        schedule = DDPMScheduler.from_config(pipe.scheduler.config)
        unet = pipe.unet.to(device).eval().requires_grad_(False)
        vae = pipe.vae.to(device).eval().requires_grad_(False)
        text_encoder = pipe.text_encoder.to(device=device, dtype=dtype).eval().requires_grad_(False)
        prior = cls(unet, vae, text_encoder, pipe.tokenizer, schedule, device, dtype, source=str(path))
        prior.single_file_config = {"config": config, "chosen_by": chosen_by, "family": family}
        logger.info("built %s (SD %s) from the diffusers config %s (%s): %s", path.name, family, config, chosen_by,
                    predicts)
        return prior

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
