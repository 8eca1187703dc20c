"""Configuration of score distillation: what to condition on, how to sample t, how to weight.

Everything that changes over training is a schedule here (the timestep range),
not an ``if step >`` in the guidance code.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

SDS = "sds"
VSD = "vsd"
MODES = (SDS, VSD)
WEIGHTINGS = ("sds", "uniform", "fantasia3d")
GRAD_CLIP_MODES = ("value", "norm")


@dataclass
class Conditioning:
    """What the generated object should look like: a prompt, a reference view, or both."""

    prompt: str | None = None
    """Text prompt (text and multi-view priors); None for image-only priors."""
    negative_prompt: str = ""
    """Negative prompt, used as the unconditional branch of classifier-free guidance."""
    reference_image: torch.Tensor | None = None
    """(3, H, W) reference view in [0, 1] (image-conditioned priors)."""
    reference_c2w: torch.Tensor | None = None
    """(4, 4) camera-to-world of the reference view, Blender convention."""
    fov_y_deg: float = 40.0
    """Vertical field of view of the reference view in degrees."""

    def __post_init__(self) -> None:
        if self.reference_image is not None:
            img = self.reference_image
            if img.dim() != 3 or img.shape[0] != 3:
                raise ValueError(f"reference_image must be (3, H, W) in [0, 1], got shape {tuple(img.shape)}")
        if self.reference_c2w is not None and tuple(self.reference_c2w.shape) != (4, 4):
            raise ValueError(f"reference_c2w must be (4, 4), got shape {tuple(self.reference_c2w.shape)}")


@dataclass
class TimestepSchedule:
    """Annealed range of diffusion timesteps, as fractions of the prior's training timesteps.

    DreamCraft3D-style: t is drawn uniformly from ``start`` early on; after
    ``hold_fraction`` of the run the range moves linearly to ``end``, reached
    at ``hold_fraction + anneal_fraction`` of the run, and stays there.
    """

    start: tuple[float, float] = (0.7, 0.85)
    """(low, high) fraction of the training timesteps at the start of the run."""
    end: tuple[float, float] = (0.2, 0.5)
    """(low, high) fraction at the end of the annealing."""
    hold_fraction: float = 0.0
    """Fraction of the run spent at ``start`` before annealing begins."""
    anneal_fraction: float = 0.5
    """Fraction of the run over which the range moves linearly from ``start`` to ``end``."""

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            lo, hi = getattr(self, name)
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(f"TimestepSchedule.{name} must satisfy 0 <= low <= high <= 1, got {(lo, hi)}")
        if self.hold_fraction < 0 or self.anneal_fraction < 0 or self.hold_fraction + self.anneal_fraction > 1.0:
            raise ValueError(
                "TimestepSchedule needs hold_fraction >= 0, anneal_fraction >= 0 and their sum <= 1, got "
                f"{self.hold_fraction} and {self.anneal_fraction}"
            )

    def progress(self, step: int, total_steps: int) -> float:
        """How far the annealing is at ``step`` of ``total_steps``: 0 at ``start``, 1 at ``end``."""
        frac = min(max(step / max(total_steps, 1), 0.0), 1.0)
        if self.anneal_fraction == 0.0:
            return 1.0 if frac >= self.hold_fraction else 0.0
        return min(max((frac - self.hold_fraction) / self.anneal_fraction, 0.0), 1.0)

    def range_at(self, step: int, total_steps: int) -> tuple[float, float]:
        """(low, high) fraction of the training timesteps at ``step`` of ``total_steps``."""
        p = self.progress(step, total_steps)
        lo = self.start[0] + p * (self.end[0] - self.start[0])
        hi = self.start[1] + p * (self.end[1] - self.start[1])
        return lo, hi

    def timestep_bounds(self, step: int, total_steps: int, num_train_timesteps: int) -> tuple[int, int]:
        """Inclusive integer bounds [t_min, t_max] in 1..num_train_timesteps-1 at this step."""
        lo, hi = self.range_at(step, total_steps)
        t_max_allowed = num_train_timesteps - 1
        t_min = min(max(int(math.floor(lo * num_train_timesteps)), 1), t_max_allowed)
        t_max = min(max(int(math.ceil(hi * num_train_timesteps)), t_min), t_max_allowed)
        return t_min, t_max

    def sample(
        self,
        step: int,
        total_steps: int,
        num_train_timesteps: int,
        n: int,
        generator: torch.Generator,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """``n`` integer timesteps (long, on ``device``) drawn uniformly from the range at this step."""
        t_min, t_max = self.timestep_bounds(step, total_steps, num_train_timesteps)
        return torch.randint(t_min, t_max + 1, (n,), generator=generator, device=generator.device).to(device)


@dataclass
class ViewPromptConfig:
    """View-dependent prompt suffixes for text-only priors (DreamFusion's "front view" trick)."""

    enabled: bool = True
    """Append a view suffix to the prompt of each rendered view."""
    front_azimuth_deg: float = 45.0
    """A view within this many degrees of azimuth 0 is a front view."""
    back_azimuth_deg: float = 45.0
    """A view within this many degrees of azimuth 180 is a back view."""
    overhead_elevation_deg: float = 60.0
    """A view above this elevation is an overhead view, whatever its azimuth."""
    template: str = "{prompt}, {view}"
    """How the suffix joins the prompt."""
    perp_neg: bool = False
    """Perp-Neg (Armandpour et al. 2023): the view prompt is interpolated between its two neighbours and
    the other views' prompts are subtracted as perpendicular negatives, against the Janus (multi-face)
    problem. Needs a prior conditioned on text embeddings (Stable Diffusion); one extra denoiser pass
    per negative (two)."""
    perp_neg_front_side: tuple[float, float, float] = (4.0, 0.5, -2.426)
    """(a, b, c) of the negative weight a exp(-b r) + c of the front prompt between front and side (r: 1 front)."""
    perp_neg_side_front: tuple[float, float, float] = (4.0, 0.5, -2.426)
    """The same for the side prompt between front and side (evaluated at 1 - r)."""
    perp_neg_side_back: tuple[float, float, float] = (1.0, 0.5, -0.606)
    """The side prompt's weight between side and back (r: 1 side, 0 back)."""
    perp_neg_front_back: tuple[float, float, float] = (1.0, 0.5, 0.967)
    """The front prompt's weight between side and back."""


@dataclass
class VSDConfig:
    """ProlificDreamer's variational score distillation: a LoRA of the denoiser trained on the renders."""

    lora_rank: int = 16
    """Rank of the LoRA adapters on the denoiser's attention projections."""
    lora_alpha: float | None = None
    """LoRA scaling numerator; None means equal to the rank (scale 1)."""
    lora_target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    """Names of the attention sub-layers that get an adapter."""
    lora_lr: float = 1e-3
    """Learning rate of the LoRA's own AdamW optimizer."""
    lora_steps_per_call: int = 1
    """LoRA optimizer steps done inside each guidance call."""
    lora_timestep_range: tuple[float, float] = (0.0, 1.0)
    """Range of t (fraction of training timesteps) for the LoRA's denoising loss."""
    camera_condition: bool = True
    """Feed the flattened camera-to-world matrix to the LoRA through a class embedding."""
    camera_dropout: float = 0.1
    """Probability of zeroing a view's camera when training the LoRA (its unconditional branch)."""
    lora_guidance_scale: float = 1.0
    """Classifier-free guidance scale of the LoRA's estimate (1 = conditional only, one pass)."""


@dataclass
class GuidanceConfig:
    """Score distillation settings; ``build_guidance(prior, config)`` turns them into a guidance."""

    mode: str = SDS
    """"sds" (DreamFusion / SJC) or "vsd" (ProlificDreamer)."""
    guidance_scale: float = 100.0
    """Classifier-free guidance scale s: eps = eps_u + s (eps_c - eps_u); 1 disables CFG (one pass)."""
    timesteps: TimestepSchedule = field(default_factory=TimestepSchedule)
    """Annealed timestep range."""
    weighting: str = "sds"
    """w(t): "sds" (1 - alpha_bar), "uniform" (1) or "fantasia3d" (sqrt(alpha_bar) (1 - alpha_bar))."""
    grad_clip: float | None = None
    """Clip the distillation gradient: |g| <= grad_clip per element ("value") or per view ("norm"); None: off."""
    grad_clip_mode: str = "value"
    """"value" (element-wise clamp) or "norm" (rescale each view's gradient to at most grad_clip)."""
    seed: int = 0
    """Seed of the guidance's own generator (timesteps, noise, CFG dropout)."""
    view_prompts: ViewPromptConfig = field(default_factory=ViewPromptConfig)
    """View-dependent prompt suffixes (text-only priors)."""
    resize_to_prior: bool = True
    """Resize renders to the prior's native resolution before scoring them."""
    vsd: VSDConfig = field(default_factory=VSDConfig)
    """VSD options (used when mode is "vsd")."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"GuidanceConfig.mode must be one of {MODES}, got {self.mode!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"GuidanceConfig.weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if self.grad_clip_mode not in GRAD_CLIP_MODES:
            raise ValueError(
                f"GuidanceConfig.grad_clip_mode must be one of {GRAD_CLIP_MODES}, got {self.grad_clip_mode!r}"
            )
        if self.guidance_scale < 0:
            raise ValueError(f"GuidanceConfig.guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"GuidanceConfig.grad_clip must be positive or None, got {self.grad_clip}")


@dataclass
class PriorDefaults:
    """What a prior was trained or tuned for, from its anchors; every stage uses these unless a request overrides.

    Adapters declare theirs as a ``defaults`` attribute; :func:`prior_defaults` reads it (and gives a prior
    that declares none the engine's fallback, tuned on the bundled model).
    """

    guidance_scale: dict[str, float]
    """Recommended classifier-free guidance scale per mode ("sds", "vsd")."""
    timesteps: TimestepSchedule = field(default_factory=TimestepSchedule)
    """Timestep range of the distillation (fractions of the training timesteps)."""
    camera_ranges: dict = field(default_factory=dict)
    """Training views: ``distance`` (lo, hi), ``fov`` (lo, hi) degrees, ``elevation`` (lo, hi) degrees,
    ``default_distance`` and ``default_fov`` (the reference view); empty: the engine's ranges."""
    background_rgb: tuple[float, float, float] | None = None
    """The plain background the prior was trained on (renders are composited on it); None: a learned one."""
    background_carve: bool = False
    """Whether matter of the background's colour is taken for empty space (penalised while distilling, left out
    at extraction): for a plain background of a colour no object is asked in (the bundled prior's cyan), not
    for white, which objects share with Zero123's background."""
    render_size: int | None = None
    """Render size in pixels during distillation (upsampled to the prior's resolution for its encoder);
    None: the prior's resolution."""
    stage_guidance_scale: dict[str, float] = field(default_factory=dict)
    """Scales for stages tuned apart from the mode's ("image": with a reference view, "refine")."""
    anchor: str = ""
    """Where the values come from (paper / config), for ``doctor`` and the docs."""

    def scale(self, mode: str, stage: str | None = None) -> float:
        """The recommended guidance scale of ``mode`` in ``stage``."""
        if stage in self.stage_guidance_scale:
            return self.stage_guidance_scale[stage]
        if mode not in self.guidance_scale:
            raise ValueError(f"this prior declares no guidance scale for {mode!r}; it runs "
                             f"{', '.join(sorted(self.guidance_scale))}")
        return self.guidance_scale[mode]

    def render_resolution(self, prior_resolution: int) -> int:
        """The render size for a prior of ``prior_resolution`` px: ``render_size``, never above the resolution."""
        return min(self.render_size or prior_resolution, prior_resolution)

    def guidance_config(self, mode: str = SDS, scale: float | None = None, stage: str | None = None,
                        **changes) -> GuidanceConfig:
        """A ``GuidanceConfig`` of ``mode`` with these defaults; ``scale`` (the request's) wins when given."""
        changes.setdefault("timesteps", self.timesteps)
        return GuidanceConfig(mode=mode, guidance_scale=self.scale(mode, stage) if scale is None else scale,
                              **changes)

    def as_dict(self) -> dict:
        """Plain JSON-able values (``doctor --json``)."""
        return {
            "guidance_scale": dict(self.guidance_scale),
            "stage_guidance_scale": dict(self.stage_guidance_scale),
            "timesteps": {"start": list(self.timesteps.start), "end": list(self.timesteps.end),
                          "hold_fraction": self.timesteps.hold_fraction,
                          "anneal_fraction": self.timesteps.anneal_fraction},
            "camera_ranges": {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in self.camera_ranges.items()},
            "background_rgb": None if self.background_rgb is None else list(self.background_rgb),
            "render_size": self.render_size,
            "background_carve": self.background_carve,
            "anchor": self.anchor,
        }


FALLBACK_DEFAULTS = PriorDefaults(
    guidance_scale={SDS: 7.5, VSD: 7.5},
    stage_guidance_scale={"image": 3.0, "refine": 3.0},
    background_carve=True,
    anchor="the engine's values, tuned on the bundled model (SDS 7.5; 3 with a reference view and when refining)",
)
"""Defaults of a prior that declares none (the bundled model: its background and cameras come from it)."""


def prior_defaults(prior) -> PriorDefaults:
    """A prior's declared defaults; for one without, the fallback with its own background and camera ranges."""
    declared = getattr(prior, "defaults", None)
    if isinstance(declared, PriorDefaults):
        return declared
    return dataclasses.replace(FALLBACK_DEFAULTS, background_rgb=getattr(prior, "background_rgb", None),
                               camera_ranges=dict(getattr(prior, "camera_ranges", {}) or {}))
