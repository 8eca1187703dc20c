"""Every diffusers adapter is sampled in its own prediction type: PriorSampler against diffusers' own loop.

Stable Diffusion against ``StableDiffusionPipeline`` on the same folder (same DDIM scheduler, latents,
guidance); Zero123 and MVDream, which diffusers ships no pipeline for, against the loop those pipelines
run (CFG on the UNet's raw output, ``DDIMScheduler.step``) over the adapter's UNet. Each for an epsilon,
a v-prediction and a zero-terminal-SNR v-prediction scheduler config: there the first step has
alpha_bar = 0, where eps is the input itself, so sampling through ``predict_noise`` cannot match.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import DDIMScheduler

from engine_server.cameras import orbit_camera
from engine_server.guidance import Conditioning, load_prior, tiny
from engine_server.guidance.prior import camera_vector
from engine_server.multiview import PriorSampler

SCHEDULES = {
    "epsilon": {"prediction_type": "epsilon"},
    "v": {"prediction_type": "v_prediction"},
    "v-zero-snr": {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                   "timestep_spacing": "trailing"},
}
"""Scheduler configs written over the tiny folders' (SD 2.1 768-v is "v"; zero-SNR models are "v-zero-snr")."""
STEPS, SCALE = 4, 3.0
CAMERAS = torch.stack([orbit_camera(a, 15.0, 2.5, 40.0, 16).c2w for a in (0.0, 90.0, 180.0, 270.0)])


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling")
    return {"sd": tiny.make_stable_diffusion(root / "sd"), "zero123": tiny.make_novel_view(root / "zero123"),
            "mvdream": tiny.make_multiview(root / "mvdream")}


def _with_schedule(folder, schedule: str, dest):
    """A copy of ``folder`` whose scheduler config is ``SCHEDULES[schedule]``."""
    shutil.copytree(folder, dest)
    path = dest / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **SCHEDULES[schedule]}))
    return dest


class EpsOnly:
    """The adapter seen through ``predict_noise`` alone, as the adapters were before ``predict_output``."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __getattr__(self, name):
        if name == "predict_output":
            raise AttributeError(name)
        return getattr(self.inner, name)


def _sample(prior, cond, cameras, noise):
    return PriorSampler(prior, STEPS, SCALE).sample(cond, cameras, noise)


def _diffusers_loop(prior, unet_call, noise: torch.Tensor) -> torch.Tensor:
    """What diffusers' pipelines do: CFG on the raw UNet output ([uncond; cond]), DDIM step, VAE decode."""
    sched = DDIMScheduler.from_pretrained(prior.source, subfolder="scheduler")
    sched.set_timesteps(STEPS)
    x = noise * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            uncond, cond = unet_call(torch.cat([x, x]), t).chunk(2)
            x = sched.step(uncond + SCALE * (cond - uncond), t, x).prev_sample
        return (prior.vae.decode(x / prior.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)


def _check(prior, cond, cameras, noise, expected, schedule) -> None:
    assert prior.prediction_type == SCHEDULES[schedule]["prediction_type"]
    ours = _sample(prior, cond, cameras, noise)
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=0)
    if schedule == "v-zero-snr":  # the test tells the two paths apart: eps-only skips the pure-noise step
        assert (_sample(EpsOnly(prior), cond, cameras, noise) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_stable_diffusion_samples_as_its_diffusers_pipeline(folders, tmp_path, schedule):
    from diffusers import StableDiffusionPipeline

    folder = _with_schedule(folders["sd"], schedule, tmp_path / "sd")
    prior = load_prior(folder)
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    noise = PriorSampler(prior, STEPS, SCALE).noise(2, torch.Generator().manual_seed(3))
    res = prior.resolution
    expected = pipe("a red cube", num_images_per_prompt=2, num_inference_steps=STEPS, guidance_scale=SCALE,
                    latents=noise, height=res, width=res, output_type="pt").images
    _check(prior, Conditioning(prompt="a red cube"), CAMERAS[:2], noise, expected, schedule)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_zero123_samples_as_diffusers_loop(folders, tmp_path, schedule):
    prior = load_prior(_with_schedule(folders["zero123"], schedule, tmp_path / "zero123"))
    cond = Conditioning(reference_image=torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1)),
                        reference_c2w=CAMERAS[0])
    cameras = CAMERAS[1:3]
    batch = prior.prepare_conditioning(cond, cameras).cfg_batch()

    def unet(x, t):
        return prior.unet(torch.cat([x, batch["reference"]], dim=1), t, encoder_hidden_states=batch["context"]).sample

    noise = PriorSampler(prior, STEPS, SCALE).noise(2, torch.Generator().manual_seed(3))
    _check(prior, cond, cameras, noise, _diffusers_loop(prior, unet, noise), schedule)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_mvdream_samples_as_diffusers_loop(folders, tmp_path, schedule):
    prior = load_prior(_with_schedule(folders["mvdream"], schedule, tmp_path / "mvdream"))
    cond = Conditioning(prompt="a red cube")
    batch = prior.prepare_conditioning(cond, CAMERAS).cfg_batch()
    labels = camera_vector(torch.cat([CAMERAS, CAMERAS]))

    def unet(x, t):
        return prior.unet(x, t, encoder_hidden_states=batch["text"], class_labels=labels).sample

    noise = PriorSampler(prior, STEPS, SCALE).noise(4, torch.Generator().manual_seed(3))
    _check(prior, cond, CAMERAS, noise, _diffusers_loop(prior, unet, noise), schedule)


def test_every_diffusers_adapter_gives_its_native_output(folders):
    """predict_output is the raw UNet output; predict_noise is it converted to eps (v here)."""
    from engine_server.guidance.prior import to_epsilon

    for name in folders:
        prior = load_prior(folders[name])
        assert callable(prior.predict_output) and prior.scheduler_config["prediction_type"] == "epsilon"
    prior = load_prior(folders["sd"])
    prior.prediction_type = "v_prediction"  # the same UNet read as a v-model: predict_noise converts
    inputs = prior.prepare_conditioning(Conditioning(prompt="a cube"), CAMERAS[:2])
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([900, 100])
    with torch.no_grad():
        raw = prior.unet(x, t, encoder_hidden_states=inputs.cond["text"]).sample
        torch.testing.assert_close(prior.predict_output(x, t, inputs.cond, CAMERAS[:2]), raw)
        torch.testing.assert_close(prior.predict_noise(x, t, inputs.cond, CAMERAS[:2]),
                                   to_epsilon(raw, x, t, prior.alphas_cumprod, "v_prediction"))
