"""Bootstrapped score distillation (BSD, DreamCraft3D): the object and a fine-tuned copy of its prior improve in turn.

At the start of every round (:attr:`BSDConfig.round_steps` steps of the stage):
  (a) bootstrap  renders of the object all around are noised to t' and denoised by the fine-tuned prior
                 (deterministic DDIM, ``restore_steps`` steps): the bootstrapped views, the renders pulled
                 towards the prior's images where they are blurry or off; the prior's copy is then fine-tuned
                 on them (DreamBooth-style: its denoising loss, each view with its own camera as the
                 condition; the novel-view prior's condition is the reference view + the relative camera,
                 as it was trained) for ``finetune_steps`` steps;
and at every step
  (b) distil     VSD of the object whose "real" score is the fine-tuned prior's and whose target is the
                 renders' own LoRA (ProlificDreamer's, :class:`VariationalScoreDistillation`):
                 grad = w(t) (eps_DreamBooth - eps_LoRA).
t' goes linearly from ``t_start`` to ``t_end`` (fractions of T) over the stage: large while the renders are
poor (the prior repaints much), smaller as they improve (it keeps more of them).

The fine-tuned copy is a LoRA on the prior's denoiser (attention projections and ResNet convolutions), not a
full copy: a copy of a published UNet (0.9-2.6 B parameters) with its Adam moments is what a GPU cannot spare
beside the renderer, while the LoRA is a few MB sharing the base weights with the renders' LoRA. The same
code serves the bundled model (peft injects the adapter into its plain network), where a full copy would
have been affordable but would be a second code path.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine_server.guidance.config import Conditioning, GuidanceConfig
from engine_server.guidance.prior import Prior, PriorInputs
from engine_server.guidance.score import VariationalScoreDistillation, attach_lora, lora_network, use_adapter

logger = logging.getLogger(__name__)


@dataclass
class BSDConfig:
    """The bootstrapping of :class:`BootstrappedScoreDistillation`."""

    t_start: float = 0.6
    """t' at the start of the stage, as a fraction of the training timesteps (DreamCraft3D: large)."""
    t_end: float = 0.3
    """t' at the end of the stage (smaller: the renders have improved)."""
    round_steps: int = 25
    """Stage steps between two bootstraps (a bootstrap at step 0, then every ``round_steps``)."""
    views: int = 4
    """Renders bootstrapped per round, all around the object."""
    finetune_steps: int = 8
    """Fine-tuning steps of the prior's copy per round (each on all of the round's views)."""
    restore_steps: int = 4
    """DDIM steps from t' to 0 when denoising the noised renders."""
    lora_rank: int = 8
    """Rank of the fine-tuned copy's LoRA."""
    lora_target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")
    """Sub-layers of the denoiser that get the fine-tuned copy's adapter (attention and ResNet convolutions)."""
    lr: float = 1e-3
    """Learning rate of the fine-tuning (AdamW)."""
    finetune_timesteps: tuple[float, float] = (0.02, 0.98)
    """Range of t (fractions of T) of the fine-tuning's denoising loss."""

    def __post_init__(self) -> None:
        if not 0.0 < self.t_end <= self.t_start < 1.0:
            raise ValueError(f"BSD's t' schedule needs 0 < t_end <= t_start < 1 (fractions of the timesteps; t' "
                             f"shrinks as the renders improve), got t_start={self.t_start}, t_end={self.t_end}")
        for name in ("round_steps", "views", "finetune_steps", "restore_steps", "lora_rank"):
            if getattr(self, name) < 1:
                raise ValueError(f"BSDConfig.{name} must be >= 1, got {getattr(self, name)}")
        lo, hi = self.finetune_timesteps
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"BSDConfig.finetune_timesteps must satisfy 0 <= low < high <= 1, got {(lo, hi)}")

    def t_prime(self, step: int, total_steps: int) -> float:
        """t' (fraction of T) at ``step`` of ``total_steps``: linear from ``t_start`` to ``t_end``."""
        p = min(max(step / max(total_steps - 1, 1), 0.0), 1.0)
        return self.t_start + p * (self.t_end - self.t_start)

    def bootstraps_at(self, step: int) -> bool:
        """Whether the round that starts at ``step`` bootstraps (fine-tunes) before its distillation step."""
        return step % self.round_steps == 0


