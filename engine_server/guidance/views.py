"""View-dependent prompts: "front view", "side view", "back view", "overhead view" from a camera pose,
and the Perp-Neg plan (interpolated positive prompt, weighted negatives) of each view."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine_server.cameras import azimuth_elevation
from engine_server.guidance.config import ViewPromptConfig

FRONT, SIDE, BACK, OVERHEAD = "front view", "side view", "back view", "overhead view"


def view_names(c2w: torch.Tensor, config: ViewPromptConfig | None = None) -> list[str]:
    """One view name per camera of ``c2w`` (B, 4, 4), from its orbit azimuth and elevation.

    Azimuth 0 is the front (Blender's front view); elevation above the
    overhead threshold wins over any azimuth.
    """
    config = config or ViewPromptConfig()
    if c2w.dim() == 2:
        c2w = c2w[None]
    if c2w.dim() != 3 or tuple(c2w.shape[1:]) != (4, 4):
        raise ValueError(f"cameras must be (B, 4, 4) camera-to-world matrices, got shape {tuple(c2w.shape)}")
    az, el = azimuth_elevation(c2w.detach().to(torch.float32).cpu())
    names = []
    for a, e in zip(az.tolist(), el.tolist()):
        from_front = min(a, 360.0 - a)  # angular distance to azimuth 0
        if e > config.overhead_elevation_deg:
            names.append(OVERHEAD)
        elif from_front <= config.front_azimuth_deg:
            names.append(FRONT)
        elif abs(a - 180.0) <= config.back_azimuth_deg:
            names.append(BACK)
        else:
            names.append(SIDE)
    return names


def view_prompts(prompt: str, c2w: torch.Tensor, config: ViewPromptConfig | None = None) -> list[str]:
    """The prompt with a view suffix for each camera of ``c2w`` (B, 4, 4)."""
    config = config or ViewPromptConfig()
    return [config.template.format(prompt=prompt, view=name) for name in view_names(c2w, config)]


@dataclass
class PerpNegPlan:
    """Per view of a batch of B: the positive prompt as a mix of two view prompts, and two negative view prompts.

    The positive embedding is ``mix * emb(positive[0]) + (1 - mix) * emb(positive[1])``; the guided noise
    adds ``sum_k weights[:, k] * perp(eps(negative[k]) - eps_u, eps_pos - eps_u)`` to the positive direction
    (weights are <= 0 where a neighbour's look is to be avoided; 0 for overhead views).
    """

    positive: tuple[list[str], list[str]]
    """The two view names mixed into each view's positive prompt."""
    mix: torch.Tensor
    """(B,) weight of ``positive[0]``."""
    negative: tuple[list[str], list[str]]
    """The two negative view names of each view."""
    weights: torch.Tensor
    """(B, 2) weights of the negatives."""


def _decay(abc: tuple[float, float, float], r: float) -> float:
    a, b, c = abc
    return a * math.exp(-b * r) + c


def perp_neg_plan(c2w: torch.Tensor, config: ViewPromptConfig | None = None) -> PerpNegPlan:
    """The Perp-Neg plan of cameras ``c2w`` (B, 4, 4) (threestudio's interpolation and weights).

    Between front (azimuth 0) and side (90): r = 1 - |az| / 90, positive r front + (1 - r) side, negatives
    front and side. Between side and back: r = 2 - |az| / 90, positive r side + (1 - r) back, negatives side
    and front. Overhead views (the view prompts' threshold): the overhead prompt and no negatives.
    """
    config = config or ViewPromptConfig()
    if c2w.dim() == 2:
        c2w = c2w[None]
    az, el = azimuth_elevation(c2w.detach().to(torch.float32).cpu())
    pos_a, pos_b, neg_a, neg_b, mix, weights = [], [], [], [], [], []
    for a, e in zip(az.tolist(), el.tolist()):
        off_front = abs((a + 180.0) % 360.0 - 180.0)  # |azimuth| in [0, 180]
        if e > config.overhead_elevation_deg:
            pos_a.append(OVERHEAD), pos_b.append(OVERHEAD), mix.append(1.0)
            neg_a.append(OVERHEAD), neg_b.append(OVERHEAD), weights.append((0.0, 0.0))
        elif off_front < 90.0:
            r = 1.0 - off_front / 90.0
            pos_a.append(FRONT), pos_b.append(SIDE), mix.append(r)
            neg_a.append(FRONT), neg_b.append(SIDE)
            weights.append((-_decay(config.perp_neg_front_side, r), -_decay(config.perp_neg_side_front, 1.0 - r)))
        else:
            r = 2.0 - off_front / 90.0
            pos_a.append(SIDE), pos_b.append(BACK), mix.append(r)
            neg_a.append(SIDE), neg_b.append(FRONT)
            weights.append((-_decay(config.perp_neg_side_back, r), -_decay(config.perp_neg_front_back, r)))
    return PerpNegPlan((pos_a, pos_b), torch.tensor(mix), (neg_a, neg_b), torch.tensor(weights))
