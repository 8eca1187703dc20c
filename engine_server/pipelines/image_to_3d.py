"""Image to 3D: reference image -> mask -> generated views -> field fit + novel-view distillation -> GLB.

A :class:`TextTo3D` subclass: the coarse stage's objective (``coarse_loss``) is replaced,
everything else (checkpoints, events, cancel, extraction, texture, export) is inherited.

  views    the reference image (alpha channel, or background removal by colour on a plain
           background) is composited on the prior's background; N views are generated around
           it with the image-conditioned (novel-view) prior (:mod:`engine_server.multiview`);
           without an image the prior first draws the reference view from the prompt
           (text -> views -> 3D: the ``multiview`` job);
  coarse   the hash-grid field is fitted to the reference view (photometric + mask losses,
           weight ``ref_weight``) and to the generated views (weight ``view_weight``); after
           ``distill_start`` of the run, score distillation from the novel-view prior conditioned
           on the reference (Magic123's 3D prior) joins in at random views;
  extract / texture / export   as for text.
The generated views are saved with the coarse checkpoint, so a resumed job fits the same views.
"""
from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine_server.cameras import Camera, CameraSampler, azimuth_elevation, look_at, orbit_position
from engine_server.multiview import (
    DEFAULT_ELEVATION,
    MultiViewConfig,
    MultiViewResult,
    ViewReference,
    default_rig,
    generate_views,
)
from engine_server.pipelines.events import ProgressEvent
from engine_server.pipelines.loop import save_torch
from engine_server.pipelines.text_to_3d import TextTo3D, TextTo3DRequest

logger = logging.getLogger(__name__)

MAX_IMAGE_SIDE = 8192
"""Largest accepted reference image side in pixels."""
MAX_IMAGE_BYTES = 64 * 1024 * 1024
"""Largest accepted reference image file in bytes."""


class BadImageError(ValueError):
    """A reference image that cannot be used; the message names the problem in one line."""


# ------------------------------------------------------------------------------------------ image input


