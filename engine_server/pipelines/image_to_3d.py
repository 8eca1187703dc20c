"""Image to 3D: reference image -> mask -> generated views -> field fit + novel-view distillation -> GLB.

A :class:`TextTo3D` subclass: the coarse stage's objective (``coarse_loss``) is replaced,
everything else (checkpoints, events, cancel, extraction, texture, export) is inherited.

  views    the reference image (alpha channel, or a plain / gradient background keyed out; light
           normalised; :mod:`engine_server.multiview.reference`) is composited on the prior's
           background, its camera taken from the rig or estimated with the prior; N views are generated around
           it with the image-conditioned (novel-view) prior (:mod:`engine_server.multiview`);
           without an image the prior first draws the reference view from the prompt
           (text -> views -> 3D: the ``multiview`` job);
  coarse   the hash-grid field is fitted to the reference view (photometric + mask losses,
           weight ``ref_weight``) and to the generated views that agree in shape with the others
           and the reference (weight ``view_weight``); after
           ``distill_start`` of the run, score distillation from the novel-view prior conditioned
           on the reference (Magic123's 3D prior) joins in at random views;
           DreamCraft3D's stages (:class:`ImageFitConfig`; the normal term on by default, the rest opt-in):
           ``hybrid`` adds a text-to-image
           prior's SDS on the prompt to the novel-view prior's (weight ``hybrid_weight``,
           :class:`~engine_server.guidance.hybrid.HybridGuidance`); ``view_start_range`` starts the
           distillation views near the reference camera and widens them to all around
           (:func:`view_window`); ``depth_weight`` / ``normal_weight`` align the rendered depth and normals
           at the reference and the fitted views with the visual hull of the agreeing silhouettes
           (:func:`hull_surface`: no monocular estimator ships offline);
  bsd      with ``bsd_steps`` > 0, bootstrapped score distillation (DreamCraft3D's texture stage, on the field):
           rounds of fine-tuning a LoRA copy of the novel-view prior on the object's own renders noised to t'
           and denoised, and a VSD fit of the colour (geometry fixed) against that copy (eps_DreamBooth -
           eps_LoRA); t' shrinks over the stage (:class:`BSDStage`, :mod:`engine_server.guidance.bsd`);
           checkpointed in ``bsd.pt``;
  extract / texture / export   as for text.
The generated views are saved with the coarse checkpoint, so a resumed job fits the same views.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from engine_server.cameras import Camera, CameraSampler, azimuth_elevation, look_at, orbit_position
from engine_server.multiview import (
    AGREEMENT_THRESHOLD,
    DEFAULT_ELEVATION,
    MultiViewConfig,
    MultiViewResult,
    ViewReference,
    default_rig,
    generate_views,
)
from engine_server.multiview.reference import (  # the reference's readers, re-exported for callers of this module
    BadImageError,
    ReferenceCamera,
    estimate_reference_camera,
    foreground_mask,
    matte_reference,
    prepare_matte,
    prepare_reference,
    read_image,
    rig_reference_camera,
)
from engine_server.pipelines.events import ProgressEvent
from engine_server.pipelines.loop import StepLoop, save_torch
from engine_server.pipelines.optim import Adam
from engine_server.pipelines.text_to_3d import TextTo3D, TextTo3DRequest

logger = logging.getLogger(__name__)

__all__ = ["BadImageError", "ImageFitConfig", "ImageTo3D", "ImageTo3DRequest", "foreground_mask", "prepare_reference",
           "read_image"]

# ------------------------------------------------------------------------------------------ request


@dataclass
class ImageFitConfig:
    """Weights and schedule of the image-to-3D coarse objective."""

    ref_weight: float = 10.0
    """Photometric + mask loss weight of the reference view (sum over pixels)."""
    view_weight: float = 3.0
    """Photometric + mask loss weight of each generated view (sum over pixels)."""
    mask_weight: float = 1.0
    """Mask (opacity vs silhouette) loss relative to the photometric loss."""
    views_per_step: int = 2
    """Generated views fitted per step (besides the reference, every step)."""
    distill_start: float = 0.5
    """Fraction of the coarse steps after which novel-view score distillation joins in."""
    distill_weight: float = 1.0
    """Weight of the distillation loss once it is on."""
    multiview_steps: int = 20
    """DDIM steps when generating the views."""
    multiview_guidance_scale: float = 2.0
    """Classifier-free guidance scale when generating the views."""
    multiview_strategy: str = "anchor"
    """How generated views agree: "anchor", "sequential" or "independent" (engine_server.multiview)."""
    hybrid: bool = False
    """Hybrid score distillation (DreamCraft3D): a text-to-image prior's SDS on the prompt plus
    ``hybrid_weight`` x the novel-view prior's (:class:`~engine_server.guidance.hybrid.HybridGuidance`).
    Needs a prompt."""
    hybrid_weight: float = 2.0
    """mu, the novel-view (3D) prior's weight beside the text prior's in hybrid distillation (paper: 2)."""
    view_start_range: float | None = None
    """Progressive views: distillation views start within this many degrees (azimuth either side of the
    reference, elevation either side of it within the prior's range) and widen to all around over
    ``view_widen`` of the distillation; None: all around from the start."""
    view_widen: float = 0.5
    """Fraction of the distillation steps over which the views widen from ``view_start_range`` to 360 degrees."""
    depth_weight: float = 0.0
    """Geometry alignment: weight of the depth term (1 - Pearson correlation of rendered and estimated depth,
    times the pixels it covers) at the reference view and the fitted generated views; 0: off."""
    normal_weight: float = 1.0
    """Geometry alignment: weight of the normal term (sum over pixels of 1 - cos(rendered, estimated normal));
    on by default: on Blender-rendered references it took the dihedral ratio from 3.9 to 2.7 with the held-out
    silhouette IoU and colour unchanged (issue 25's table); 0: off."""
    bsd_steps: int = 0
    """Bootstrapped score distillation (DreamCraft3D): steps of the ``bsd`` stage after the coarse fit, which
    alternates fine-tuning a LoRA copy of the novel-view prior on the object's own noised-and-denoised renders
    with a VSD fit against it (:mod:`engine_server.guidance.bsd`); 0: off."""
    bsd_t_start: float = 0.6
    """BSD's t' (how far the renders are noised before the prior denoises them, a fraction of the timesteps)
    at the start of the stage."""
    bsd_t_end: float = 0.3
    """BSD's t' at the end of the stage (smaller: the renders have improved)."""

    def __post_init__(self) -> None:
        for name in ("ref_weight", "view_weight", "mask_weight", "distill_weight", "hybrid_weight", "depth_weight",
                     "normal_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"ImageFitConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.distill_start <= 1.0:
            raise ValueError(f"ImageFitConfig.distill_start must be in [0, 1], got {self.distill_start}")
        if self.views_per_step < 0:
            raise ValueError(f"ImageFitConfig.views_per_step must be >= 0, got {self.views_per_step}")
        if self.view_start_range is not None and not 0.0 <= self.view_start_range <= 180.0:
            raise ValueError(f"ImageFitConfig.view_start_range must be in [0, 180] degrees or None, "
                             f"got {self.view_start_range}")
        if not 0.0 < self.view_widen <= 1.0:
            raise ValueError(f"ImageFitConfig.view_widen must be in (0, 1], got {self.view_widen}")
        steps = self.bsd_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= 100000:
            raise ValueError(f"ImageFitConfig.bsd_steps must be an integer from 0 (off) to 100000, got {steps!r}")
        if not 0.0 < self.bsd_t_start < 1.0:
            raise ValueError(f"ImageFitConfig.bsd_t_start must be in (0, 1) (a fraction of the timesteps), "
                             f"got {self.bsd_t_start}")
        if not 0.0 < self.bsd_t_end <= self.bsd_t_start:
            raise ValueError(f"ImageFitConfig.bsd_t_end must be in (0, bsd_t_start = {self.bsd_t_start}] (t' shrinks "
                             f"as the renders improve), got {self.bsd_t_end}")

    @property
    def aligns(self) -> bool:
        """Whether the geometry alignment terms are on."""
        return self.depth_weight > 0 or self.normal_weight > 0


@dataclass
class ImageTo3DRequest(TextTo3DRequest):
    """One image-to-3D job: a text-to-3D request (the fields TextTo3D reads) plus the reference and its views."""

    prompt: str = ""
    """Text hint for the prior (e.g. "a red cube"); empty: the image alone. Required without an image."""
    rig: list[Camera] | None = None
    """Cameras: the first is the reference image's camera, the others where views are generated."""
    guidance_scale: float | None = None
    """Classifier-free guidance scale of the distillation; None: the prior's recommended scale with a
    reference view (its ``"image"`` stage scale: 3 for Zero123 and the bundled prior)."""
    image: str | Path | bytes | np.ndarray | None = None
    """Reference image: a file path, encoded PNG / JPEG bytes, or an (H, W, 3|4) array; None: the
    prior draws the reference view from the prompt (text -> views -> 3D, the ``multiview`` job)."""
    views: int = 7
    """Views in the default rig (a ring plus an overhead view) when the rig gives no other cameras."""
    reference_fov: float | None = None
    """Vertical FOV of the reference view without a rig; None: the prior's default."""
    recenter: bool = True
    """Centre and scale the object in the reference image (a rig's reference camera moves with it)."""
    fit: ImageFitConfig = field(default_factory=ImageFitConfig)
    """Weights and schedule of the fit."""
    text_model: str | None = None
    """Hybrid distillation's text-to-image prior ("bundled", a folder or a hub id); None: ``model`` itself when it
    reads prompts (the bundled model's text mode), else an error (a Zero123 model needs one, e.g. an SD folder)."""


# ------------------------------------------------------------------------------------------ schedules and estimates


@dataclass(frozen=True)
class ViewWindow:
    """Where one step's distillation views are drawn: azimuth within ``half_width`` degrees of ``azimuth``,
    elevation in ``elevation`` (degrees)."""

    azimuth: float
    half_width: float
    elevation: tuple[float, float]


def view_window(fit: ImageFitConfig, reference: tuple[float, float], elevation_range: tuple[float, float],
                step: int, total_steps: int) -> ViewWindow:
    """Progressive views at ``step`` of ``total_steps``: near the reference (azimuth, elevation) when distillation
    starts, all around (the prior's elevation range) after ``fit.view_widen`` of the distillation steps."""
    az, el = reference
    lo, hi = (float(v) for v in elevation_range)
    if fit.view_start_range is None:
        return ViewWindow(az, 180.0, (lo, hi))
    start = fit.distill_start * total_steps
    p = min(max((step - start) / max(fit.view_widen * (total_steps - start), 1.0), 0.0), 1.0)
    s = fit.view_start_range
    lo0, hi0 = min(max(el - s, lo), hi), max(min(el + s, hi), lo)
    return ViewWindow(az, s + p * (180.0 - s), (lo0 + p * (lo - lo0), hi0 + p * (hi - hi0)))


def _blur3d(volume: torch.Tensor, sigma: float) -> torch.Tensor:
    """A (D, H, W) volume blurred by a separable Gaussian of ``sigma`` voxels."""
    r = max(int(math.ceil(2.5 * sigma)), 1)
    x = torch.arange(-r, r + 1, dtype=volume.dtype)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    v = volume[None, None]
    for dim in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + dim] = len(k)
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (2 - dim)] = pad[2 * (2 - dim) + 1] = r
        v = torch.nn.functional.conv3d(torch.nn.functional.pad(v, pad, mode="replicate"), k.view(shape))
    return v[0, 0]


def hull_surface(masks: torch.Tensor, c2w: torch.Tensor, fovs: torch.Tensor, cameras: torch.Tensor,
                 camera_fovs: torch.Tensor, resolution: int, grid: int = 64, extent: float = 0.75,
                 sigma: float = 1.5) -> dict[str, torch.Tensor]:
    """Depth and normals of the visual hull of silhouettes masks (N, H, W) bool at c2w (N, 4, 4), fovs (N,),
    seen from ``cameras`` (K, 4, 4) with ``camera_fovs`` (K,) at ``resolution`` R.

    The geometry alignment's offline estimate: the lattice points over [-extent, extent]^3 that project inside
    every silhouette (a point outside a frame is kept), the occupancy blurred (``sigma`` voxels) so its 0.5
    level is a smooth surface, rays marched to that level. Returns ``t`` (K, R, R) distance along each pixel's
    ray (as the field renderer's depth), ``normal`` (K, R, R, 3) outward unit normals (world), ``hit``
    (K, R, R) bool.
    """
    from engine_server.cameras import camera_rays
    from engine_server.multiview import project_points

    axis = torch.linspace(-extent, extent, grid)
    pts = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    keep = torch.ones(len(pts), dtype=torch.bool)
    n, h, w = masks.shape
    for k in range(n):
        col, row, depth = project_points(pts, c2w[k].float(), float(fovs[k]), w, h)
        ci, ri = col.floor().long(), row.floor().long()
        inside = (ci >= 0) & (ci < w) & (ri >= 0) & (ri < h) & (depth > 0)
        hit = torch.ones(len(pts), dtype=torch.bool)
        hit[inside] = masks[k].cpu().bool()[ri[inside], ci[inside]]
        keep &= hit
    occ = _blur3d(keep.view(grid, grid, grid).float(), sigma)[None, None]  # indexed (x, y, z)

    def sample(p: torch.Tensor) -> torch.Tensor:  # (M, 3) world -> (M,) occupancy; grid_sample wants (z, y, x)
        g = (p / extent).flip(-1).view(1, -1, 1, 1, 3)
        return torch.nn.functional.grid_sample(occ, g, align_corners=True, padding_mode="zeros").view(-1)

    rays = [camera_rays(c.float().cpu(), float(f), resolution, resolution) for c, f in zip(cameras, camera_fovs)]
    o = torch.stack([r[0] for r in rays]).reshape(-1, 3)
    d = torch.stack([r[1] for r in rays]).reshape(-1, 3)
    # March from where the ray enters the lattice's bounding sphere, in half-voxel steps.
    step = extent / grid
    b = (o * d).sum(-1)
    near = (-b - (b * b - (o * o).sum(-1) + 3 * extent ** 2).clamp_min(0).sqrt()).clamp_min(0)
    count = int(math.ceil(2 * math.sqrt(3) * extent / step))
    t_hit = torch.zeros(len(o))
    hit = torch.zeros(len(o), dtype=torch.bool)
    prev = sample(o + near[:, None] * d)
    for i in range(1, count + 1):
        t = near + i * step
        cur = sample(o + t[:, None] * d)
        cross = ~hit & (prev < 0.5) & (cur >= 0.5)
        frac = ((0.5 - prev) / (cur - prev).clamp_min(1e-6)).clamp(0, 1)
        t_hit = torch.where(cross, t - step + frac * step, t_hit)
        hit |= cross
        prev = cur
    p = o + t_hit[:, None] * d
    eps = 1.0 * (2 * extent / (grid - 1))
    grad = torch.stack([sample(p + eps * e) - sample(p - eps * e) for e in torch.eye(3)], -1)
    normal = torch.nn.functional.normalize(-grad, dim=-1, eps=1e-8)
    k, r = len(cameras), resolution
    return {"t": t_hit.view(k, r, r), "normal": normal.view(k, r, r, 3), "hit": hit.view(k, r, r)}


# ------------------------------------------------------------------------------------------ pipeline


class ImageTo3D(TextTo3D):
    """The image-to-3D pipeline. ``run(out_path)`` does every stage and writes the GLB."""

    STAGES = ("views", "coarse", "bsd", "extract", "texture", "export")
    """Stage names of progress events, in order ("bsd" only with ``fit.bsd_steps`` > 0)."""
    GUIDANCE_STAGE = "image"

    request: ImageTo3DRequest
    bsd_stage: BSDStage | None = None
    """The BSD stage, once it has run."""
    reference_redrawn = 0
    """Times the reference view drawn from the prompt was drawn again for not showing it (kept in reference.pt)."""

    def setup(self, prior) -> None:
        request = self.request
        matte = None
        if request.image is not None:
            matte = matte_reference(read_image(request.image))  # bad images fail here, before any model loads
            self.mask_source = matte.how
        elif not request.prompt.strip():
            raise ValueError("image-to-3D needs a reference image, or a prompt to draw the reference view from")
        prior = self.use_prior(prior)
        if getattr(prior, "kind", "image") == "text":
            raise ValueError(f"prior {request.model!r} is text-only; image-to-3D needs a novel-view "
                             "(image-conditioned) model such as the bundled one or a Zero123 folder")
        from engine_server.guidance import prior_defaults

        res = int(getattr(prior, "resolution", 32))
        defaults = prior_defaults(prior)
        ranges = defaults.camera_ranges
        # The reference and the fit sit on the prior's training background (white for Zero123), or white.
        self.background_rgb = tuple(defaults.background_rgb or (1.0, 1.0, 1.0))
        dist = float(ranges.get("default_distance", 2.5))
        fov = float(request.reference_fov or ranges.get("default_fov", 42.0))
        if matte is not None:
            self.reference_image, self.reference_mask = prepare_matte(matte, self.background_rgb, res,
                                                                      recenter=request.recenter)
        if request.rig:  # moved as the framing moved the object (a scene camera's 11 m come near the prior's)
            self.reference_camera = rig_reference_camera(request.rig[0], matte.mask if matte else None,
                                                         request.recenter)
        elif matte is not None:
            self.reference_camera = estimate_reference_camera(prior, self.reference_image, dist, fov,
                                                              DEFAULT_ELEVATION, seed=request.seed,
                                                              coverage=matte.rgba[..., 3])
        else:
            self.reference_camera = ReferenceCamera(look_at(orbit_position(0.0, DEFAULT_ELEVATION, dist)), fov,
                                                    "default", DEFAULT_ELEVATION, 0.0)
        self.reference_c2w, self.reference_fov = self.reference_camera.c2w, self.reference_camera.fov_y_deg
        if matte is None:
            self.mask_source = "generated"
            self.reference_image, self.reference_mask = self._draw_reference(prior)
        self.views: MultiViewResult | None = None
        self.field_mesh: tuple[np.ndarray, np.ndarray] | None = None
        """(vertices (V, 3) in the field's frame, i.e. the cameras' frame, faces (F, 3)) after extraction."""
        super().setup(prior)
        # Fit and distil against the prior's own background and training cameras.
        from engine_server.field import FixedBackground

        self.background = FixedBackground(self.background_rgb).to(self.device)
        self.cameras = CameraSampler(ranges, None, self.gen)
        self.fit = request.fit
        if self.fit.hybrid:
            self.guidance = self._hybrid_guidance()
        self.alignment: dict[str, torch.Tensor] | None = None
        """The geometry alignment's estimate (:func:`hull_surface`) at the reference (index 0) and the generated
        views (1...), once the views exist and when the alignment is on."""

    def _hybrid_guidance(self):
        """The image guidance plus a text-to-image prior's (the request's ``text_model``, or the prior itself)."""
        from engine_server.guidance import build_guidance, load_prior, prior_defaults
        from engine_server.guidance.hybrid import TEXT_KINDS, HybridGuidance

        request = self.request
        if request.text_model is not None and request.text_model != request.model:
            text_prior = load_prior(request.text_model, device=self.device)
        elif request.text_model is not None or getattr(self.prior, "kind", None) in TEXT_KINDS:
            text_prior = self.prior
        else:
            raise ValueError(f"hybrid distillation needs a text-to-image prior beside the novel-view prior "
                             f"{request.model!r} (a {self.prior.kind!r} prior, which reads no prompt): give "
                             "text_model, e.g. a Stable Diffusion folder or hub id")
        config = prior_defaults(text_prior).guidance_config(request.guidance, None, None, seed=request.seed + 1)
        hybrid = HybridGuidance(build_guidance(text_prior, config), self.guidance, self.fit.hybrid_weight)
        hybrid.prepare_inputs(self.cond, self.reference_c2w[None].to(self.device))  # no prompt, or an unknown one: now
        return hybrid

    def generators(self) -> dict[str, torch.Generator]:
        gens = super().generators()
        if self.fit.hybrid:
            gens["text_guidance"] = self.guidance.text_generator
        return gens

    def _draw_reference(self, prior) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference view drawn from the prompt at the reference camera: image (3, R, R), mask (R, R).

        Kept beside the checkpoints, so a resumed job reconstructs the same object.
        """
        request = self.request
        path = self.checkpoint_path("reference.pt")
        if path is not None and path.exists():
            state = torch.load(path, map_location="cpu", weights_only=False)
            self.reference_redrawn = int(state.get("redrawn", 0))
            return state["image"], state["mask"]
        f = request.fit
        cfg = MultiViewConfig(strategy="independent", steps=f.multiview_steps,
                              guidance_scale=f.multiview_guidance_scale, seed=request.seed)
        drawn = generate_views(prior, self.reference_c2w[None], prompt=request.prompt, config=cfg,
                               fovs=[self.reference_fov])
        image, mask = drawn.images[0], drawn.masks[0]
        if int(mask.sum()) < 4:
            raise ValueError(f"the prior drew no object for {request.prompt!r} (try another seed)")
        if path is not None:
            save_torch(path, {"image": image, "mask": mask, "redrawn": drawn.redrawn})
        self.reference_redrawn = drawn.redrawn
        return image, mask

    # TextTo3D.__init__ assigns a prompt-only Conditioning; this pipeline adds the reference view to it.
    @property
    def cond(self):
        return self._cond

    @cond.setter
    def cond(self, value) -> None:
        from engine_server.guidance import Conditioning

        self._cond = Conditioning(
            prompt=value.prompt or None, negative_prompt=value.negative_prompt,
            reference_image=self.reference_image.to(self.device), reference_c2w=self.reference_c2w.to(self.device),
            fov_y_deg=self.reference_fov,
        )

    # ---------------------------------------------------------------- views
    def view_cameras(self) -> list[Camera]:
        """Where views are generated: the rig's other cameras, or a default ring + overhead around the reference."""
        res = self.resolution
        if self.request.rig and len(self.request.rig) > 1:
            return [Camera(c.c2w.float(), float(c.fov_y_deg), res, res) for c in self.request.rig[1:]]
        dist = float(self.reference_c2w[:3, 3].norm())
        az, _ = azimuth_elevation(self.reference_c2w)
        rig = default_rig(self.request.views + 1, dist, self.reference_fov, res, start_azimuth=float(az))
        return rig[1:]  # the ring's first camera is the reference view itself

    def generate(self) -> MultiViewResult:
        """Generate (or load from the checkpoint folder) the views around the reference."""
        path = self.checkpoint_path("views.pt")
        if path is not None and path.exists():
            state = torch.load(path, map_location="cpu", weights_only=False)
            self.views = MultiViewResult(**state)
            logger.info("loaded %d generated views from %s", len(self.views.images), path)
        else:
            cams = self.view_cameras()
            f = self.fit
            cfg = MultiViewConfig(strategy=f.multiview_strategy, steps=f.multiview_steps,
                                  guidance_scale=f.multiview_guidance_scale, seed=self.request.seed)
            ref = ViewReference(self.reference_image, self.reference_c2w, self.reference_fov,
                                from_prompt=self.request.image is None)

            def report(done: int, total: int) -> None:
                self._check_cancel()
                if done < total:  # the last event carries the views themselves (below)
                    self.progress(ProgressEvent("views", done, total))

            self.views = generate_views(self.prior, cams, prompt=self.request.prompt or None, reference=ref,
                                        config=cfg, progress=report)
            if path is not None:
                v = self.views
                save_torch(path, {"images": v.images, "c2w": v.c2w, "fovs": v.fovs, "masks": v.masks,
                                  "agreement": v.agreement, "strategy": v.strategy, "redrawn": v.redrawn,
                                  "extras": v.extras})
        n = len(self.views.images)
        self.progress(ProgressEvent("views", n, n, preview=self.views.strip()))
        return self.views

    # ---------------------------------------------------------------- coarse objective
    def _fit_loss(self, c2w: torch.Tensor, fovs: torch.Tensor, images: torch.Tensor, masks: torch.Tensor,
                  estimate: list[int] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Sum over pixels of photometric + mask losses of views c2w (B, 4, 4) against images (B, 3, R, R);
        with ``estimate`` (the views' rows in :attr:`alignment`) also the alignment terms, by name."""
        f = self.fit
        out = self.render_views(c2w, fovs, jitter=True, compute_normals=estimate is not None and f.normal_weight > 0)
        photo = ((out["image"] - images.to(self.device)) ** 2).sum()
        opacity = out["opacity"].reshape(len(c2w), self.resolution, self.resolution)
        masks = masks.to(self.device)
        mask = ((opacity - masks.float()) ** 2).sum()
        terms = {} if estimate is None else self._align_terms(out, opacity, masks.bool(), estimate)
        return 0.5 * (photo + f.mask_weight * mask), terms

    def _align_terms(self, out: dict, opacity: torch.Tensor, masks: torch.Tensor,
                     rows: list[int]) -> dict[str, torch.Tensor]:
        """Depth and normal terms of renders (B views, opacity (B, R, R)) against the estimate's ``rows``.

        Counted on pixels inside the target silhouette where the estimate has a surface and the render is
        mostly opaque. Depth: per view, 0.5 sum (z(rendered) - z(estimate))^2 of the standardised depths,
        i.e. n (1 - Pearson correlation), blind to the estimate's scale and offset (DreamCraft3D's choice for
        monocular depth; a visual hull sits in front of a concave object's surface). Normal: sum of
        1 - cos(rendered, estimated).
        """
        f, est, b, r = self.fit, self.alignment, len(rows), self.resolution
        t_est, n_est = est["t"][rows].to(self.device), est["normal"][rows].to(self.device)
        valid = est["hit"][rows].to(self.device) & masks & (opacity.detach() > 0.5)
        terms = {}
        if f.depth_weight > 0:
            t = out["depth"].view(b, r, r) / opacity.clamp_min(1e-3)
            depth = opacity.sum() * 0.0
            for i in range(b):
                sel = valid[i]
                if int(sel.sum()) < 8:
                    continue
                a, e = t[i][sel], t_est[i][sel]
                za = (a - a.mean()) / a.std().clamp_min(1e-4)
                ze = (e - e.mean()) / e.std().clamp_min(1e-4)
                depth = depth + 0.5 * ((za - ze) ** 2).sum()
            terms["depth"] = depth
        if f.normal_weight > 0:
            n = torch.nn.functional.normalize(out["normal"].view(b, r, r, 3), dim=-1, eps=1e-6)
            terms["normal"] = (1.0 - (n * n_est).sum(-1))[valid].sum()
        return terms

    def _aligned(self, loss: torch.Tensor, terms: dict[str, torch.Tensor], logs: dict) -> torch.Tensor:
        """``loss`` plus the alignment terms times their weights, logged under their names."""
        for name, value in terms.items():
            loss = loss + getattr(self.fit, f"{name}_weight") * value
            logs[name] = logs.get(name, 0.0) + float(value.detach())
        return loss

    def estimate_alignment(self) -> dict[str, torch.Tensor]:
        """The visual hull of the reference's and the agreeing views' silhouettes, seen from every fitted camera.

        No monocular depth or normal estimator can ship offline, so the estimate is the shape the
        silhouettes agree on, smoothed: exact for the convex parts the views see, in front of concave ones.
        """
        views = self.views
        usable = torch.nonzero(views.agreement >= AGREEMENT_THRESHOLD).flatten()
        masks = torch.cat([self.reference_mask[None].bool(), views.masks[usable].bool()])
        c2w = torch.cat([self.reference_c2w[None].float(), views.c2w[usable].float()])
        fovs = torch.cat([torch.tensor([float(self.reference_fov)]), views.fovs[usable].float()])
        cams = torch.cat([self.reference_c2w[None].float(), views.c2w.float()])
        cam_fovs = torch.cat([torch.tensor([float(self.reference_fov)]), views.fovs.float()])
        return hull_surface(masks, c2w, fovs, cams, cam_fovs, self.resolution)

    def distill_cameras(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's distillation views (n, 4, 4) and FOVs (n,): the prior's ranges, within the progressive
        window around the reference (:func:`view_window`) when ``view_start_range`` is set."""
        if self.fit.view_start_range is None:
            return self.cameras.sample(n)
        az, el = azimuth_elevation(self.reference_c2w.float())
        w = view_window(self.fit, (float(az), float(el)), self.cameras.elevation, self.step,
                        self.preset.coarse_steps)
        u = torch.rand(n, 4, generator=self.gen)
        poses, fovs = [], []
        for a, e, d, f in u.tolist():
            dist = self.cameras.distance[0] + d * (self.cameras.distance[1] - self.cameras.distance[0])
            elevation = w.elevation[0] + e * (w.elevation[1] - w.elevation[0])
            poses.append(look_at(orbit_position(w.azimuth + (2 * a - 1) * w.half_width, elevation, dist)))
            fovs.append(self.cameras.fov[0] + f * (self.cameras.fov[1] - self.cameras.fov[0]))
        return torch.stack(poses), torch.tensor(fovs)

    def coarse_loss(self) -> tuple[torch.Tensor, dict]:
        """Reference + generated-view reconstruction, then novel-view distillation (Magic123)."""
        f, p = self.fit, self.preset
        loss, logs = self.reconstruction_loss()
        if f.distill_weight > 0 and self.step >= f.distill_start * p.coarse_steps:
            c2w, fovs = self.distill_cameras(p.views_per_step)
            out = self.render_views(c2w, fovs, jitter=True)
            g = self.guidance(out["image"], c2w.to(self.device), self.cond, self.step, p.coarse_steps)
            opacity = out["opacity"].clamp(1e-5, 1 - 1e-5)
            loss = loss + f.distill_weight * g.loss + p.sparsity_weight * opacity.sum()
            logs["sds"] = float(g.loss.detach())
            if "text_loss" in g.extras:
                logs["sds_text"], logs["sds_image"] = g.extras["text_loss"], g.extras["image_loss"]
        return loss, logs

    def reconstruction_loss(self) -> tuple[torch.Tensor, dict]:
        """The reference's and a few agreeing generated views' photometric + mask (+ alignment) losses, weighted."""
        f = self.fit
        align = self.alignment is not None
        ref, terms = self._fit_loss(self.reference_c2w[None], torch.tensor([self.reference_fov]),
                                    self.reference_image[None], self.reference_mask[None], [0] if align else None)
        logs = {"ref": float(ref.detach())}
        loss = self._aligned(f.ref_weight * ref, terms, logs)
        views = self.views
        # Views whose shape disagrees with the others' and the reference's are left out of the fit.
        usable = torch.nonzero(views.agreement >= AGREEMENT_THRESHOLD).flatten() if views is not None else []
        if f.views_per_step and f.view_weight > 0 and len(usable):
            k = min(f.views_per_step, len(usable))
            idx = usable[torch.randperm(len(usable), generator=self.gen)[:k]]
            mv, terms = self._fit_loss(views.c2w[idx], views.fovs[idx], views.images[idx], views.masks[idx],
                                       (idx + 1).tolist() if align else None)
            loss = self._aligned(loss + f.view_weight * mv, terms, logs)
            logs["views"] = float(mv.detach())
        return loss, logs

    def coarse(self) -> None:
        """Views, the coarse fit and, when on, the BSD stage (``timings["coarse_s"]`` includes ``bsd_s``)."""
        if self.views is None:
            self.generate()
        if self.fit.aligns and self.alignment is None:
            self.alignment = self.estimate_alignment()
        self._check_cancel()
        super().coarse()
        if self.fit.bsd_steps > 0:
            with self.timed("bsd"):
                self.bsd_stage = BSDStage(self)
                self.bsd_stage.run()

    def extract(self) -> tuple[np.ndarray, np.ndarray]:
        """Marching tetrahedra as for text; the field-space mesh is kept as ``self.field_mesh``."""
        vertices, faces = super().extract()
        self.field_mesh = (vertices, faces)
        return vertices, faces

    def asset_config(self, preset):
        """Text's finishing, smoothed four times as long: a field fitted to a few 32 px views comes out bumpier than
        a distilled one (Blender references: median dihedral ratio 2.3 -> 1.25 for a sphere, 3.2 -> 1.8 for a
        cone, the shape measures unchanged or closer to the truth; edges of 60+ degrees are still kept)."""
        from engine_server.geometry.surface import SmoothConfig

        return replace(super().asset_config(preset), smooth=SmoothConfig(normal_iterations=32, vertex_iterations=48))

    # ---------------------------------------------------------------- export
    def sidecar(self) -> dict:
        """The text sidecar plus the reference, the generated views and the fit's DreamCraft3D stages."""
        views, f = self.views, self.fit
        return super().sidecar() | {
            "kind": "image" if self.request.image is not None else "multiview",
            "reference": {"mask_source": self.mask_source, "c2w": self.reference_c2w.tolist(),
                          "fov_y_deg": self.reference_fov, "camera": self.reference_camera.record(),
                          "source": str(self.request.image) if isinstance(self.request.image, (str, Path)) else None},
            "views": {"count": len(views.images), "strategy": views.strategy,
                      "agreement": [round(float(a), 4) for a in views.agreement],
                      "redrawn": self.reference_redrawn + views.redrawn,  # for not showing the prompt
                      "redrawn_for_shape": views.extras.get("reshaped", []),
                      "left_out": [i for i, a in enumerate(views.agreement.tolist()) if a < AGREEMENT_THRESHOLD]},
            "fit": {"hybrid": f.hybrid, "hybrid_weight": f.hybrid_weight if f.hybrid else None,
                    "text_model": (self.request.text_model or self.request.model) if f.hybrid else None,
                    "view_start_range": f.view_start_range, "view_widen": f.view_widen,
                    "depth_weight": f.depth_weight, "normal_weight": f.normal_weight,
                    "alignment_estimate": "visual hull of the agreeing silhouettes" if f.aligns else None,
                    "bsd_steps": f.bsd_steps,
                    "bsd": self.bsd_stage.record() if self.bsd_stage is not None else None},
        }


class BSDStage:
    """The ``bsd`` stage (bootstrapped score distillation) as a :class:`~engine_server.pipelines.loop.Trainable`.

    DreamCraft3D's texture stage: it goes on from the coarse fit with the geometry fixed, and only the field's
    colour network (and a learned background) learns. Each step keeps the reference and generated-view
    reconstruction (:meth:`ImageTo3D.reconstruction_loss`) and replaces the distillation with BSD on the
    novel-view prior at views all around; at the start of each round the object's renders are bootstrapped and
    the prior's copy fine-tuned on them (:class:`~engine_server.guidance.bsd.BootstrappedScoreDistillation`).
    Why fixed: with the whole field learning, the draft's surfaces came out bumpier (dihedral ratio 2.25 ->
    3.17 on the Blender cube) for no gain in colour. Its checkpoint, ``bsd.pt``, holds the field and both
    adapters with their optimizers, so a resumed stage continues exactly.
    """

    checkpoint_key = None
    """Keyed as the coarse checkpoint: the job's checkpoint folder belongs to its request."""

    def __init__(self, pipe: ImageTo3D) -> None:
        from engine_server.guidance import TimestepSchedule, prior_defaults
        from engine_server.guidance.bsd import BootstrappedScoreDistillation, BSDConfig

        self.pipe, f = pipe, pipe.fit
        self.config = BSDConfig(t_start=f.bsd_t_start, t_end=f.bsd_t_end)
        defaults = prior_defaults(pipe.prior)
        # The coarse fit ended at the annealed range's end; the stage distils there (detail, not shape).
        config = defaults.guidance_config("vsd", pipe.request.guidance_scale, ImageTo3D.GUIDANCE_STAGE,
                                          seed=pipe.request.seed + 2,
                                          timesteps=TimestepSchedule(defaults.timesteps.end, defaults.timesteps.end))
        self.guidance = BootstrappedScoreDistillation(pipe.prior, config, self.config)
        self.total = f.bsd_steps
        self.step = 0
        field, lr = pipe.field, pipe.preset.learning_rate
        self.geometry = [p for n, p in field.named_parameters() if not n.startswith("color_net.")]
        groups = [{"params": list(field.color_net.parameters()), "lr": lr * 0.1}]
        background = list(pipe.background.parameters())
        if background:
            groups.append({"params": background, "lr": lr * 0.1})
        self.optimizer = Adam(groups, betas=(0.9, 0.99), eps=1e-15)
        self.device = pipe.device
        self.last: dict[str, float] = {}
        """The latest bootstrap's logs (t', the copy's losses)."""

    def run(self) -> None:
        """The stage's steps (from its checkpoint when there is one), the geometry frozen meanwhile."""
        p = self.pipe.preset
        loop = StepLoop("bsd", self.total, p.preview_every, p.checkpoint_every, self.pipe.checkpoint_path("bsd.pt"),
                        self.pipe.progress, self.pipe.cancelled)
        for param in self.geometry:
            param.requires_grad_(False)
        try:
            loop.run(self)
        finally:
            for param in self.geometry:
                param.requires_grad_(True)

    def training_step(self) -> tuple[torch.Tensor, dict]:
        pipe, p = self.pipe, self.pipe.preset
        pipe.occupancy.update(pipe.field.density, p.coarse_steps + self.step)
        if self.config.bootstraps_at(self.step):
            c2w, fovs = pipe.cameras.sample(self.config.views)
            with torch.no_grad():
                renders = pipe.render_views(c2w, fovs, jitter=False)["image"]
            self.last = self.guidance.bootstrap(renders, c2w.to(self.device), pipe.cond, self.step, self.total)
            logger.info("bsd step %d: bootstrapped %d views at t' %.2f (copy's loss %.4f -> %.4f)", self.step,
                        len(c2w), self.last["t_prime"], self.last["dreambooth_loss_first"],
                        self.last["dreambooth_loss"])
        loss, logs = pipe.reconstruction_loss()
        c2w, fovs = pipe.cameras.sample(p.views_per_step)
        out = pipe.render_views(c2w, fovs, jitter=True)
        g = self.guidance(out["image"], c2w.to(self.device), pipe.cond, self.step, self.total)
        loss = loss + pipe.fit.distill_weight * g.loss
        return loss, logs | {"bsd": float(g.loss.detach()), "lora_loss": g.extras["lora_loss"], **self.last}

    def checkpoint_state(self) -> dict:
        return self.pipe.checkpoint_state() | {"bsd": self.guidance.state_dict()}

    def restore_state(self, state: dict) -> None:
        self.pipe.restore_state(state)
        self.guidance.load_state_dict(state["bsd"])

    def generators(self) -> dict[str, torch.Generator]:
        return {"cameras": self.pipe.gen, "bsd": self.guidance.generator}

    def snapshot(self) -> dict:
        return self.pipe.snapshot()

    def record(self) -> dict:
        """The sidecar's account of the stage."""
        c = self.config
        return {"t_start": c.t_start, "t_end": c.t_end, "round_steps": c.round_steps, "views": c.views,
                "trains": "the colour network (geometry fixed)",
                "finetune_steps": c.finetune_steps, "fine_tuned_copy": f"LoRA rank {c.lora_rank} on "
                f"{', '.join(c.lora_target_modules)}", "guidance_scale": self.guidance.config.guidance_scale}
