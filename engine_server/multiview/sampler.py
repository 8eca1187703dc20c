"""One sampler for every guidance ``Prior``: diffusers' DDIM in the prior's own prediction type and schedule.

    sampler = PriorSampler(prior, steps=20, guidance_scale=2.0)
    images = sampler.sample(cond, cameras, sampler.noise(len(cameras), generator))   # (B, 3, R, R) in [0, 1]

The scheduler is built from the prior's own scheduler config as trained (its ``scheduler_config``:
every diffusers adapter reads it from the model's ``scheduler/``, the bundled one from its
weights), so timestep spacing, zero-terminal-SNR rescaling and prediction type ("epsilon",
"v_prediction", "sample") are the ones the model learned; a prior without one gets a DDIM
schedule of its own ``alphas_cumprod``. Classifier-free guidance mixes the network's native
outputs (linear in each of the three types), from the adapter's ``predict_output(latents_t, t,
embeddings, cameras)`` (every adapter here has it, so a diffusers pipeline on the same folder
draws the same images); a prior with only ``predict_noise`` has its eps converted back. Why
native: at zero terminal SNR the first step has ᾱ = 0, where an epsilon estimate is the input
itself and says nothing of the image, while v still does (an eps-only prior skips that step).
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from diffusers import DDIMScheduler

logger = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def scheduler_for(prior) -> DDIMScheduler:
    """A DDIM scheduler on the prior's trained schedule, stepping in its ``prediction_type``."""
    config = getattr(prior, "scheduler_config", None)
    acp = prior.alphas_cumprod.detach().float().cpu()
    kind = str(prior.prediction_type)
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"cannot sample a prior predicting {kind!r}; expected one of {PREDICTION_TYPES}")
    if config is not None:
        sched = DDIMScheduler.from_config(dict(config), prediction_type=kind)
        if sched.alphas_cumprod.shape == acp.shape and torch.allclose(sched.alphas_cumprod, acp, atol=1e-5):
            return sched
        logger.warning("the scheduler config of %r does not give its alphas_cumprod; sampling its own schedule", prior)
    return _from_alphas_cumprod(acp, kind)


def _from_alphas_cumprod(acp: torch.Tensor, kind: str) -> DDIMScheduler:
    """DDIM on the betas of ``acp`` (T,); trailing spacing when the last step is pure noise (zero terminal SNR)."""
    prev = torch.cat([torch.ones(1), acp[:-1]])
    betas = (1.0 - acp / prev).clamp(0.0, 1.0)
    zero_snr = float(acp[-1]) < 1e-6
    return DDIMScheduler(num_train_timesteps=len(acp), trained_betas=betas.numpy(), prediction_type=kind,
                         clip_sample=False, timestep_spacing="trailing" if zero_snr else "leading",
                         steps_offset=0 if zero_snr else 1)


class PriorSampler:
    """Deterministic DDIM (eta 0) with classifier-free guidance on any ``Prior``."""

    def __init__(self, prior, steps: int = 20, guidance_scale: float = 2.0) -> None:
        self.prior = prior
        self.guidance_scale = guidance_scale
        self.scheduler = scheduler_for(prior)
        self.scheduler.set_timesteps(steps)
        self.native = getattr(prior, "predict_output", None)
        timesteps = [int(t) for t in self.scheduler.timesteps]
        if self.native is None and prior.prediction_type != "epsilon":
            # Only eps is available: converting it back to v / x0 divides by sqrt(ᾱ), so a step at ᾱ = 0 is skipped.
            acp = self.scheduler.alphas_cumprod
            timesteps = [t for t in timesteps if float(acp[t]) > 0.0] or timesteps[-1:]
        self.timesteps = timesteps
        probe = prior.encode_images(torch.zeros(1, 3, prior.resolution, prior.resolution, device=prior.device))
        self.latent_shape = tuple(probe.shape[1:])
        """(C, h, w) of the space the prior denoises."""

    def noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Starting noise (n, C, h, w), on the CPU so a seed gives the same draw on every device."""
        return torch.randn(n, *self.latent_shape, generator=generator) * float(self.scheduler.init_noise_sigma)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) -> images (B, 3, R, R) in [0, 1]."""
        decode = getattr(self.prior, "decode_latents", None)
        if decode is not None:
            return decode(latents)
        return ((latents + 1.0) / 2.0).clamp(0, 1)  # pixel-space prior: encode is 2x - 1

    def _output(self, x: torch.Tensor, t: torch.Tensor, embeddings: dict[str, Any], cameras: torch.Tensor):
        """The prior's native prediction (N, C, h, w); eps converted back where the adapter gives only eps."""
        if self.native is not None:
            return self.native(x, t, embeddings, cameras)
        eps = self.prior.predict_noise(x, t, embeddings, cameras)
        kind = self.prior.prediction_type
        if kind == "epsilon":
            return eps
        a = self.scheduler.alphas_cumprod.to(x.device)[t].view(-1, 1, 1, 1)
        if kind == "v_prediction":
            return (eps - (1 - a).sqrt() * x) / a.sqrt()
        return (x - (1 - a).sqrt() * eps) / a.sqrt()

    @torch.no_grad()
    def sample(self, cond, cameras: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, R, R) in [0, 1] for one ``Conditioning`` at cameras (B, 4, 4) from noise (B, C, h, w)."""
        dev = self.prior.device
        cameras = cameras.to(dev, torch.float32)
        inputs = self.prior.prepare_conditioning(cond, cameras)
        x = noise.to(dev, torch.float32)
        b, s = x.shape[0], self.guidance_scale
        for t in self.timesteps:
            tt = torch.full((b,), t, dtype=torch.long, device=dev)
            xin = self.scheduler.scale_model_input(x, t)
            if s == 1.0:
                out = self._output(xin, tt, inputs.cond, cameras)
            else:
                both = self._output(torch.cat([xin, xin]), torch.cat([tt, tt]), inputs.cfg_batch(),
                                    torch.cat([cameras, cameras]))
                uncond, cond_out = both.chunk(2)
                out = uncond + s * (cond_out - uncond)
            x = self.scheduler.step(out, t, x).prev_sample
        return self.decode(x)
