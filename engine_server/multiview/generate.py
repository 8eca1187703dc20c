"""Generate N views of one object that agree with each other, from a prompt or a reference image.

    result = generate_views(prior, cameras, prompt="a red cube")            # camera-conditioned prior
    result = generate_views(prior, cameras, reference=ViewReference(img, c2w, fov))  # novel-view prior

``prior`` is any guidance ``Prior`` (``load_prior(...)``), sampled by :class:`PriorSampler`
(diffusers' DDIM on the prior's own schedule and prediction type, classifier-free guidance), so
the bundled model, Zero123-family and MVDream-style adapters all work. Agreement between views
comes from the strategy (``MultiViewConfig.strategy``):

- ``"anchor"``: a text request first draws an anchor view (the first camera) from the prompt;
  every other view is then a novel view of the anchor (or of the reference image), all
  conditioned on that one image, with the same starting noise, in one batched sampling.
- ``"sequential"``: views are drawn one after another, each conditioned on the nearest view
  already known (the anchor / reference first), so neighbours agree; slower (one sampling per view).
- ``"independent"``: every view from the prompt / reference alone (the baseline agreement is measured against).

A multi-view prior (``views_per_sample`` > 1, MVDream-style) samples the rig jointly instead, whatever
the strategy: groups of that many views are denoised together, its cross-view attention making them
agree (the last group padded with repeats of its last camera); the result's strategy is ``"joint"``.

A view drawn from the prompt alone (no reference image given, or a reference the prior drew from
the prompt: ``ViewReference.from_prompt``) is checked against the prompt
where the prior can say so (its ``check_views``; the bundled prior compares the silhouette and
colour with what the caption implies): a wrong object is drawn again from fresh noise, up to
``MultiViewConfig.max_redraws`` times, keeping the closest draw; ``MultiViewResult.redrawn``
counts the views drawn again. The anchor is checked before any view is conditioned on it.

Returned masks come from the prior's plain background colour; ``agreement`` is how well each
view's silhouette agrees with the visual hull of the other views and the reference
(:func:`silhouette_agreement`: about 1 for one solid, below ``AGREEMENT_THRESHOLD`` for a view of
another shape). A view below it is drawn again from fresh noise (up to ``max_redraws`` times,
keeping the better draw; ``extras["reshaped"]``), and what still disagrees is listed in
``extras["disagreeing"]`` for the fit to leave out.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from engine_server.cameras import Camera, azimuth_elevation
from engine_server.multiview.rig import AGREEMENT_THRESHOLD, background_mask, silhouette_agreement
from engine_server.multiview.sampler import PriorSampler

logger = logging.getLogger(__name__)

STRATEGIES = ("anchor", "sequential", "independent")


@dataclass
class MultiViewConfig:
    """How views are sampled."""

    strategy: str = "anchor"
    """"anchor", "sequential" or "independent" (see the module docstring)."""
    steps: int = 20
    """DDIM steps per sampling."""
    guidance_scale: float = 2.0
    """Classifier-free guidance scale."""
    shared_noise: bool = True
    """Start every view from the same noise image (helps colours and texture agree)."""
    seed: int = 0
    """Seed of the starting noise."""
    mask_threshold: float = 0.15
    """A pixel is foreground when some channel is further than this from the background colour."""
    max_redraws: int = 3
    """Times a view whose object is not the prompt's, or whose shape disagrees with the others', is drawn
    again (0: views are not checked)."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"MultiViewConfig.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.steps < 1:
            raise ValueError(f"MultiViewConfig.steps must be >= 1, got {self.steps}")
        if self.guidance_scale < 0:
            raise ValueError(f"MultiViewConfig.guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.max_redraws < 0:
            raise ValueError(f"MultiViewConfig.max_redraws must be >= 0, got {self.max_redraws}")


@dataclass
class ViewReference:
    """A known view of the object: the image and its camera."""

    image: torch.Tensor
    """(3, R, R) in [0, 1], object on the prior's background colour."""
    c2w: torch.Tensor
    """(4, 4) camera-to-world."""
    fov_y_deg: float
    """Vertical FOV in degrees."""
    from_prompt: bool = False
    """Drawn by the prior from the prompt (a ``multiview`` job's first view), not the user's image: the
    views drawn from it are checked against the prompt too."""


@dataclass
class MultiViewResult:
    """Generated views and what they were generated at."""

    images: torch.Tensor
    """(N, 3, R, R) in [0, 1]."""
    c2w: torch.Tensor
    """(N, 4, 4) camera-to-world of each view."""
    fovs: torch.Tensor
    """(N,) vertical FOVs in degrees."""
    masks: torch.Tensor
    """(N, R, R) bool foreground (off the prior's background colour)."""
    agreement: torch.Tensor
    """(N,) agreement of each silhouette with the others' visual hull (and the reference's): ~1 agrees,
    below :data:`~engine_server.multiview.rig.AGREEMENT_THRESHOLD` another shape."""
    strategy: str = "anchor"
    """The sampling strategy used."""
    redrawn: int = 0
    """How many views were drawn again because their object was not the prompt's."""
    extras: dict = field(default_factory=dict)
    """Anything else worth logging: seconds, azimuth / elevation per view, ``unresolved`` {view: what is
    still wrong} for views no redraw fixed, ``reshaped`` (views redrawn for disagreeing in shape) and
    ``disagreeing`` (views that still do)."""

    def images_uint8(self) -> np.ndarray:
        """The views as (N, R, R, 3) uint8 (image files, wire arrays)."""
        return (self.images.float().cpu().permute(0, 2, 3, 1).clamp(0, 1) * 255).round().byte().numpy()

    def strip(self) -> np.ndarray:
        """The views side by side, (R, N * R, 3) uint8: a preview of the whole set."""
        return np.concatenate(list(self.images_uint8()), axis=1)

    @property
    def cameras(self) -> list[Camera]:
        """The views' cameras as :class:`Camera` objects."""
        r = self.images.shape[-1]
        return [Camera(c, float(f), r, r) for c, f in zip(self.c2w, self.fovs)]


def _conditioning(prompt: str | None, ref: ViewReference | None):
    from engine_server.guidance import Conditioning

    if ref is None:
        return Conditioning(prompt=prompt or None)
    return Conditioning(prompt=prompt or None, reference_image=ref.image.float(), reference_c2w=ref.c2w.float(),
                        fov_y_deg=float(ref.fov_y_deg))


def _nearest(c2w: torch.Tensor, known: list[torch.Tensor]) -> int:
    """Index of the known camera whose viewing direction is closest to c2w's."""
    d = c2w[:3, 3] / c2w[:3, 3].norm()
    dots = [float((k[:3, 3] / k[:3, 3].norm()) @ d) for k in known]
    return max(range(len(known)), key=dots.__getitem__)


def generate_views(
    prior,
    cameras: list[Camera] | torch.Tensor,
    prompt: str | None = None,
    reference: ViewReference | None = None,
    config: MultiViewConfig | None = None,
    fovs: torch.Tensor | list[float] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> MultiViewResult:
    """N views at ``cameras`` (list of Camera, or (N, 4, 4) c2w with ``fovs``) that agree with each other.

    Needs ``prompt`` (camera-conditioned prior) and/or ``reference`` (novel-view prior).
    ``progress(done, total)`` is called after each view (or batch of views) is drawn.
    """
    config = config or MultiViewConfig()
    if prompt is None and reference is None:
        raise ValueError("generate_views needs a prompt or a reference view")
    if isinstance(cameras, torch.Tensor):
        c2w = cameras.float().reshape(-1, 4, 4)
        if fovs is None:
            fovs = [float(getattr(prior, "camera_ranges", {}).get("default_fov", 40.0))] * len(c2w)
    else:
        c2w = torch.stack([c.c2w.float() for c in cameras])
        fovs = [c.fov_y_deg for c in cameras] if fovs is None else fovs
    fovs = torch.as_tensor(fovs, dtype=torch.float32).reshape(-1)
    n = len(c2w)
    if n < 1 or len(fovs) != n:
        raise ValueError(f"need at least one camera and one FOV per camera, got {n} cameras and {len(fovs)} FOVs")
    if reference is None and getattr(prior, "kind", "multiview") == "image":
        raise ValueError("this prior is a novel-view (image-conditioned) model: pass a reference image")
    if reference is not None and getattr(prior, "kind", "multiview") == "text":
        raise ValueError("this prior is text-only: it cannot generate novel views of a reference image")
    group = int(getattr(prior, "views_per_sample", 1) or 1)
    if group > 1 and reference is not None:
        raise ValueError("this multi-view prior draws views from a prompt only: it cannot take a reference image")
    sampler = PriorSampler(prior, config.steps, config.guidance_scale)

    def draw_noise(k: int, gen: torch.Generator) -> torch.Tensor:
        """Starting noise (k, C, h, w): one image for all k views with ``shared_noise``."""
        return sampler.noise(1, gen).expand(k, -1, -1, -1) if config.shared_noise else sampler.noise(k, gen)

    noise = draw_noise(n, torch.Generator().manual_seed(config.seed))
    # Redraws take fresh noise from a stream of their own, so the first draw is the same with or without checks.
    redraw_gen = torch.Generator().manual_seed(config.seed + 1)
    # A user's reference image shows their object, not the prompt's: only prompt-drawn views are checked.
    from_prompt = reference is None or reference.from_prompt
    check = getattr(prior, "check_views", None) if prompt and from_prompt and config.max_redraws else None
    t0 = time.perf_counter()
    images: list[torch.Tensor | None] = [None] * n
    redrawn: set[int] = set()
    unresolved: dict[int, str] = {}

    def sample(idx: list[int], ref: ViewReference | None, start: torch.Tensor) -> torch.Tensor:
        """Views (len(idx), 3, R, R) at cameras idx from noise start (len(idx), C, h, w)."""
        pad = -len(idx) % group  # a multi-view prior denoises whole groups
        batch, start = idx + idx[-1:] * pad, torch.cat([start, start[-1:].expand(pad, *start.shape[1:])])
        return sampler.sample(_conditioning(prompt, ref), c2w[batch], start)[:len(idx)].cpu()

    def draw(idx: list[int], ref: ViewReference | None) -> None:
        out = sample(idx, ref, noise[idx])
        if check is not None:
            scores, problems = check(out, c2w[idx], fovs[idx], prompt)
            for _ in range(config.max_redraws):
                wrong = [k for k, p in enumerate(problems) if p is not None]
                if not wrong:
                    break
                redo = [idx[k] for k in wrong]
                logger.info("redrawing %d view(s): %s", len(redo),
                            "; ".join(f"view {i}: {problems[k]}" for i, k in zip(redo, wrong)))
                redrawn.update(redo)
                again = sample(redo, ref, draw_noise(len(redo), redraw_gen))
                new_scores, new_problems = check(again, c2w[redo], fovs[redo], prompt)
                for j, k in enumerate(wrong):  # keep the closer draw
                    if new_scores[j] > scores[k]:
                        out[k], scores[k], problems[k] = again[j], new_scores[j], new_problems[j]
            unresolved.update({idx[k]: p for k, p in enumerate(problems) if p is not None})
        for k, i in enumerate(idx):
            images[i] = out[k]
        if progress is not None:
            progress(sum(im is not None for im in images), n)

    anchor = reference
    todo = list(range(n))
    strategy = "joint" if group > 1 else config.strategy
    if strategy == "joint":
        for start in range(0, n, group):
            draw(todo[start:start + group], None)
    elif strategy == "independent":
        draw(todo, reference)
    else:
        if anchor is None:  # text: the first camera's view anchors the others
            draw([0], None)
            anchor = ViewReference(images[0], c2w[0], float(fovs[0]))
            todo = todo[1:]
        if config.strategy == "anchor":
            if todo:
                draw(todo, anchor)
        else:
            known = [anchor]
            remaining = list(todo)
            while remaining:
                # next: the remaining view closest to any known one; condition on that known view
                best = max(remaining, key=lambda i: max(float(
                    (c2w[i, :3, 3] / c2w[i, :3, 3].norm()) @ (k.c2w[:3, 3] / k.c2w[:3, 3].norm())) for k in known))
                ref = known[_nearest(c2w[best], [k.c2w for k in known])]
                draw([best], ref)
                known.append(ViewReference(images[best], c2w[best], float(fovs[best])))
                remaining.remove(best)
    if unresolved:
        logger.warning("%d view(s) still differ from %r after %d redraws: %s", len(unresolved), prompt,
                       config.max_redraws, "; ".join(f"view {i}: {p}" for i, p in sorted(unresolved.items())))
    bg = getattr(prior, "background_rgb", (0.0, 0.75, 0.75))
    # Views are scored against the others' visual hull; the reference (or the text anchor) is trusted.
    known_c2w, known_fovs, known_masks, trusted = c2w, fovs, None, ()
    if reference is not None and reference.image.shape[-1] == images[0].shape[-1]:
        known_masks = background_mask(reference.image.float().cpu()[None], bg, config.mask_threshold)
        known_c2w = torch.cat([c2w, reference.c2w.float().cpu()[None]])
        known_fovs = torch.cat([fovs, torch.tensor([float(reference.fov_y_deg)])])
        trusted = (n,)
    elif reference is None and strategy in ("anchor", "sequential"):
        trusted = (0,)

    def agreement_of(imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        masks = background_mask(imgs, bg, config.mask_threshold)
        every = masks if known_masks is None else torch.cat([masks, known_masks])
        return masks, silhouette_agreement(every, known_c2w, known_fovs, trusted=trusted)[:n]

    imgs = torch.stack(images)
    masks, agreement = agreement_of(imgs)
    # A view whose shape disagrees with the others' is drawn again from fresh noise (not for a multi-view
    # prior, whose views are drawn together), conditioned as the first draw was, keeping the better one.
    redraw_ref = reference if reference is not None else (anchor if strategy in ("anchor", "sequential") else None)
    reshaped: set[int] = set()
    for _ in range(config.max_redraws if strategy != "joint" else 0):
        bad = [i for i in range(n) if i not in trusted and float(agreement[i]) < AGREEMENT_THRESHOLD]
        if not bad:
            break
        logger.info("redrawing %d view(s) whose shape disagrees with the others': %s", len(bad),
                    ", ".join(f"view {i} ({float(agreement[i]):.2f})" for i in bad))
        trial = imgs.clone()
        trial[bad] = sample(bad, redraw_ref, draw_noise(len(bad), redraw_gen))
        trial_masks, trial_agreement = agreement_of(trial)
        better = [i for i in bad if float(trial_agreement[i]) > float(agreement[i])]
        reshaped.update(better)
        imgs[better] = trial[better]
        masks, agreement = agreement_of(imgs)
    disagreeing = [i for i in range(n) if float(agreement[i]) < AGREEMENT_THRESHOLD]
    if disagreeing:
        logger.warning("%d view(s) still disagree in shape with the others: %s", len(disagreeing),
                       ", ".join(f"view {i} ({float(agreement[i]):.2f})" for i in disagreeing))
    az, el = azimuth_elevation(c2w)
    logger.info("generated %d views (%s, %d redrawn) in %.1f s; silhouette agreement %s", n, strategy,
                len(redrawn), time.perf_counter() - t0, ", ".join(f"{v:.2f}" for v in agreement.tolist()))
    return MultiViewResult(imgs, c2w, fovs, masks, agreement, strategy, len(redrawn),
                           {"seconds": time.perf_counter() - t0, "azimuth": az.tolist(), "elevation": el.tolist(),
                            "unresolved": {str(i): p for i, p in sorted(unresolved.items())},
                            "reshaped": sorted(reshaped), "disagreeing": disagreeing})
