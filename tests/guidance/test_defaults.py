"""Per-prior defaults from the anchors, and every stage using them unless the request overrides."""
from __future__ import annotations

import numpy as np
import pytest

from engine_server.guidance import GuidanceConfig, PriorDefaults, load_prior, prior_defaults
from engine_server.guidance.adapters import StableDiffusionPrior
from engine_server.guidance.config import FALLBACK_DEFAULTS


@pytest.mark.parametrize("name, sds, vsd, background", [
    ("sd", 100.0, 7.5, None),       # DreamFusion / threestudio: SDS at 100, ProlificDreamer's VSD at 7.5
    ("sd-v", 100.0, 7.5, None),
    ("zero123", 3.0, None, (1.0, 1.0, 1.0)),  # threestudio zero123.yaml; trained on white
    ("mvdream", 50.0, None, None),  # threestudio mvdream-sd21.yaml
])
def test_each_family_declares_its_anchors(model_dir, name, sds, vsd, background):
    defaults = prior_defaults(load_prior(model_dir / name))
    assert defaults.scale("sds") == sds
    if vsd is None:
        with pytest.raises(ValueError, match="declares no guidance scale for 'vsd'"):
            defaults.scale("vsd")
    else:
        assert defaults.scale("vsd") == vsd
    assert defaults.background_rgb == background
    assert {"distance", "fov", "elevation", "default_distance", "default_fov"} <= set(defaults.camera_ranges)
    assert defaults.anchor


def test_zero123_cameras_are_its_training_cameras(model_dir):
    prior = load_prior(model_dir / "zero123")
    ranges = prior_defaults(prior).camera_ranges
    assert ranges["fov"] == (49.1, 49.1) and ranges["distance"] == (1.5, 2.2)
    assert prior.background_rgb == (1.0, 1.0, 1.0)  # what the view sampler composites on


def test_the_request_scale_wins_and_the_stage_scale_applies():
    d = PriorDefaults(guidance_scale={"sds": 100.0, "vsd": 7.5}, stage_guidance_scale={"refine": 20.0})
    assert d.guidance_config("sds").guidance_scale == 100.0
    assert d.guidance_config("vsd").guidance_scale == 7.5
    assert d.guidance_config("sds", 12.0).guidance_scale == 12.0
    assert d.guidance_config("sds", None, "refine").guidance_scale == 20.0
    assert d.guidance_config("sds", 0.0, "refine").guidance_scale == 0.0  # an explicit 0 is a value, not "unset"
    assert d.guidance_config("sds").timesteps is d.timesteps
    sd = prior_defaults(StableDiffusionPrior)
    assert sd.render_resolution(512) == 64 and sd.render_resolution(16) == 16  # small renders, upsampled
    assert GuidanceConfig().guidance_scale == 100.0


def test_a_prior_without_declared_defaults_gets_the_fallback_with_its_own_background():
    class Bare:
        background_rgb = (0.0, 0.75, 0.75)
        camera_ranges = {"distance": (2.2, 2.8)}

    d = prior_defaults(Bare())
    assert d.background_rgb == (0.0, 0.75, 0.75) and d.camera_ranges == {"distance": (2.2, 2.8)}
    assert d.scale("sds") == FALLBACK_DEFAULTS.scale("sds") == 7.5
    assert d.scale("sds", "image") == d.scale("sds", "refine") == 3.0


def test_text_to_3d_uses_the_prior_defaults_unless_the_request_overrides(model_dir):
    from engine_server.pipelines.text_to_3d import TextTo3D, TextTo3DRequest

    folder = str(model_dir / "sd")
    run = TextTo3D(TextTo3DRequest(prompt="a red chair", model=folder, overrides={"coarse_steps": 2}))
    assert run.guidance.config.guidance_scale == 100.0
    assert run.guidance.config.timesteps.start == (0.02, 0.98)
    assert run.resolution == 16  # the prior's render size, capped at its (tiny) resolution
    assert run.cameras.fov == (40.0, 70.0)
    vsd = TextTo3D(TextTo3DRequest(prompt="a red chair", model=folder, guidance="vsd", guidance_scale=5.0,
                                   negative_prompt="blurry", overrides={"render_resolution": 32}))
    assert vsd.guidance.config.mode == "vsd" and vsd.guidance.config.guidance_scale == 5.0
    assert vsd.resolution == 32 and vsd.cond.negative_prompt == "blurry"


def test_refine_uses_the_request_scale_and_mode(model_dir):
    from engine_server.pipelines.refine import RefineMesh, RefineMeshRequest

    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)
    f = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]], np.int64)
    folder = str(model_dir / "sd")
    default = RefineMesh(RefineMeshRequest(prompt="a cup", vertices=v, faces=f, mode="texture", model=folder))
    assert default.refiner.guidance.config.guidance_scale == 100.0  # the prior's SDS scale, not a fixed 3
    assert default.refiner.resolution == 16
    chosen = RefineMesh(RefineMeshRequest(prompt="a cup", vertices=v, faces=f, mode="texture", model=folder,
                                          guidance="vsd", guidance_scale=9.0))
    assert chosen.refiner.guidance.config.mode == "vsd" and chosen.refiner.guidance.config.guidance_scale == 9.0
