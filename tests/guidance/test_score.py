"""The SDS surrogate, classifier-free guidance, weighting and gradient cleaning, on a tiny random SD."""
from __future__ import annotations

import pytest
import torch

from engine_server.guidance import (
    Conditioning,
    GuidanceConfig,
    TimestepSchedule,
    build_guidance,
    classifier_free_guidance,
    load_prior,
    timestep_weights,
)
from engine_server.guidance.score import clean_gradient


@pytest.fixture(scope="module")
def sd_prior(model_dir):
    return load_prior(model_dir / "sd")


def test_cfg_matches_direct_computation(sd_prior, cameras):
    """guided_noise batches both branches in one call; it must equal eps_u + s (eps_c - eps_u) computed apart."""
    cond = Conditioning(prompt="a red chair", negative_prompt="blurry")
    g = build_guidance(sd_prior, GuidanceConfig(guidance_scale=7.5))
    inputs, _ = g.prepare_inputs(cond, cameras)
    x = torch.randn(4, 4, 8, 8)
    t = torch.tensor([100, 400, 700, 900])
    with torch.no_grad():
        eps_c = sd_prior.predict_noise(x, t, inputs.cond, cameras)
        eps_u = sd_prior.predict_noise(x, t, inputs.uncond, cameras)
        guided = g.guided_noise(x, t, inputs, cameras)
        plain = g.guided_noise(x, t, inputs, cameras, scale=1.0)
    assert not torch.allclose(eps_c, eps_u, atol=1e-4)  # the prompt matters, so the test can fail
    torch.testing.assert_close(guided, eps_u + 7.5 * (eps_c - eps_u), atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(plain, eps_c, atol=2e-5, rtol=1e-5)
    assert not torch.allclose(guided, plain, atol=1e-3)


def test_classifier_free_guidance_formula():
    u, c = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.0])
    assert torch.equal(classifier_free_guidance(u, c, 1.0), c)
    assert torch.equal(classifier_free_guidance(u, c, 0.0), u)
    assert torch.equal(classifier_free_guidance(u, c, 4.0), torch.tensor([9.0, 6.0]))


def test_surrogate_gradient_is_the_distillation_gradient(sd_prior, cameras):
    """d loss / d latents == w(t) (eps_hat - eps), replayed from the seeded generator."""
    cfg = GuidanceConfig(guidance_scale=5.0, seed=123)
    g = build_guidance(sd_prior, cfg)
    cond = Conditioning(prompt="a blue vase")
    captured = {}
    encode = sd_prior.encode_images

    def encode_and_keep(x):
        z = encode(x)
        z.retain_grad()
        captured["z"] = z
        return z

    sd_prior.encode_images = encode_and_keep
    try:
        images = torch.rand(4, 3, 32, 32, requires_grad=True)
        out = g(images, cameras, cond, step=3, total_steps=10)
        out.loss.backward()
    finally:
        del sd_prior.encode_images
    z = captured["z"].detach()
    gen = torch.Generator().manual_seed(123)
    t = cfg.timesteps.sample(3, 10, sd_prior.num_train_timesteps, 4, gen)
    noise = torch.randn(z.shape, generator=gen)
    assert torch.equal(t, out.t)
    inputs, _ = g.prepare_inputs(cond, cameras)
    with torch.no_grad():
        eps_hat = g.guided_noise(g.add_noise(z, noise, t), t, inputs, cameras)
    w = (1 - sd_prior.alphas_cumprod[t]).view(-1, 1, 1, 1)
    expected = w * (eps_hat - noise)
    torch.testing.assert_close(captured["z"].grad, expected, atol=1e-4, rtol=1e-4)
    assert out.loss.item() == pytest.approx(0.5 * expected.pow(2).sum().item(), rel=1e-4)
    assert out.grad_norm == pytest.approx(expected.norm().item(), rel=1e-4)
    assert images.grad.shape == images.shape and torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0


