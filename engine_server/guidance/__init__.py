"""Score distillation guidance from diffusion priors (SDS, VSD).

Public API (others code against exactly this)::

    from engine_server.guidance import (
        GuidanceConfig, TimestepSchedule, ViewPromptConfig, VSDConfig, Conditioning,
        load_prior, register_prior, Prior, PriorInputs, PriorLoadError,
        build_guidance, GuidanceOutput, ScoreDistillation, VariationalScoreDistillation,
    )

    prior = load_prior(name_or_path, device="cuda", dtype=None, adapter=None)
        # name_or_path: "bundled" (the project's own model), a local diffusers folder
        # (any weight variant), a single-file SD checkpoint (.safetensors / .ckpt) or a
        # Hugging Face hub id (model_index.json read and checked before any weight is
        # fetched). The adapter comes from model_index.json:
        #   StableDiffusion*Pipeline            -> "stable-diffusion" (kind "text")
        #   Zero123Pipeline / cc_projection     -> "novel-view"       (kind "image")
        #   MVDreamPipeline                     -> "multi-view"       (kind "multiview"; the published
        #                                          MultiViewUNetModel is converted at load time)
        # dtype: fp16 on CUDA, fp32 on CPU by default. Missing files or a model of
        # another kind -> PriorLoadError naming the path and what was expected.

    guidance = build_guidance(prior, GuidanceConfig(mode="sds" | "vsd", ...))
    out = guidance(images, cameras, cond, step, total_steps)
        # images (B, 3, H, W) in [0, 1] with grad; cameras (B, 4, 4) camera-to-world
        # (Blender convention, engine_server.cameras); cond: Conditioning(prompt=...,
        # negative_prompt=..., reference_image=(3, H, W), reference_c2w=(4, 4), fov_y_deg=...).
        # -> GuidanceOutput(loss, grad_norm, t, extras)
    out.loss.backward()  # d loss / d latents = w(t) (eps_hat - eps_target), exactly

The surrogate: latents z = prior.encode_images(images) (VAE latents for the
diffusers priors, differentiable), x_t = sqrt(ab) z + sqrt(1 - ab) eps,
g = nan_to_num(w(t) (eps_hat - eps_target)) clipped, loss = 0.5 ||z - sg(z - g)||^2
(summed over the batch). No backprop through the denoiser. eps_hat is the
classifier-free guided estimate eps_u + s (eps_c - eps_u), both branches in one
denoiser call of batch 2B (one call of B when s == 1). eps_target is the sampled
noise for "sds"; for "vsd" it is the estimate of a camera-conditioned LoRA of the
same UNet (peft via ``unet.add_adapter``), and the VSD guidance trains that LoRA
inside each call (``vsd.lora_steps_per_call`` AdamW steps on the detached
latents of the same renders; ``extras["lora_loss"]``). Its parameters are
``guidance.lora_parameters()``; its optimizer is ``guidance.optimizer``; the
pipeline does not step them.

Timesteps follow ``TimestepSchedule`` (DreamCraft3D annealing: fractions of the
training timesteps, (0.7, 0.85) at first, linearly to (0.2, 0.5)); views of one
multi-view object share a timestep. Text-only priors get view-dependent prompt
suffixes ("front view", "side view", "back view", "overhead view") from each
camera's azimuth / elevation; camera-aware priors get the cameras instead.

Each adapter declares its anchors' defaults as ``defaults`` (``PriorDefaults``: guidance
scale per mode, timestep range, camera ranges, background colour, render size);
``prior_defaults(prior)`` reads them (the engine's fallback for a prior without) and
``defaults.guidance_config(mode, request_scale, stage)`` builds the stage's config.

``Prior`` (see prior.py) is what an adapter provides: ``kind``,
``num_train_timesteps``, ``prediction_type``, ``alphas_cumprod``, ``resolution``,
``views_per_sample``, ``device``, ``dtype``, ``unet``, ``encode_images``,
``prepare_conditioning(cond, cameras, prompts=None) -> PriorInputs`` (text
embeddings cached), ``predict_noise(latents_t, t, embeddings, cameras) -> eps``
(v / x0 predictions converted). The bundled pixel-space model is one more adapter,
``adapters/bundled.py`` (``encode_images`` = 2x - 1, camera-aware, no ``unet``: LoRA
adapters, VSD's and BSD's, go on its plain ``network``), registered with its shipped weights
folder; ``load_prior("bundled")`` raises ``PriorLoadError`` while its weights are missing.
"""
from __future__ import annotations

from engine_server.guidance.adapters import bundled  # noqa: F401  (registers it; the others register on demand)
from engine_server.guidance.config import (
    Conditioning,
    GuidanceConfig,
    PriorDefaults,
    TimestepSchedule,
    ViewPromptConfig,
    VSDConfig,
    prior_defaults,
)
from engine_server.guidance.prior import (
    BUNDLED,
    Prior,
    PriorInputs,
    PriorLoadError,
    load_prior,
    register_prior,
    registered_priors,
)
from engine_server.guidance.score import (
    GUIDANCE_MODES,
    GuidanceOutput,
    ScoreDistillation,
    VariationalScoreDistillation,
    build_guidance,
    classifier_free_guidance,
    timestep_weights,
)
from engine_server.guidance.views import view_names, view_prompts

__all__ = [
    "BUNDLED",
    "Conditioning",
    "GUIDANCE_MODES",
    "GuidanceConfig",
    "GuidanceOutput",
    "Prior",
    "PriorDefaults",
    "PriorInputs",
    "PriorLoadError",
    "ScoreDistillation",
    "TimestepSchedule",
    "VSDConfig",
    "VariationalScoreDistillation",
    "ViewPromptConfig",
    "build_guidance",
    "classifier_free_guidance",
    "load_prior",
    "prior_defaults",
    "register_prior",
    "registered_priors",
    "timestep_weights",
    "view_names",
    "view_prompts",
]
