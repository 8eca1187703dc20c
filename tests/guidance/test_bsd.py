"""Bootstrapped score distillation (issue 25): the prior's fine-tuned copy and the renders' LoRA on one network.

On the real bundled prior (its image mode is the novel-view prior; peft injects both adapters into its
plain network) and a tiny Zero123 folder of the published layout (the same interface).
"""
from __future__ import annotations

import pytest
import torch

from engine_server.cameras import look_at, orbit_camera, orbit_position
from engine_server.guidance import Conditioning, GuidanceConfig, build_guidance, load_prior
from engine_server.guidance.bsd import BootstrappedScoreDistillation, BSDConfig


def _cond(size: int = 32) -> Conditioning:
    gen = torch.Generator().manual_seed(3)
    return Conditioning(prompt="a red cube", reference_image=torch.rand(3, size, size, generator=gen),
                        reference_c2w=look_at(orbit_position(0.0, 15.0, 2.5)), fov_y_deg=42.0)


def _cameras() -> torch.Tensor:
    return torch.stack([orbit_camera(az, 20.0, 2.5, 42.0, 32).c2w for az in (0.0, 90.0, 180.0, 270.0)])


def _renders(seed: int = 0) -> torch.Tensor:
    """Four blurry red blobs on the bundled prior's background: what a coarse fit renders."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    blob = torch.exp(-(xx**2 + yy**2) / 0.3)[None]
    background = torch.tensor([0.2, 0.8, 0.8])[:, None, None]
    red = torch.tensor([0.8, 0.1, 0.1])[:, None, None]
    image = blob * red + (1 - blob) * background
    noise = 0.05 * torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return (image[None] + noise).clamp(0, 1)


def _bsd(prior, **bsd) -> BootstrappedScoreDistillation:
    return BootstrappedScoreDistillation(prior, GuidanceConfig(mode="vsd", guidance_scale=3.0, seed=1),
                                         BSDConfig(**bsd))


def test_the_fine_tuned_copy_moves_towards_the_bootstrapped_renders_and_the_prior_stays():
    prior = load_prior("bundled")
    g = _bsd(prior, finetune_steps=12)
    cams, cond = _cameras(), _cond()
    inputs, _ = g.prepare_inputs(cond, cams)
    t = torch.full((4,), 400)
    noise = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    latents = prior.encode_images(_renders())
    with torch.no_grad():
        base = prior.predict_noise(latents, t, inputs.cond, cams)
        copy_before = g.denoising_loss(latents, cams, inputs, t, noise)
        prior_loss = torch.nn.functional.mse_loss(prior.predict_noise(g.add_noise(latents, noise, t), t, inputs.cond,
                                                                      cams), noise)
    torch.testing.assert_close(copy_before, prior_loss)  # the copy starts as the prior (LoRA B = 0)

    logs = g.bootstrap(_renders(), cams, cond, step=0, total_steps=100)
    assert logs["t_prime"] == pytest.approx(0.6)
    views = g.last_views
    assert views.shape == latents.shape and (views - latents).abs().mean() > 0.01  # denoised, not the renders
    with torch.no_grad():
        before = torch.nn.functional.mse_loss(prior.predict_noise(g.add_noise(views, noise, t), t, inputs.cond, cams),
                                              noise)
        after = g.denoising_loss(views, cams, inputs, t, noise)
        # Outside the copy's block the network is the prior, untouched.
        torch.testing.assert_close(prior.predict_noise(latents, t, inputs.cond, cams), base)
    assert float(after) < 0.9 * float(before), (float(before), float(after))


def test_t_prime_shrinks_over_the_stage_and_rounds_start_every_round_steps():
    c = BSDConfig(t_start=0.6, t_end=0.3, round_steps=25)
    assert c.t_prime(0, 100) == pytest.approx(0.6) and c.t_prime(99, 100) == pytest.approx(0.3)
    assert c.t_prime(50, 100) < c.t_prime(25, 100) < 0.6
    assert [s for s in range(100) if c.bootstraps_at(s)] == [0, 25, 50, 75]
    for kwargs, message in [({"t_start": 0.3, "t_end": 0.6}, "0 < t_end <= t_start < 1"),
                            ({"t_start": 1.0}, "0 < t_end <= t_start < 1"),
                            ({"finetune_steps": 0}, "finetune_steps must be >= 1"),
                            ({"finetune_timesteps": (0.5, 0.2)}, "finetune_timesteps must satisfy")]:
        with pytest.raises(ValueError, match=message):
            BSDConfig(**kwargs)


def test_the_bsd_gradient_is_vsds_until_the_copy_is_fine_tuned_then_differs():
    """Same seed, same renders: BSD's first gradient is plain VSD's (the copy starts as the prior); after a
    bootstrap the fine-tuned copy's score replaces the prior's and the gradient changes."""
    cams, cond = _cameras(), _cond()

    def grad(g) -> torch.Tensor:
        images = _renders(1).requires_grad_(True)
        g(images, cams, cond, 10, 100).loss.backward()
        return images.grad

    vsd = build_guidance(load_prior("bundled"), GuidanceConfig(mode="vsd", guidance_scale=3.0, seed=1))
    bsd = _bsd(load_prior("bundled"), finetune_steps=12)
    torch.testing.assert_close(grad(bsd), grad(vsd), atol=1e-5, rtol=1e-4)
    bsd.bootstrap(_renders(), cams, cond, step=0, total_steps=100)
    bsd.generator.set_state(vsd.generator.get_state())  # the same t and noise for both
    g_bsd, g_vsd = grad(bsd), grad(vsd)
    assert (g_bsd - g_vsd).norm() > 0.05 * g_vsd.norm(), (float((g_bsd - g_vsd).norm()), float(g_vsd.norm()))


def test_the_renders_lora_trains_its_peft_weights_on_the_bundled_network():
    """VSD's LoRA learns the renders (its weights move, not only a camera embedding): BSD's target depends on it."""
    prior = load_prior("bundled")
    g = _bsd(prior)
    lora_b = [p for n, p in prior.network.named_parameters() if "lora_B.vsd_lora" in n]
    assert lora_b and all(float(p.abs().sum()) == 0 for p in lora_b)
    images = _renders().requires_grad_(True)
    out = g(images, _cameras(), _cond(), 0, 100)
    assert out.extras["lora_loss"] > 0
    assert any(float(p.abs().sum()) > 0 for p in lora_b)
    assert not any(p.requires_grad for n, p in prior.network.named_parameters() if "lora_" not in n)


def test_a_checkpointed_state_restores_both_adapters_exactly():
    cams, cond = _cameras(), _cond()
    g = _bsd(load_prior("bundled"), finetune_steps=2)
    g.bootstrap(_renders(), cams, cond, 0, 10)
    g(_renders().requires_grad_(True), cams, cond, 0, 10)
    state = g.state_dict()
    other = _bsd(load_prior("bundled"), finetune_steps=2)
    other.load_state_dict(state)
    for a, b in zip(g.lora_parameters() + g.dreambooth_parameters(),
                    other.lora_parameters() + other.dreambooth_parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="adapter tensors"):
        other.load_state_dict({**state, "dreambooth": state["dreambooth"][:-1]})


def test_published_novel_view_prior_bootstraps_through_the_same_interface(model_dir):
    """A Zero123-layout folder: both adapters go on its diffusers UNet (add_adapter), one step and a bootstrap run."""
    prior = load_prior(model_dir / "zero123")
    g = _bsd(prior, finetune_steps=2, restore_steps=2)
    cams, cond = _cameras(), _cond()
    before = [p.detach().clone() for p in g.dreambooth_parameters()]
    logs = g.bootstrap(_renders(), cams, cond, 50, 100)
    assert logs["t_prime"] == pytest.approx(0.6 - 0.3 * 50 / 99, abs=1e-4)
    assert any(not torch.equal(a, p) for a, p in zip(before, g.dreambooth_parameters()))
    images = _renders().requires_grad_(True)
    g(images, cams, cond, 0, 10).loss.backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert {"vsd_lora", "bsd_dreambooth"} <= set(prior.unet.peft_config)


def test_a_second_job_on_the_same_prior_starts_from_fresh_adapters():
    """The server keeps one prior for every job: a new BSD guidance replaces the last one's adapters."""
    prior = load_prior("bundled")
    cams, cond = _cameras(), _cond()
    first = _bsd(prior, finetune_steps=2)
    first.bootstrap(_renders(), cams, cond, 0, 10)
    second = _bsd(prior, finetune_steps=2)
    assert all(float(p.abs().sum()) == 0 for n, p in prior.network.named_parameters() if "lora_B" in n)
    assert len(second.dreambooth_parameters()) == len(first.dreambooth_parameters())
    second.bootstrap(_renders(), cams, cond, 0, 10)
