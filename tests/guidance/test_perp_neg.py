"""Perp-Neg on a tiny random Stable Diffusion: the view plan, the guided noise computed apart, refusals."""
from __future__ import annotations

import pytest
import torch

from engine_server.cameras import orbit_camera
from engine_server.guidance import Conditioning, GuidanceConfig, ViewPromptConfig, build_guidance, load_prior
from engine_server.guidance.score import perpendicular
from engine_server.guidance.views import BACK, FRONT, OVERHEAD, SIDE, perp_neg_plan

PERP_NEG = GuidanceConfig(guidance_scale=7.5, view_prompts=ViewPromptConfig(perp_neg=True))


@pytest.fixture(scope="module")
def sd_prior(model_dir):
    return load_prior(model_dir / "sd")


def _ring(*azimuths: float, elevation: float = 15.0) -> torch.Tensor:
    return torch.stack([orbit_camera(az, elevation, 2.5, 40.0, 32).c2w for az in azimuths])


def test_the_plan_interpolates_between_neighbouring_views_with_threestudios_weights():
    plan = perp_neg_plan(torch.cat([_ring(0.0, 45.0, 90.0, 135.0, 180.0, 315.0), _ring(0.0, elevation=75.0)]))
    assert plan.positive[0][:2] == [FRONT, FRONT] and plan.positive[1][:2] == [SIDE, SIDE]
    assert plan.positive[0][3:5] == [SIDE, SIDE] and plan.positive[1][3:5] == [BACK, BACK]
    torch.testing.assert_close(plan.mix[:6], torch.tensor([1.0, 0.5, 1.0, 0.5, 0.0, 0.5]), atol=1e-4, rtol=0)
    # Fully frontal: no push away from "front", the strongest push away from "side" (4 e^-0.5 - 2.426 at r = 0).
    assert abs(float(plan.weights[0, 0])) < 1e-3
    assert float(plan.weights[0, 1]) == pytest.approx(-(4.0 - 2.426), abs=1e-4)
    # From the back: away from side and, more, from the front (1 + 0.967 against 1 - 0.606).
    assert plan.negative[0][4] == SIDE and plan.negative[1][4] == FRONT
    assert float(plan.weights[4, 1]) == pytest.approx(-1.967, abs=1e-4)
    assert float(plan.weights[4, 0]) == pytest.approx(-0.394, abs=1e-4)
    # Azimuth 315 is 45 degrees off the front, as 45 is: the same plan.
    assert float(plan.mix[5]) == pytest.approx(float(plan.mix[1]))
    torch.testing.assert_close(plan.weights[5], plan.weights[1])
    assert plan.positive[0][6] == OVERHEAD and torch.equal(plan.weights[6], torch.zeros(2))
    assert (plan.weights <= 1e-6).all()


def test_perpendicular_removes_the_part_along_the_positive_direction():
    x, y = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    p = perpendicular(x, y)
    assert (p * y).sum((1, 2, 3)).abs().max() < 1e-3
    torch.testing.assert_close(perpendicular(y * 2.0, y), torch.zeros_like(y), atol=1e-5, rtol=0)


def test_guided_noise_equals_the_formula_computed_branch_by_branch(sd_prior):
    cameras = _ring(0.0, 60.0, 150.0, 270.0)
    cond = Conditioning(prompt="a red chair", negative_prompt="blurry")
    g = build_guidance(sd_prior, PERP_NEG)
    inputs, prompts = g.prepare_inputs(cond, cameras)
    assert len(inputs.negatives) == 2 and inputs.negative_weights.shape == (4, 2)
    plan = perp_neg_plan(cameras)
    emb = {n: sd_prior.encode_prompts([f"a red chair, {n}"]) for n in (FRONT, SIDE, BACK)}
    r = float(plan.mix[1])  # 60 degrees: between front and side
    torch.testing.assert_close(inputs.cond["text"][1:2], r * emb[FRONT] + (1 - r) * emb[SIDE])
    x, t = torch.randn(4, 4, 8, 8), torch.tensor([100, 400, 700, 900])
    with torch.no_grad():
        eps_u = sd_prior.predict_noise(x, t, inputs.uncond, cameras)
        eps_c = sd_prior.predict_noise(x, t, inputs.cond, cameras)
        e_pos = eps_c - eps_u
        direction = e_pos.clone()
        for k, neg in enumerate(inputs.negatives):
            e_k = sd_prior.predict_noise(x, t, neg, cameras) - eps_u
            along = (e_k * e_pos).sum((1, 2, 3), keepdim=True) / (e_pos * e_pos).sum((1, 2, 3), keepdim=True)
            direction += inputs.negative_weights[:, k].view(-1, 1, 1, 1) * (e_k - along * e_pos)
        expected = eps_u + 7.5 * direction
        guided = g.guided_noise(x, t, inputs, cameras)
        plain = build_guidance(sd_prior, GuidanceConfig(guidance_scale=7.5)).guided_noise(
            x, t, g.prior.prepare_conditioning(cond, cameras, prompts), cameras)
    torch.testing.assert_close(guided, expected, atol=2e-4, rtol=1e-4)
    assert not torch.allclose(guided, plain, atol=1e-3)  # the negatives change the estimate


def test_a_step_with_perp_neg_gives_a_finite_gradient(sd_prior):
    images = torch.rand(4, 3, 32, 32, requires_grad=True)
    out = build_guidance(sd_prior, PERP_NEG)(images, _ring(0.0, 90.0, 180.0, 270.0),
                                             Conditioning(prompt="a lamp"), 0, 10)
    out.loss.backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_perp_neg_is_refused_for_priors_that_do_not_take_text_embeddings(model_dir):
    with pytest.raises(ValueError, match="Perp-Neg is for text-to-image priors"):
        build_guidance(load_prior(model_dir / "zero123"), PERP_NEG)
    with pytest.raises(ValueError, match="BundledPriorAdapter is a 'multiview' prior"):
        build_guidance(load_prior("bundled"), PERP_NEG)


def test_a_text_to_3d_request_with_perp_neg_distils_with_it_on_stable_diffusion(model_dir):
    from engine_server.pipelines.text_to_3d import TextTo3D, TextTo3DRequest

    request = TextTo3DRequest(prompt="a red chair", model=str(model_dir / "sd"), perp_neg=True,
                              overrides={"coarse_steps": 2, "views_per_step": 2, "render_resolution": 16})
    pipe = TextTo3D(request)
    assert pipe.guidance.config.view_prompts.perp_neg and pipe.sidecar()["perp_neg"] is True
    loss, logs = pipe.coarse_loss()
    loss.backward()
    assert torch.isfinite(loss) and logs["sds"] > 0


def test_perp_neg_on_the_wire_is_a_text_jobs_boolean_run_option():
    from engine_server.pipelines.kinds import KINDS, KindError

    run, overrides = KINDS["text"].split_options({"perp_neg": True, "coarse_steps": 5})
    assert run == {"perp_neg": True} and overrides == {"coarse_steps": 5}
    with pytest.raises(KindError, match="options.perp_neg must be true or false"):
        KINDS["text"].split_options({"perp_neg": "yes"})
    assert "perp_neg" not in KINDS["image"].run_options  # novel-view priors take no text views
