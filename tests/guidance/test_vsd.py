"""Variational score distillation: the camera-conditioned LoRA (peft via unet.add_adapter) and its update."""
from __future__ import annotations

import pytest
import torch

from engine_server.guidance import (
    Conditioning,
    GuidanceConfig,
    VariationalScoreDistillation,
    VSDConfig,
    build_guidance,
    load_prior,
)


def _cond(cameras):
    return Conditioning(prompt="a green glass bottle", reference_image=torch.rand(3, 32, 32),
                        reference_c2w=cameras[0])


@pytest.mark.parametrize("name", ["sd", "zero123", "mvdream"])
def test_lora_starts_equal_to_the_prior(model_dir, cameras, name):
    """Zero-initialised LoRA B and camera MLP: the VSD model's estimate is the prior's conditional one."""
    prior = load_prior(model_dir / name)
    g = build_guidance(prior, GuidanceConfig(mode="vsd", guidance_scale=7.5))
    assert isinstance(g, VariationalScoreDistillation)
    inputs, _ = g.prepare_inputs(_cond(cameras), cameras)
    x = torch.randn(4, 4, 8, 8)
    t = torch.full((4,), 600)
    with torch.no_grad():
        base = prior.predict_noise(x, t, inputs.cond, cameras)
        lora = g.target_noise(x, t, None, inputs, cameras)
    torch.testing.assert_close(lora, base, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["sd", "mvdream"])
def test_lora_update_changes_lora_and_camera_embedding_but_not_the_base(model_dir, cameras, name):
    prior = load_prior(model_dir / name)
    g = build_guidance(prior, GuidanceConfig(mode="vsd", vsd=VSDConfig(lora_rank=4, lora_lr=1e-2)))
    lora_names = {n for n, p in prior.unet.named_parameters() if "lora_" in n}
    assert lora_names, "peft adapters were not injected"
    base_before = {n: p.detach().clone() for n, p in prior.unet.named_parameters() if n not in lora_names}
    lora_before = [p.detach().clone() for p in g.lora_parameters()]
    inputs, _ = g.prepare_inputs(_cond(cameras), cameras)
    x = torch.randn(4, 4, 8, 8)
    t = torch.full((4,), 400)
    with torch.no_grad():
        base_pred = prior.predict_noise(x, t, inputs.cond, cameras)

    images = torch.rand(4, 3, 32, 32, requires_grad=True)
    out = g(images, cameras, _cond(cameras), 0, 10)
    out.loss.backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert out.extras["lora_loss"] > 0

    changed = [not torch.equal(a, p.detach()) for a, p in zip(lora_before, g.lora_parameters())]
    assert any(changed)
    cam_params = list(g.camera_embedding.parameters())
    assert any(not torch.equal(a, p.detach()) for a, p in zip(lora_before[-len(cam_params):], cam_params))
    for n, p in prior.unet.named_parameters():
        if n in base_before:
            assert torch.equal(base_before[n], p.detach()), f"base weight {n} changed"
    assert all(not p.requires_grad for n, p in prior.unet.named_parameters() if n not in lora_names)
    with torch.no_grad():  # outside the LoRA context the prior is untouched
        torch.testing.assert_close(prior.predict_noise(x, t, inputs.cond, cameras), base_pred)
        lora_pred = g.target_noise(x, t, None, inputs, cameras)
    assert (lora_pred - base_pred).abs().max() > 1e-5  # ... and the VSD model has moved away from it


def test_lora_update_descends_its_denoising_loss(model_dir, cameras):
    """Repeated LoRA updates on one fixed batch (same t and noise each time) lower its loss on that batch."""
    prior = load_prior(model_dir / "sd")
    g = build_guidance(prior, GuidanceConfig(mode="vsd", vsd=VSDConfig(lora_rank=8, lora_lr=1e-2,
                                                                       camera_dropout=0.0)))
    inputs, _ = g.prepare_inputs(_cond(cameras), cameras)
    with torch.no_grad():
        z = prior.encode_images(torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(2)))
    losses = []
    for _ in range(12):
        g.generator.manual_seed(5)  # the same (t, noise) draw every update
        losses.append(g.update_lora(z, cameras, inputs))
    assert losses[-1] < 0.95 * losses[0], losses
    assert all(b < a for a, b in zip(losses[:4], losses[1:5]))


def test_a_second_vsd_on_the_same_prior_replaces_the_first(model_dir, cameras):
    prior = load_prior(model_dir / "sd")
    build_guidance(prior, GuidanceConfig(mode="vsd"))
    g2 = build_guidance(prior, GuidanceConfig(mode="vsd", vsd=VSDConfig(camera_condition=False)))
    assert g2.camera_embedding is None
    out = g2(torch.rand(4, 3, 16, 16, requires_grad=True), cameras, _cond(cameras), 0, 10)
    assert torch.isfinite(out.loss)


def test_vsd_on_a_half_precision_prior_trains_an_fp32_lora(model_dir, cameras):
    """As on CUDA: the prior in fp16, the LoRA and camera embedding in fp32, gradients finite."""
    prior = load_prior(model_dir / "mvdream", dtype=torch.float16)
    g = build_guidance(prior, GuidanceConfig(mode="vsd"))
    assert all(p.dtype == torch.float32 for p in g.lora_parameters())
    assert prior.unet.conv_in.weight.dtype == torch.float16
    images = torch.rand(4, 3, 32, 32, requires_grad=True)
    out = g(images, cameras, _cond(cameras), 0, 10)
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert out.extras["lora_loss"] == out.extras["lora_loss"]  # not NaN