def read_image(source: str | Path | bytes | np.ndarray) -> np.ndarray:
    """A reference image as (H, W, 4) float32 RGBA in [0, 1] (alpha 1 when the image has none).

    source: a file path, encoded bytes (PNG / JPEG / ...), or an (H, W, 3|4) uint8 / float array.
    Raises :class:`BadImageError` for a missing, empty, unreadable or too large image.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, np.ndarray):
        arr = source
        if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.shape[0] == 0 or arr.shape[1] == 0:
            raise BadImageError(f"reference image array must be (H, W, 3|4), got shape {arr.shape}")
        arr = arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float32)
        if not np.isfinite(arr).all():
            raise BadImageError("reference image array holds non-finite values")
        arr = np.clip(arr, 0.0, 1.0)
    else:
        name = "image bytes"
        if isinstance(source, (bytes, bytearray)):
            data = bytes(source)
        else:
            path = Path(source)
            name = str(path)
            if not path.is_file():
                raise BadImageError(f"reference image {name} does not exist")
            size = path.stat().st_size
            if size > MAX_IMAGE_BYTES:
                raise BadImageError(f"reference image {name} is too large: {size} bytes (limit {MAX_IMAGE_BYTES})")
            data = path.read_bytes()
        if len(data) == 0:
            raise BadImageError(f"reference image {name} is empty (0 bytes)")
        if len(data) > MAX_IMAGE_BYTES:
            raise BadImageError(f"reference image {name} is too large: {len(data)} bytes (limit {MAX_IMAGE_BYTES})")
        try:
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w == 0 or h == 0:
                    raise BadImageError(f"reference image {name} is empty ({w}x{h} pixels)")
                if max(w, h) > MAX_IMAGE_SIDE:
                    raise BadImageError(f"reference image {name} is too large: {w}x{h} pixels "
                                        f"(limit {MAX_IMAGE_SIDE} per side)")
                im.load()
                arr = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0
        except BadImageError:
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise BadImageError(f"cannot read reference image {name}: not a readable image file ({exc})") from None
    if max(arr.shape[:2]) > MAX_IMAGE_SIDE:
        raise BadImageError(f"reference image is too large: {arr.shape[1]}x{arr.shape[0]} pixels "
                            f"(limit {MAX_IMAGE_SIDE} per side)")
    if arr.shape[2] == 3:
        arr = np.concatenate([arr, np.ones_like(arr[..., :1])], axis=2)
    return np.ascontiguousarray(arr)


def foreground_mask(rgba: np.ndarray, threshold: float = 0.15) -> tuple[np.ndarray, str]:
    """Foreground (H, W) bool of an RGBA image and how it was found ("alpha" or "colour").

    With transparency the alpha channel decides (alpha > 0.5). Otherwise the background
    must be plain: the median colour of the image border, shared by >= 90% of the border
    pixels; foreground is what differs from it by more than ``threshold`` in some channel.
    Raises :class:`BadImageError` when there is no plain background or no foreground.
    """
    alpha = rgba[..., 3]
    if (alpha < 0.99).mean() > 0.001:
        mask, how = alpha > 0.5, "alpha"
    else:
        rgb = rgba[..., :3]
        border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
        bg = np.median(border, axis=0)
        plain = (np.abs(border - bg).max(1) <= threshold).mean()
        if plain < 0.9:
            raise BadImageError(
                "reference image has no transparency and no plain background to remove "
                f"({plain:.0%} of its border matches one colour); use a PNG with an alpha channel"
            )
        mask, how = np.abs(rgb - bg).max(2) > threshold, "colour"
    fraction = float(mask.mean())
    if mask.sum() < 4 or fraction < 0.002:
        raise BadImageError(f"reference image has no foreground: nothing stands out from the background "
                            f"({'alpha' if how == 'alpha' else 'colour'} mask covers {fraction:.2%})")
    if fraction > 0.95:
        raise BadImageError(f"reference image has no background: the foreground covers {fraction:.0%} of it")
    return mask, how


def prepare_reference(rgba: np.ndarray, mask: np.ndarray, background_rgb, resolution: int,
                      recenter: bool = True, target_fraction: float = 0.6) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference composited on ``background_rgb`` at ``resolution``: image (3, R, R) in [0, 1], mask (R, R) bool.

    With ``recenter`` an object that is off-centre or too small / large is moved to the centre and
    scaled so its larger bounding-box side covers ``target_fraction`` of the frame (as the prior's
    training objects do at its default camera); otherwise the image is only padded to a square.
    """
    from PIL import Image

    bg = np.asarray(background_rgb, dtype=np.float32).reshape(1, 1, 3)
    has_alpha = bool((rgba[..., 3] < 0.99).any())
    a = rgba[..., 3:4] if has_alpha else mask[..., None].astype(np.float32)  # soft edges from alpha
    rgb = rgba[..., :3] * a + bg * (1 - a)
    h, w = mask.shape
    rows, cols = np.nonzero(mask)
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    side = max(h, w)
    cy, cx = 0.5 * h, 0.5 * w
    if recenter:
        extent = max(r1 - r0, c1 - c0)
        off = max(abs(0.5 * (r0 + r1) - cy), abs(0.5 * (c0 + c1) - cx)) / side
        if off > 0.05 or not 0.4 <= extent / side <= 0.8:
            side = int(math.ceil(extent / target_fraction))
            cy, cx = 0.5 * (r0 + r1), 0.5 * (c0 + c1)
    # Square canvas of `side` pixels centred at (cy, cx), background outside the image.
    top, left = int(round(cy - side / 2)), int(round(cx - side / 2))
    canvas = np.broadcast_to(bg, (side, side, 3)).copy()
    canvas_mask = np.zeros((side, side), dtype=np.float32)
    sr0, sc0 = max(top, 0), max(left, 0)
    sr1, sc1 = min(top + side, h), min(left + side, w)
    canvas[sr0 - top:sr1 - top, sc0 - left:sc1 - left] = rgb[sr0:sr1, sc0:sc1]
    canvas_mask[sr0 - top:sr1 - top, sc0 - left:sc1 - left] = mask[sr0:sr1, sc0:sc1]
    img = Image.fromarray((canvas * 255).round().astype(np.uint8)).resize((resolution, resolution), Image.BOX)
    m = Image.fromarray((canvas_mask * 255).astype(np.uint8)).resize((resolution, resolution), Image.BOX)
    image = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
    small_mask = torch.from_numpy(np.asarray(m, dtype=np.float32) / 255.0) > 0.5
    if not small_mask.any():
        raise BadImageError(f"reference image has no foreground left at {resolution}x{resolution} pixels "
                            "(the object is too small)")
    return image, small_mask


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

    def setup(self, prior) -> None:
        request = self.request
        rgba = None
        if request.image is not None:
            rgba = read_image(request.image)  # bad images fail here, before any model loads
            mask, self.mask_source = foreground_mask(rgba)
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
        if request.rig:
            ref_cam = request.rig[0]
            self.reference_c2w, self.reference_fov = ref_cam.c2w.float(), float(ref_cam.fov_y_deg)
        else:
            dist = float(ranges.get("default_distance", 2.5))
            self.reference_fov = float(request.reference_fov or ranges.get("default_fov", 42.0))
            self.reference_c2w = look_at(orbit_position(0.0, DEFAULT_ELEVATION, dist))
        if rgba is not None:
            self.reference_image, self.reference_mask = prepare_reference(
                rgba, mask, self.background_rgb, res, recenter=request.recenter and not request.rig)
        else:
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
            save_torch(path, {"image": image, "mask": mask})
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
                                  "agreement": v.agreement, "strategy": v.strategy, "extras": v.extras})
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
        if f.views_per_step and f.view_weight > 0 and views is not None and len(views.images):
            k = min(f.views_per_step, len(views.images))
            idx = torch.randperm(len(views.images), generator=self.gen)[:k]
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
                          "fov_y_deg": self.reference_fov,
                          "source": str(self.request.image) if isinstance(self.request.image, (str, Path)) else None},
            "views": {"count": len(views.images), "strategy": views.strategy,
                      "agreement": [round(float(a), 4) for a in views.agreement]},
        }
