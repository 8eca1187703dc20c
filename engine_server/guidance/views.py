"""View-dependent prompts: "front view", "side view", "back view", "overhead view" from a camera pose."""
from __future__ import annotations

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
