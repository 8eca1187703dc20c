"""Tiny random diffusers folders of the real classes, built once per test session (no network)."""
from __future__ import annotations

import pytest
import torch

from engine_server.cameras import orbit_camera
from engine_server.guidance import tiny


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A folder holding one tiny random model per adapter, written with ``save_pretrained``."""
    root = tmp_path_factory.mktemp("priors")
    tiny.make_stable_diffusion(root / "sd")
    tiny.make_stable_diffusion(root / "sd-v", prediction_type="v_prediction", seed=1)
    tiny.make_novel_view(root / "zero123")
    tiny.make_novel_view(root / "zero123-cc", projection_component="cc_projection", seed=2)
    tiny.make_multiview(root / "mvdream")
    return root


@pytest.fixture
def cameras() -> torch.Tensor:
    """Four orbit cameras at azimuth 0, 90, 180, 270 and 15 deg elevation, (4, 4, 4)."""
    return torch.stack([orbit_camera(az, 15.0, 2.5, 40.0, 32).c2w for az in (0.0, 90.0, 180.0, 270.0)])
