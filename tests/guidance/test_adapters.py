"""Each adapter loaded from a save_pretrained folder through its normal path: gradients, descent, errors."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from engine_server.cameras import orbit_camera
from engine_server.guidance import (
    Conditioning,
    GuidanceConfig,
    PriorLoadError,
    TimestepSchedule,
    build_guidance,
    load_prior,
)
from engine_server.guidance.adapters import MultiViewPrior, NovelViewPrior, StableDiffusionPrior
from engine_server.guidance.adapters.novel_view import relative_camera

ADAPTERS = {
    "sd": (StableDiffusionPrior, "text"),
    "sd-v": (StableDiffusionPrior, "text"),
    "zero123": (NovelViewPrior, "image"),
    "zero123-cc": (NovelViewPrior, "image"),
    "mvdream": (MultiViewPrior, "multiview"),
}


def _cond(cameras):
    gen = torch.Generator().manual_seed(5)
    return Conditioning(prompt="a red wooden chair", negative_prompt="blurry",
                        reference_image=torch.rand(3, 40, 40, generator=gen), reference_c2w=cameras[0])


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_one_step_gives_a_finite_gradient_of_the_render_shape(model_dir, cameras, name):
    cls, kind = ADAPTERS[name]
    prior = load_prior(model_dir / name)
    assert type(prior) is cls and prior.kind == kind
    assert prior.dtype == torch.float32 and prior.device.type == "cpu"  # fp32 on CPU
    images = torch.rand(4, 3, 24, 24, requires_grad=True)  # not the prior's size: resized inside
    out = build_guidance(prior, GuidanceConfig(guidance_scale=7.5))(images, cameras, _cond(cameras), 0, 100)
    out.loss.backward()
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert images.grad.shape == images.shape
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert out.grad_norm > 0 and out.t.shape == (4,)
    assert ((out.t >= 700) & (out.t <= 850)).all()


def _fit_denoiser(prior, guidance, cond, cameras, target, steps=40, t_range=(0.2, 0.5)):
    """Train the random UNet (both CFG branches) to denoise one target render, so its score points there.

    A random denoiser has no preferred images; after this its optimal eps is
    (x_t - sqrt(ab) z*) / sqrt(1 - ab), and SDS should pull renders' latents to z*.
    """
    unet = prior.unet
    unet.requires_grad_(True).train()
    opt = torch.optim.Adam(unet.parameters(), lr=2e-3)
    with torch.no_grad():
        z = prior.encode_images(target)
    inputs, _ = guidance.prepare_inputs(cond, cameras)
    emb = {k: torch.cat([inputs.cond[k], inputs.uncond[k]]) for k in inputs.cond}
    cams2 = torch.cat([cameras, cameras])
    gen = torch.Generator().manual_seed(3)
    T = prior.num_train_timesteps
    for _ in range(steps):
        zz = torch.cat([z, z])
        t = torch.randint(int(t_range[0] * T), int(t_range[1] * T), (2,), generator=gen).repeat_interleave(4)
        noise = torch.randn(zz.shape, generator=gen)
        pred = prior.predict_noise(guidance.add_noise(zz, noise, t), t, emb, cams2)
        loss = (pred - noise).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    unet.requires_grad_(False).eval()
    return z


def _objective(guidance, images, cond, cameras, draws):
    """The distillation objective: mean over fixed (t, eps) draws of ||w(t) (eps_hat(x_t) - eps)||^2."""
    with torch.no_grad():
        z = guidance.prior.encode_images(images)
        inputs, _ = guidance.prepare_inputs(cond, cameras)
        total = 0.0
        for t, noise in draws:
            eps = guidance.guided_noise(guidance.add_noise(z, noise, t), t, inputs, cameras)
            total += (guidance.weights[t].view(-1, 1, 1, 1) * (eps - noise)).pow(2).sum().item()
    return total / len(draws), z


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd", "zero123", "mvdream"])
def test_following_the_gradient_lowers_the_distillation_objective(model_dir, cameras, name):
    prior = load_prior(model_dir / name)
    schedule = TimestepSchedule(start=(0.2, 0.5), end=(0.2, 0.5))
    guidance = build_guidance(prior, GuidanceConfig(guidance_scale=3.0, timesteps=schedule, seed=1))
    cond = _cond(cameras)
    res = prior.resolution
    target = torch.zeros(4, 3, res, res)
    target[:, 0] = 0.9  # a red object, in every view
    z_star = _fit_denoiser(prior, guidance, cond, cameras, target)
    gen = torch.Generator().manual_seed(11)
    images = torch.rand(4, 3, res, res, generator=gen).requires_grad_(True)
    draws = []
    for _ in range(6):
        t = torch.randint(200, 500, (1,), generator=gen).repeat(4)
        draws.append((t, torch.randn(z_star.shape, generator=gen)))
    before, z0 = _objective(guidance, images, cond, cameras, draws)
    opt = torch.optim.Adam([images], lr=0.05)
    for step in range(12):
        out = guidance(images, cameras, cond, step, 12)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        with torch.no_grad():
            images.clamp_(0, 1)
    after, z1 = _objective(guidance, images, cond, cameras, draws)
    assert after < 0.8 * before, (before, after)
    assert (z1 - z_star).norm() < 0.8 * (z0 - z_star).norm()  # the latents moved toward the target


def test_v_prediction_is_converted_to_epsilon(model_dir, cameras):
    prior = load_prior(model_dir / "sd-v")
    assert prior.prediction_type == "v_prediction"
    inputs = prior.prepare_conditioning(Conditioning(prompt="a cup"), cameras)
    x = torch.randn(4, 4, 8, 8)
    t = torch.tensor([50, 300, 600, 950])
    with torch.no_grad():
        v = prior.unet(x, t, encoder_hidden_states=inputs.cond["text"]).sample
        eps = prior.predict_noise(x, t, inputs.cond, cameras)
    ab = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(eps, ab.sqrt() * v + (1 - ab).sqrt() * x)
    assert not torch.allclose(eps, v, atol=1e-3)


def test_novel_view_relative_camera_and_reference_reach_the_context(model_dir, cameras):
    rel = relative_camera(cameras, cameras[0])
    torch.testing.assert_close(rel[0], torch.tensor([0.0, 0.0, 1.0, 0.0]), atol=1e-5, rtol=0)
    torch.testing.assert_close(rel[1], torch.tensor([0.0, 1.0, 0.0, 0.0]), atol=1e-5, rtol=0)  # +90 azimuth
    torch.testing.assert_close(rel[2], torch.tensor([0.0, 0.0, -1.0, 0.0]), atol=1e-5, rtol=0)
    up = orbit_camera(0.0, 45.0, 3.0, 40.0, 32).c2w[None]
    r = relative_camera(up, cameras[0])[0]
    assert r[0].item() == pytest.approx(-torch.deg2rad(torch.tensor(30.0)).item(), abs=1e-4)  # polar delta
    assert r[3].item() == pytest.approx(0.5, abs=1e-5)  # radius 3 vs 2.5

    prior = load_prior(model_dir / "zero123")
    cond = _cond(cameras)
    inputs = prior.prepare_conditioning(cond, cameras)
    assert inputs.cond["reference"].shape == (4, 4, 8, 8)
    assert not torch.allclose(inputs.cond["context"][0], inputs.cond["context"][1])
    assert (inputs.uncond["context"] == 0).all() and (inputs.uncond["reference"] == 0).all()
    again = prior.prepare_conditioning(cond, cameras)
    torch.testing.assert_close(again.cond["context"], inputs.cond["context"])
    with pytest.raises(ValueError, match="reference_image"):
        prior.prepare_conditioning(Conditioning(prompt="a cup"), cameras)


def test_multiview_attention_is_joint_across_views(model_dir, cameras):
    prior = load_prior(model_dir / "mvdream")
    assert prior.num_views == 4 and prior.num_attention_layers > 0
    inputs = prior.prepare_conditioning(Conditioning(prompt="a cup"), cameras)
    x = torch.randn(4, 4, 8, 8)
    t = torch.full((4,), 500)
    x2 = x.clone()
    x2[3] += 1.0  # change only the last view
    with torch.no_grad():
        a = prior.predict_noise(x, t, inputs.cond, cameras)
        b = prior.predict_noise(x2, t, inputs.cond, cameras)
        prior.num_views = 1  # independent views: view 0 no longer sees view 3
        c = prior.predict_noise(x, t, inputs.cond, cameras)
        d = prior.predict_noise(x2, t, inputs.cond, cameras)
        prior.num_views = 4
        moved = cameras.clone()
        moved[0] = cameras[2]
        e = prior.predict_noise(x, t, inputs.cond, moved)
    assert (a[0] - b[0]).abs().max() > 1e-4
    torch.testing.assert_close(c[0], d[0])
    assert (a[0] - e[0]).abs().max() > 1e-4  # each view's camera reaches the denoiser
    with pytest.raises(ValueError, match="multiple of 4"):
        prior.prepare_conditioning(Conditioning(prompt="a cup"), cameras[:3])


# --------------------------------------------------------------------------- load errors


def test_missing_folder_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(PriorLoadError, match=r"no model folder at .*no-such-model.*model_index\.json"):
        load_prior(missing)


def test_folder_without_model_index_is_a_clear_error(model_dir):
    with pytest.raises(PriorLoadError, match=r"vae has no model_index\.json; expected a diffusers pipeline folder"):
        load_prior(model_dir / "sd" / "vae")


def test_pipeline_of_another_kind_is_a_clear_error(model_dir, tmp_path):
    other = tmp_path / "ddpm"
    other.mkdir()
    shutil.copytree(model_dir / "sd" / "scheduler", other / "scheduler")
    (other / "model_index.json").write_text(json.dumps({
        "_class_name": "DDPMPipeline",
        "unet": ["diffusers", "UNet2DModel"],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }))
    with pytest.raises(PriorLoadError, match=r"DDPMPipeline.*no diffusion prior.*stable-diffusion: a StableDiffusion"):
        load_prior(other)


def test_missing_component_names_the_path_and_what_was_expected(model_dir, tmp_path):
    broken = tmp_path / "sd-broken"
    shutil.copytree(model_dir / "sd", broken)
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(PriorLoadError,
                       match=r"sd-broken has no text_encoder/ folder; expected a transformers CLIPTextModel"):
        load_prior(broken)
    for f in (broken / "unet").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(PriorLoadError, match=r"sd-broken/unet holds no weights of variant default, 'fp16' .*"
                                             r"found \['config.json'\]; expected a diffusers UNet2DConditionModel"):
        load_prior(broken)


def test_wrong_unet_for_the_adapter_is_refused(model_dir, tmp_path):
    bad = tmp_path / "zero123-4ch"
    shutil.copytree(model_dir / "zero123", bad)
    shutil.rmtree(bad / "unet")
    shutil.copytree(model_dir / "sd" / "unet", bad / "unet")
    with pytest.raises(PriorLoadError, match="8 .noisy latent"):
        load_prior(bad)
    mv = tmp_path / "mvdream-raw"
    shutil.copytree(model_dir / "mvdream", mv)
    cfg = json.loads((mv / "unet" / "config.json").read_text())
    cfg["_class_name"] = "MultiViewUNetModel"
    (mv / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PriorLoadError,
                       match=r"MVDream MultiViewUNetModel config lacks \['image_size', 'model_channels'"):
        load_prior(mv)


def test_adapter_can_be_forced_by_name(model_dir):
    with pytest.raises(PriorLoadError, match="unknown prior adapter 'nope'"):
        load_prior(model_dir / "sd", adapter="nope")
    prior = load_prior(model_dir / "mvdream", adapter="stable-diffusion")  # same components, plain SD use
    assert isinstance(prior, StableDiffusionPrior)


def test_registry_picks_a_newly_registered_adapter(model_dir, tmp_path):
    from engine_server.guidance import prior as prior_module
    from engine_server.guidance import register_prior, registered_priors

    folder = tmp_path / "custom"
    shutil.copytree(model_dir / "sd", folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "MyTextPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(PriorLoadError, match="MyTextPipeline"):
        load_prior(folder)

    @register_prior("my-text", matches=lambda idx, path: idx.get("_class_name") == "MyTextPipeline")
    class MyTextPrior(StableDiffusionPrior):
        pass

    try:
        assert "my-text" in registered_priors()
        assert type(load_prior(folder)) is MyTextPrior
    finally:
        prior_module._REGISTRY.pop("my-text")


def test_multiview_priors_train_on_rings_of_their_own_view_count(model_dir):
    from engine_server.guidance import prior_defaults

    prior = load_prior(model_dir / "mvdream")
    assert prior_defaults(prior).camera_ranges["ring"] == prior.num_views == 4
    prior.num_views = 2
    assert prior_defaults(prior).camera_ranges["ring"] == 2
    assert prior_defaults(prior).guidance_scale["sds"] == 50.0  # the rest stays MVDream's
