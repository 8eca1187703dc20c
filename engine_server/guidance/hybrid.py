"""Hybrid score distillation (DreamCraft3D): a text-to-image prior's gradient plus a novel-view prior's.

    grad = grad SDS(text prior | prompt) + mu * grad 3D-SDS(novel-view prior | reference)

The text prior adds detail where the reference says nothing (the back, the sides); the 3D-aware
novel-view prior, conditioned on the reference view and its camera, keeps the views consistent
with it. Both branches score the same renders at the same cameras, each with its own timestep
and noise (its own generator), and their surrogate losses add, so the gradient reaching the
renders is exactly the weighted sum of the two guidances' gradients.

The text branch sees the prompt alone (no reference image): with the bundled prior that is its
text mode, with published priors a Stable Diffusion model (view-dependent prompt suffixes
included); the image branch sees what the image job's distillation always saw (the reference,
and the prompt where the prior reads one).
"""
from __future__ import annotations

from typing import Any

import torch

from engine_server.guidance.config import Conditioning, GuidanceConfig
from engine_server.guidance.score import GuidanceOutput, ScoreDistillation

TEXT_KINDS = ("text", "multiview")
"""Prior kinds that read a prompt on its own (Stable Diffusion, MVDream, the bundled model)."""


class HybridGuidance:
    """Two guidances over one set of renders: ``text`` (prompt only) + ``weight`` x ``image`` (the reference).

    Called like a :class:`ScoreDistillation`: ``guidance(images, cameras, cond, step, total_steps)``;
    ``cond`` carries the prompt and the reference, the text branch gets the prompt alone.
    """

    def __init__(self, text: ScoreDistillation, image: ScoreDistillation, weight: float) -> None:
        if weight < 0:
            raise ValueError(f"hybrid_weight must be >= 0, got {weight}")
        if getattr(text.prior, "kind", None) not in TEXT_KINDS:
            raise ValueError(f"the hybrid's text branch needs a prior that reads prompts ({', '.join(TEXT_KINDS)}); "
                             f"{type(text.prior).__name__} is a {getattr(text.prior, 'kind', None)!r} prior")
        self.text, self.image, self.weight = text, image, float(weight)

    @property
    def config(self) -> GuidanceConfig:
        """The image branch's config (what the job's sidecar reports as its guidance)."""
        return self.image.config

    @property
    def generator(self) -> torch.Generator:
        """The image branch's generator (the text branch's is :attr:`text_generator`)."""
        return self.image.generator

    @property
    def text_generator(self) -> torch.Generator:
        return self.text.generator

    @staticmethod
    def text_conditioning(cond: Conditioning) -> Conditioning:
        """What the text branch sees: the prompt and negative prompt, no reference."""
        if not (cond.prompt or "").strip():
            raise ValueError("hybrid guidance needs a prompt for its text-to-image prior (e.g. \"a red cube\"); "
                             "give one, or turn hybrid off")
        return Conditioning(prompt=cond.prompt, negative_prompt=cond.negative_prompt)

    def prepare_inputs(self, cond: Conditioning, cameras: torch.Tensor) -> None:
        """Check (and cache) both branches' conditioning now: a prompt the text prior cannot read fails here."""
        self.text.prepare_inputs(self.text_conditioning(cond), cameras)
        self.image.prepare_inputs(cond, cameras)

    def __call__(self, images: torch.Tensor, cameras: torch.Tensor, cond: Conditioning, step: int,
                 total_steps: int) -> GuidanceOutput:
        """Renders (B, 3, H, W) in [0, 1] at cameras (B, 4, 4): text SDS + weight x image SDS."""
        text = self.text(images, cameras, self.text_conditioning(cond), step, total_steps)
        image = self.image(images, cameras, cond, step, total_steps)
        extras: dict[str, Any] = {"t_range": image.extras.get("t_range"), "text_loss": float(text.loss.detach()),
                                  "image_loss": float(image.loss.detach()), "text_t": text.t,
                                  "text_grad_norm": text.grad_norm, "image_grad_norm": image.grad_norm}
        # The branches' gradients live in their priors' own spaces (pixels, or each prior's latents), so
        # their sum's norm is not formed; the bound |g_text| + mu |g_image| is reported instead.
        return GuidanceOutput(loss=text.loss + self.weight * image.loss,
                              grad_norm=text.grad_norm + self.weight * image.grad_norm, t=image.t, extras=extras)
