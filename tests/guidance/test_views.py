"""View-dependent prompt suffixes from camera azimuth / elevation."""
from __future__ import annotations

import torch

from engine_server.cameras import orbit_camera
from engine_server.guidance import ViewPromptConfig, view_names, view_prompts


def _cams(*az_el):
    return torch.stack([orbit_camera(az, el, 3.0, 40.0, 32).c2w for az, el in az_el])


def test_view_names_for_known_cameras():
    cams = _cams((0, 10), (30, 0), (90, 10), (180, 20), (200, 0), (270, 5), (330, 0), (120, 75))
    assert view_names(cams) == [
        "front view", "front view", "side view", "back view", "back view", "side view", "front view",
        "overhead view",
    ]


def test_thresholds_are_configurable():
    cams = _cams((30, 0), (150, 0), (0, 50))
    narrow = ViewPromptConfig(front_azimuth_deg=20, back_azimuth_deg=20, overhead_elevation_deg=45)
    assert view_names(cams) == ["front view", "back view", "front view"]
    assert view_names(cams, narrow) == ["side view", "side view", "overhead view"]


def test_view_prompts_join_prompt_and_view():
    cams = _cams((0, 0), (180, 0))
    assert view_prompts("a red chair", cams) == ["a red chair, front view", "a red chair, back view"]
    cfg = ViewPromptConfig(template="{view} of {prompt}")
    assert view_prompts("a cup", cams, cfg) == ["front view of a cup", "back view of a cup"]