class BootstrappedScoreDistillation(VariationalScoreDistillation):
    """VSD whose "real" score is a fine-tuned copy of the prior (a LoRA, ``adapter_name`` "bsd_dreambooth"),
    fine-tuned by :meth:`bootstrap` on the object's own bootstrapped views.

    Called like any guidance, ``guidance(images, cameras, cond, step, total_steps)``; the stage calls
    :meth:`bootstrap` with renders all around at the rounds' starts (:meth:`BSDConfig.bootstraps_at`).
    """

    dreambooth_adapter = "bsd_dreambooth"

    def __init__(self, prior: Prior, config: GuidanceConfig | None = None, bsd: BSDConfig | None = None) -> None:
        from peft import LoraConfig

        self.bsd = bsd or BSDConfig()
        network = lora_network(prior)  # a prior without one fails here, before the renders' LoRA is made
        super().__init__(prior, config)
        self._db_layers, self._db_params = attach_lora(network, self.dreambooth_adapter, LoraConfig(
            r=self.bsd.lora_rank, lora_alpha=self.bsd.lora_rank, init_lora_weights="gaussian",
            target_modules=list(self.bsd.lora_target_modules)))
        self._lora_layers = self._db_layers  # every adapter layer, so the renders' LoRA switches the copy's off
        self._db_on = False
        self.dreambooth_optimizer = torch.optim.AdamW(self._db_params, lr=self.bsd.lr, weight_decay=0.0)
        self.last_views: torch.Tensor | None = None
        """The latest bootstrapped views, latents (N, C, h, w) (previews, tests)."""

    def dreambooth_parameters(self) -> list[torch.nn.Parameter]:
        """The fine-tuned copy's trainable parameters (its LoRA)."""
        return list(self._db_params)

    @contextlib.contextmanager
    def dreambooth_active(self):
        """Within the block the prior runs as its fine-tuned copy (blocks may nest)."""
        if self._db_on:
            yield
            return
        use_adapter(self._db_layers, self.dreambooth_adapter)
        self._db_on = True
        try:
            yield
        finally:
            self._db_on = False
            use_adapter(self._db_layers, None)

    def prior_noise(self, latents_t, t, inputs, cameras) -> torch.Tensor:
        """eps_DreamBooth: the fine-tuned copy's guided estimate."""
        with self.dreambooth_active():
            return self.guided_noise(latents_t, t, inputs, cameras)

    # -- (a) bootstrap --------------------------------------------------------------------------

    def denoising_loss(self, latents: torch.Tensor, cameras: torch.Tensor, inputs: PriorInputs,
                       t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The fine-tuned copy's mean squared eps error on latents (N, C, h, w) noised with ``noise`` at t (N,)."""
        with self.dreambooth_active():
            pred = self.prior.predict_noise(self.add_noise(latents, noise, t), t, inputs.cond, cameras)
        return F.mse_loss(pred.float(), noise.float())

    def finetune(self, latents: torch.Tensor, cameras: torch.Tensor, inputs: PriorInputs, steps: int) -> list[float]:
        """``steps`` AdamW steps of the copy's denoising loss on latents (N, C, h, w) at cameras (N, 4, 4)."""
        T = self.prior.num_train_timesteps
        lo, hi = (int(f * T) for f in self.bsd.finetune_timesteps)
        losses = []
        for _ in range(steps):
            t = torch.randint(max(lo, 1), max(hi, lo + 2), (len(latents),), generator=self.generator,
                              device=self.device)
            noise = torch.randn(latents.shape, generator=self.generator, device=self.device, dtype=latents.dtype)
            # Backward with the adapter on: switched off, peft stops its weights' gradients.
            with torch.enable_grad(), self.dreambooth_active():
                loss = self.denoising_loss(latents, cameras, inputs, t, noise)
                self.dreambooth_optimizer.zero_grad(set_to_none=True)
                loss.backward()
            self.dreambooth_optimizer.step()
            losses.append(float(loss.detach()))
        return losses

    @torch.no_grad()
    def restore(self, latents: torch.Tensor, cameras: torch.Tensor, inputs: PriorInputs,
                t_prime: float) -> torch.Tensor:
        """Latents (N, C, h, w) noised to t' (fraction of T) and denoised by the fine-tuned copy (DDIM, eta 0,
        ``restore_steps`` steps, the guidance's classifier-free scale): the bootstrapped views."""
        acp = self.prior.alphas_cumprod.to(self.device, torch.float32)
        t0 = min(max(int(round(t_prime * (len(acp) - 1))), 1), len(acp) - 1)
        steps = torch.linspace(t0, 0, self.bsd.restore_steps + 1).round().long().tolist()
        noise = torch.randn(latents.shape, generator=self.generator, device=self.device, dtype=latents.dtype)
        x = self.add_noise(latents, noise, torch.full((len(latents),), t0, device=self.device))
        for t, prev in zip(steps[:-1], steps[1:]):
            tt = torch.full((len(latents),), t, dtype=torch.long, device=self.device)
            eps = self.prior_noise(x, tt, inputs, cameras)
            a, a_prev = acp[t], (acp[prev] if prev > 0 else torch.ones(()))
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            x = x0 if prev == 0 else a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        return x

    def bootstrap(self, images: torch.Tensor, cameras: torch.Tensor, cond: Conditioning, step: int,
                  total_steps: int) -> dict[str, float]:
        """Renders (N, 3, H, W) in [0, 1] at cameras (N, 4, 4): bootstrapped at t'(step) and the copy fine-tuned on
        them. Returns what to log: ``t_prime`` and the copy's first and last ``dreambooth_loss``."""
        self._check(images, cameras)
        cameras = cameras.to(self.device, torch.float32)
        with torch.no_grad():
            latents = self.prior.encode_images(self.to_prior_resolution(images.detach()))
        inputs, _ = self.prepare_inputs(cond, cameras)
        t_prime = self.bsd.t_prime(step, total_steps)
        views = self.restore(latents, cameras, inputs, t_prime)
        losses = self.finetune(views, cameras, inputs, self.bsd.finetune_steps)
        self.last_views = views
        return {"t_prime": round(t_prime, 4), "dreambooth_loss_first": losses[0], "dreambooth_loss": losses[-1]}

    # -- checkpoints -----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Both adapters' weights and optimizers (the stage's checkpoint)."""
        return {"lora": [p.detach().clone() for p in self._params], "lora_optimizer": self.optimizer.state_dict(),
                "dreambooth": [p.detach().clone() for p in self._db_params],
                "dreambooth_optimizer": self.dreambooth_optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Put back what :meth:`state_dict` returned."""
        with torch.no_grad():
            for params, saved in ((self._params, state["lora"]), (self._db_params, state["dreambooth"])):
                if len(params) != len(saved):
                    raise ValueError(f"the BSD checkpoint holds {len(saved)} adapter tensors, this prior has "
                                     f"{len(params)}")
                for p, s in zip(params, saved):
                    p.copy_(s)
        self.optimizer.load_state_dict(state["lora_optimizer"])
        self.dreambooth_optimizer.load_state_dict(state["dreambooth_optimizer"])
