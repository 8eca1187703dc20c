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
  extract / texture / export   as for text.
The generated views are saved with the coarse checkpoint, so a resumed job fits the same views.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
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
    normalise_light,
    prepare_reference,
    read_image,
)
from engine_server.pipelines.events import ProgressEvent
from engine_server.pipelines.loop import save_torch
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

    def __post_init__(self) -> None:
        for name in ("ref_weight", "view_weight", "mask_weight", "distill_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"ImageFitConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.distill_start <= 1.0:
            raise ValueError(f"ImageFitConfig.distill_start must be in [0, 1], got {self.distill_start}")
        if self.views_per_step < 0:
            raise ValueError(f"ImageFitConfig.views_per_step must be >= 0, got {self.views_per_step}")


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
    """Centre and scale the object in the reference image (only without a rig)."""
    fit: ImageFitConfig = field(default_factory=ImageFitConfig)
    """Weights and schedule of the fit."""


# ------------------------------------------------------------------------------------------ pipeline


class ImageTo3D(TextTo3D):
    """The image-to-3D pipeline. ``run(out_path)`` does every stage and writes the GLB."""

    STAGES = ("views", "coarse", "extract", "texture", "export")
    GUIDANCE_STAGE = "image"

    request: ImageTo3DRequest
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
            self.reference_image, self.reference_mask = prepare_reference(
                normalise_light(matte.rgba, matte.mask), matte.mask, self.background_rgb, res,
                recenter=request.recenter and not request.rig)
        if request.rig:
            cam = request.rig[0]
            az, el = azimuth_elevation(cam.c2w.float())
            self.reference_camera = ReferenceCamera(cam.c2w.float(), float(cam.fov_y_deg), "rig", float(el), float(az))
        elif matte is not None:
            self.reference_camera = estimate_reference_camera(prior, self.reference_image, dist, fov,
                                                              DEFAULT_ELEVATION, seed=request.seed)
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
            ref = ViewReference(self.reference_image, self.reference_c2w, self.reference_fov)

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
    def _fit_loss(self, c2w: torch.Tensor, fovs: torch.Tensor, images: torch.Tensor,
                  masks: torch.Tensor) -> torch.Tensor:
        """Sum over pixels of photometric + mask losses of views c2w (B, 4, 4) against images (B, 3, R, R)."""
        out = self.render_views(c2w, fovs, jitter=True)
        photo = ((out["image"] - images.to(self.device)) ** 2).sum()
        opacity = out["opacity"].reshape(len(c2w), self.resolution, self.resolution)
        mask = ((opacity - masks.to(self.device).float()) ** 2).sum()
        return 0.5 * (photo + self.fit.mask_weight * mask)

    def coarse_loss(self) -> tuple[torch.Tensor, dict]:
        """Reference + generated-view reconstruction, then novel-view distillation (Magic123)."""
        f, p = self.fit, self.preset
        ref = self._fit_loss(self.reference_c2w[None], torch.tensor([self.reference_fov]),
                             self.reference_image[None], self.reference_mask[None])
        loss = f.ref_weight * ref
        logs = {"ref": float(ref.detach())}
        views = self.views
        # Views whose shape disagrees with the others' and the reference's are left out of the fit.
        usable = torch.nonzero(views.agreement >= AGREEMENT_THRESHOLD).flatten() if views is not None else []
        if f.views_per_step and f.view_weight > 0 and len(usable):
            k = min(f.views_per_step, len(usable))
            idx = usable[torch.randperm(len(usable), generator=self.gen)[:k]]
            mv = self._fit_loss(views.c2w[idx], views.fovs[idx], views.images[idx], views.masks[idx])
            loss = loss + f.view_weight * mv
            logs["views"] = float(mv.detach())
        if f.distill_weight > 0 and self.step >= f.distill_start * p.coarse_steps:
            c2w, fovs = self.cameras.sample(p.views_per_step)
            out = self.render_views(c2w, fovs, jitter=True)
            g = self.guidance(out["image"], c2w.to(self.device), self.cond, self.step, p.coarse_steps)
            opacity = out["opacity"].clamp(1e-5, 1 - 1e-5)
            loss = loss + f.distill_weight * g.loss + p.sparsity_weight * opacity.sum()
            logs["sds"] = float(g.loss.detach())
        return loss, logs

    def coarse(self) -> None:
        if self.views is None:
            self.generate()
        self._check_cancel()
        super().coarse()

    def extract(self) -> tuple[np.ndarray, np.ndarray]:
        """Marching tetrahedra as for text; the field-space mesh is kept as ``self.field_mesh``."""
        vertices, faces = super().extract()
        self.field_mesh = (vertices, faces)
        return vertices, faces

    # ---------------------------------------------------------------- export
    def sidecar(self) -> dict:
        """The text sidecar plus the reference and the generated views."""
        views = self.views
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
        }