def test_gradient_clipping_and_nan_cleaning(sd_prior, cameras):
    images = torch.rand(4, 3, 32, 32)
    images[0, :, :4, :4] = float("nan")  # a poisoned render must not poison the gradient
    images.requires_grad_(True)
    g = build_guidance(sd_prior, GuidanceConfig(guidance_scale=50.0, grad_clip=0.05))
    out = g(images, cameras, Conditioning(prompt="a cup"), 0, 10)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    n = 4 * 4 * 8 * 8
    assert out.grad_norm <= 0.05 * n ** 0.5 + 1e-6  # every element clamped to [-0.05, 0.05]
    assert torch.isfinite(images.grad).all()
    assert (images.grad[0, :, :4, :4] == 0).all()


def test_clean_gradient_modes():
    g = torch.tensor([[3.0, -4.0], [float("nan"), float("inf")], [0.3, 0.4]])
    v = clean_gradient(g, 1.0, "value")
    assert torch.equal(v, torch.tensor([[1.0, -1.0], [0.0, 0.0], [0.3, 0.4]]))
    n = clean_gradient(g, 1.0, "norm")
    torch.testing.assert_close(n, torch.tensor([[0.6, -0.8], [0.0, 0.0], [0.3, 0.4]]))
    assert torch.equal(clean_gradient(g[2:], None), g[2:])


def test_weightings():
    ab = torch.tensor([0.99, 0.5, 0.01])
    torch.testing.assert_close(timestep_weights(ab, "sds"), 1 - ab)
    torch.testing.assert_close(timestep_weights(ab, "uniform"), torch.ones(3))
    torch.testing.assert_close(timestep_weights(ab, "fantasia3d"), ab.sqrt() * (1 - ab))


def test_view_dependent_prompts_reach_text_priors(sd_prior, cameras):
    g = build_guidance(sd_prior, GuidanceConfig())
    out = g(torch.rand(4, 3, 32, 32), cameras, Conditioning(prompt="a lamp"), 0, 10)
    assert out.extras["prompts"] == ["a lamp, front view", "a lamp, side view", "a lamp, back view",
                                     "a lamp, side view"]
    inputs, _ = g.prepare_inputs(Conditioning(prompt="a lamp"), cameras)
    # the embeddings differ per view, and are those of the suffixed prompts
    assert not torch.allclose(inputs.cond["text"][0], inputs.cond["text"][2])
    torch.testing.assert_close(inputs.cond["text"][1:2], sd_prior.encode_prompts(["a lamp, side view"]))
    off = build_guidance(sd_prior, GuidanceConfig(view_prompts=type(g.config.view_prompts)(enabled=False)))
    inputs_off, prompts = off.prepare_inputs(Conditioning(prompt="a lamp"), cameras)
    assert prompts is None
    torch.testing.assert_close(inputs_off.cond["text"][0], inputs_off.cond["text"][2])


def test_text_embeddings_are_cached(sd_prior):
    a = sd_prior.encode_prompts(["a green cube", "a green cube"])
    b = sd_prior.encode_prompts(["a green cube", "a green cube"])
    assert a is b  # no re-encoding per call


def test_multiview_timesteps_are_shared_per_object(model_dir, cameras):
    prior = load_prior(model_dir / "mvdream")
    g = build_guidance(prior, GuidanceConfig(timesteps=TimestepSchedule(start=(0.02, 0.98), end=(0.02, 0.98))))
    t = g.sample_timesteps(0, 10, 8)
    assert torch.equal(t[:4], t[0].repeat(4)) and torch.equal(t[4:], t[4].repeat(4))
    assert t[0] != t[4]
    with pytest.raises(ValueError, match="jointly"):
        g.sample_timesteps(0, 10, 6)


def test_bad_shapes_are_refused(sd_prior, cameras):
    g = build_guidance(sd_prior, GuidanceConfig())
    with pytest.raises(ValueError, match=r"images must be \(B, 3, H, W\)"):
        g(torch.rand(4, 32, 32), cameras, Conditioning(prompt="a cup"), 0, 10)
    with pytest.raises(ValueError, match="one per image"):
        g(torch.rand(3, 3, 32, 32), cameras, Conditioning(prompt="a cup"), 0, 10)
    with pytest.raises(ValueError, match="Conditioning.prompt is required"):
        g(torch.rand(4, 3, 32, 32), cameras, Conditioning(), 0, 10)
