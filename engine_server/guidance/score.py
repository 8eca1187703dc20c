"""Score distillation: SDS (DreamFusion / SJC) and VSD (ProlificDreamer) over any ``Prior``.

One call scores a batch of renders and returns a surrogate loss whose gradient
w.r.t. the renders is the distillation gradient:

    x_t   = sqrt(ab_t) z + sqrt(1 - ab_t) eps            (z = prior.encode_images(renders))
    g     = w(t) (eps_hat(x_t) - eps_target)              (no backprop through the denoiser)
    loss  = 0.5 * sum((z - sg(z - g))^2)                  => d loss / d z = g

eps_hat is the classifier-free guided estimate eps_u + s (eps_c - eps_u);
eps_target is the sampled noise (SDS) or the camera-conditioned LoRA's estimate
(VSD). g goes through ``nan_to_num`` and optional clipping before the target is
formed, so a bad step never poisons the field.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine_server.guidance.config import SDS, VSD, Conditioning, GuidanceConfig
from engine_server.guidance.prior import Prior, PriorInputs
from engine_server.guidance.views import perp_neg_plan, view_prompts

logger = logging.getLogger(__name__)


@dataclass
class GuidanceOutput:
    """Result of one guidance call."""

    loss: torch.Tensor
    """Scalar surrogate loss; its gradient w.r.t. the renders is the distillation gradient."""
    grad_norm: float
    """L2 norm of the (cleaned, clipped) distillation gradient in the prior's space."""
    t: torch.Tensor
    """(B,) timesteps used, long."""
    extras: dict[str, Any] = field(default_factory=dict)
    """Diagnostics: "t_range" (low, high fractions), "lora_loss" (VSD), "prompts" (view prompts) ..."""


def timestep_weights(alphas_cumprod: torch.Tensor, weighting: str) -> torch.Tensor:
    """w(t) for every training timestep, (T,) float32."""
    ab = alphas_cumprod.to(torch.float32)
    if weighting == "sds":
        return 1.0 - ab
    if weighting == "uniform":
        return torch.ones_like(ab)
    if weighting == "fantasia3d":
        return ab.sqrt() * (1.0 - ab)
    raise ValueError(f"unknown weighting {weighting!r}")


def classifier_free_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """eps_u + s (eps_c - eps_u): s = 1 is the conditional estimate, s = 0 the unconditional one."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def perpendicular(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The part of each sample of ``x`` perpendicular to the same sample of ``y`` (batch first)."""
    dims = tuple(range(1, x.dim()))
    along = (x * y).sum(dims, keepdim=True) / (y * y).sum(dims, keepdim=True).clamp_min(1e-12)
    return x - along * y


def _mix(a: Any, b: Any, weight: torch.Tensor, prior: Prior) -> torch.Tensor:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        raise ValueError(f"Perp-Neg mixes text embeddings; {type(prior).__name__} is conditioned on "
                         f"{type(a).__name__} values")
    w = weight.to(a.device, a.dtype).view(-1, *([1] * (a.dim() - 1)))
    return w * a + (1 - w) * b


def clean_gradient(grad: torch.Tensor, clip: float | None, mode: str = "value") -> torch.Tensor:
    """NaN/inf-free gradient, clipped element-wise ("value") or per item ("norm") when ``clip`` is set."""
    grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
    if clip is None:
        return grad
    if mode == "value":
        return grad.clamp(-clip, clip)
    norms = grad.flatten(1).norm(dim=1).view(-1, *([1] * (grad.dim() - 1)))
    return grad * (clip / norms.clamp_min(clip))


class ScoreDistillation:
    """Score distillation sampling (DreamFusion / SJC) with a diffusion prior.

    ``guidance(images, cameras, cond, step, total_steps) -> GuidanceOutput``; call
    ``out.loss.backward()`` (plus your other losses) to push the distillation
    gradient into whatever produced ``images``.
    """

    mode = SDS

    def __init__(self, prior: Prior, config: GuidanceConfig | None = None) -> None:
        self.prior = prior
        self.config = config or GuidanceConfig()
        if self.config.view_prompts.perp_neg and prior.kind != "text":
            raise ValueError(f"Perp-Neg is for text-to-image priors; {type(prior).__name__} is a "
                             f"{prior.kind!r} prior")
        self.device = prior.device
        self.generator = torch.Generator(device=self.device).manual_seed(self.config.seed)
        self.weights = timestep_weights(prior.alphas_cumprod, self.config.weighting).to(self.device)
        self._sqrt_ab = prior.alphas_cumprod.sqrt().to(self.device)
        self._sqrt_1m_ab = (1.0 - prior.alphas_cumprod).sqrt().to(self.device)

    # -- pieces ---------------------------------------------------------------------------------

    def sample_timesteps(self, step: int, total_steps: int, batch: int) -> torch.Tensor:
        """(batch,) timesteps from the annealed schedule; views of one multi-view object share one."""
        group = max(int(getattr(self.prior, "views_per_sample", 1)), 1)
        if batch % group:
            raise ValueError(f"this prior denoises {group} views jointly; got a batch of {batch} renders")
        t = self.config.timesteps.sample(step, total_steps, self.prior.num_train_timesteps, batch // group,
                                         self.generator, self.device)
        return t.repeat_interleave(group)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps."""
        shape = (-1, *([1] * (latents.dim() - 1)))
        return self._sqrt_ab[t].view(shape) * latents + self._sqrt_1m_ab[t].view(shape) * noise

    def prepare_inputs(self, cond: Conditioning, cameras: torch.Tensor) -> tuple[PriorInputs, list[str] | None]:
        """The prior's conditioning for these views, with view-dependent prompts for text-only priors."""
        prompts = None
        views = self.config.view_prompts
        if self.prior.kind == "text" and views.enabled and cond.prompt is not None:
            prompts = view_prompts(cond.prompt, cameras, views)
            if views.perp_neg:
                return self._perp_neg_inputs(cond, cameras), prompts
        return self.prior.prepare_conditioning(cond, cameras, prompts), prompts

    def _perp_neg_inputs(self, cond: Conditioning, cameras: torch.Tensor) -> PriorInputs:
        """Perp-Neg's branches: the positive as a mix of two view prompts' embeddings, two negatives."""
        views = self.config.view_prompts
        plan = perp_neg_plan(cameras, views)

        def branch(names: list[str]) -> PriorInputs:
            return self.prior.prepare_conditioning(
                cond, cameras, [views.template.format(prompt=cond.prompt, view=n) for n in names])

        first, second = branch(plan.positive[0]), branch(plan.positive[1])
        mixed = {k: _mix(first.cond[k], second.cond[k], plan.mix, self.prior) for k in first.cond}
        return PriorInputs(cond=mixed, uncond=first.uncond, negatives=[branch(n).cond for n in plan.negative],
                           negative_weights=plan.weights.to(self.device))

    def guided_noise(
        self, latents_t: torch.Tensor, t: torch.Tensor, inputs: PriorInputs, cameras: torch.Tensor,
        scale: float | None = None,
    ) -> torch.Tensor:
        """Classifier-free guided eps; both branches in one denoiser call of batch 2B (one call of B when s = 1)."""
        scale = self.config.guidance_scale if scale is None else scale
        if inputs.negatives:
            return self._perp_neg_noise(latents_t, t, inputs, cameras, scale)
        if scale == 1.0:
            return self.prior.predict_noise(latents_t, t, inputs.cond, cameras)
        both = self.prior.predict_noise(
            torch.cat([latents_t, latents_t]), torch.cat([t, t]), inputs.cfg_batch(), torch.cat([cameras, cameras])
        )
        eps_uncond, eps_cond = both.chunk(2)
        return classifier_free_guidance(eps_uncond, eps_cond, scale)

    def _perp_neg_noise(self, latents_t: torch.Tensor, t: torch.Tensor, inputs: PriorInputs, cameras: torch.Tensor,
                        scale: float) -> torch.Tensor:
        """eps_u + s (e_pos + sum_k w_k perp(eps_k - eps_u, e_pos)), e_pos = eps_c - eps_u; one call of (2 + K) B."""
        n = 2 + len(inputs.negatives)
        branches = [inputs.uncond, inputs.cond, *inputs.negatives]
        batch = {k: torch.cat([b[k] for b in branches]) for k in inputs.cond}
        eps = self.prior.predict_noise(torch.cat([latents_t] * n), torch.cat([t] * n), batch, torch.cat([cameras] * n))
        eps_u, eps_c, *eps_neg = eps.chunk(n)
        e_pos = eps_c - eps_u
        direction = e_pos
        for k, e in enumerate(eps_neg):
            w = inputs.negative_weights[:, k].to(e.dtype).view(-1, *([1] * (e.dim() - 1)))
            direction = direction + w * perpendicular(e - eps_u, e_pos)
        return eps_u + scale * direction

    def prior_noise(self, latents_t: torch.Tensor, t: torch.Tensor, inputs: PriorInputs,
                    cameras: torch.Tensor) -> torch.Tensor:
        """eps_hat, the "real" score: the prior's guided estimate (BSD's is its fine-tuned copy's)."""
        return self.guided_noise(latents_t, t, inputs, cameras)

    def target_noise(
        self, latents_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, inputs: PriorInputs,
        cameras: torch.Tensor,
    ) -> torch.Tensor:
        """What eps_hat is compared with: the sampled noise (SDS)."""
        return noise

    def _check(self, images: torch.Tensor, cameras: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
        if cameras.dim() != 3 or tuple(cameras.shape[1:]) != (4, 4) or cameras.shape[0] != images.shape[0]:
            raise ValueError(
                f"cameras must be (B, 4, 4) camera-to-world, one per image; got {tuple(cameras.shape)} "
                f"for {images.shape[0]} images"
            )

    def to_prior_resolution(self, images: torch.Tensor) -> torch.Tensor:
        """Renders resized (bilinear, antialiased when shrinking) to the prior's square resolution."""
        res = int(self.prior.resolution)
        if not self.config.resize_to_prior or tuple(images.shape[-2:]) == (res, res):
            return images
        down = images.shape[-1] > res or images.shape[-2] > res
        return F.interpolate(images, size=(res, res), mode="bilinear", align_corners=False, antialias=down)

    # -- the call -------------------------------------------------------------------------------

    def __call__(
        self,
        images: torch.Tensor,
        cameras: torch.Tensor,
        cond: Conditioning,
        step: int,
        total_steps: int,
    ) -> GuidanceOutput:
        """Score renders (B, 3, H, W) in [0, 1] seen from cameras (B, 4, 4) at ``step`` of ``total_steps``."""
        self._check(images, cameras)
        cameras = cameras.to(self.device, torch.float32)
        images = torch.nan_to_num(images, nan=0.0, posinf=1.0, neginf=0.0)  # a broken render yields zero gradient there
        latents = self.prior.encode_images(self.to_prior_resolution(images))
        inputs, prompts = self.prepare_inputs(cond, cameras)
        t = self.sample_timesteps(step, total_steps, images.shape[0])
        with torch.no_grad():
            noise = torch.randn(latents.shape, generator=self.generator, device=self.device, dtype=latents.dtype)
            latents_t = self.add_noise(latents.detach(), noise, t)
            eps_hat = self.prior_noise(latents_t, t, inputs, cameras)
            eps_target = self.target_noise(latents_t, t, noise, inputs, cameras)
            w = self.weights[t].view(-1, *([1] * (latents.dim() - 1)))
            grad = clean_gradient(w * (eps_hat - eps_target), self.config.grad_clip, self.config.grad_clip_mode)
            target = latents.detach() - grad
        loss = 0.5 * (latents - target).pow(2).sum()
        extras: dict[str, Any] = {"t_range": self.config.timesteps.range_at(step, total_steps)}
        if prompts is not None:
            extras["prompts"] = prompts
        self.after_step(latents, cameras, inputs, extras)
        return GuidanceOutput(loss=loss, grad_norm=float(grad.norm()), t=t, extras=extras)

    def after_step(self, latents: torch.Tensor, cameras: torch.Tensor, inputs: PriorInputs,
                   extras: dict[str, Any]) -> None:
        """Hook for work after the gradient is formed (VSD trains its LoRA here)."""


def lora_network(prior: Prior) -> nn.Module:
    """The denoiser network LoRA adapters go on: the prior's diffusers ``unet``, else its plain ``network``
    (the bundled model's), or a ValueError naming the prior."""
    network = getattr(prior, "unet", None)
    if network is None:
        network = getattr(prior, "network", None)
    if not isinstance(network, nn.Module):
        raise ValueError(f"LoRA adapters (VSD, BSD) need a prior whose denoiser is a torch network; "
                         f"{type(prior).__name__} has none")
    return network


def attach_lora(network: nn.Module, adapter_name: str, config) -> tuple[list[nn.Module], list[nn.Parameter]]:
    """Add a peft LoRA ``config`` named ``adapter_name`` to ``network`` (diffusers' ``add_adapter`` on a diffusers
    model, peft's injection on a plain one), replacing one of that name; returns (every adapter layer of the
    network, the new adapter's parameters, fp32). All adapters are left off (see :func:`use_adapter`)."""
    from peft import inject_adapter_in_model
    from peft.tuners.tuners_utils import BaseTunerLayer

    existing = [m for m in network.modules() if isinstance(m, BaseTunerLayer) and adapter_name in m.lora_A]
    with warnings.catch_warnings():  # two adapters (VSD's and BSD's), and replacing one, are meant: peft warns of both
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
        if existing:
            logger.info("replacing the %s adapter of an earlier guidance on this prior; that guidance is now stale",
                        adapter_name)
            if hasattr(network, "delete_adapters"):  # a diffusers model also forgets the adapter's config
                network.delete_adapters(adapter_name)
            else:
                for layer in existing:
                    layer.delete_adapter(adapter_name)
                getattr(network, "peft_config", {}).pop(adapter_name, None)
        if hasattr(network, "add_adapter"):
            network.add_adapter(config, adapter_name=adapter_name)
        else:
            inject_adapter_in_model(config, network, adapter_name=adapter_name)
    layers = [m for m in network.modules() if isinstance(m, BaseTunerLayer)]
    params = [p for n, p in network.named_parameters() if "lora_" in n and f".{adapter_name}." in n]
    for p in params:
        p.data = p.data.float()  # train adapters in fp32 even when the prior runs in fp16
    use_adapter(layers, None)
    return layers, params


def use_adapter(layers: list[nn.Module], adapter_name: str | None) -> None:
    """Run ``layers`` with the one adapter ``adapter_name`` on (its weights trainable), or with none."""
    for layer in layers:
        if adapter_name is not None:
            layer.set_adapter(adapter_name)
        layer.enable_adapters(adapter_name is not None)


class CameraEmbedding(nn.Module):
    """VSD's camera conditioning of the LoRA: an MLP of the flattened camera added to the time embedding.

    Installed as the UNet's ``class_embedding`` only while the LoRA runs; when the
    UNet already has one (a multi-view prior's own camera embedding) the two add.
    The last layer starts at zero, so the LoRA model starts equal to the prior.
    """

    def __init__(self, time_embed_dim: int, original: nn.Module | None, in_features: int = 16) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_features, time_embed_dim), nn.SiLU(),
                                 nn.Linear(time_embed_dim, time_embed_dim))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)
        self.original = [original]  # a list, so the prior's own embedding is not a submodule here
        self.keep: torch.Tensor | None = None
        """(N,) 1 for views whose camera the LoRA sees, 0 for dropped ones; None: all."""

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """labels: (N, 16) flattened cameras -> (N, time_embed_dim)."""
        x = labels.to(self.mlp[0].weight.dtype)
        if self.keep is not None:
            x = x * self.keep.to(x).view(-1, 1)
        out = self.mlp(x)
        original = self.original[0]
        if original is not None:
            out = out + original(labels.to(next(original.parameters()).dtype)).to(out.dtype)
        return out


class VariationalScoreDistillation(ScoreDistillation):
    """Variational score distillation (ProlificDreamer).

    eps_target is the estimate of a LoRA of the prior's denoiser (peft, through
    diffusers' ``unet.add_adapter``, or peft's injection into a plain network such as
    the bundled model's), camera-conditioned, which learns the
    distribution of the current renders. Each call first forms the gradient,
    then trains the LoRA for ``vsd.lora_steps_per_call`` steps with its own AdamW
    on the (detached) latents of the same renders; ``extras["lora_loss"]`` reports it.
    """

    mode = VSD
    adapter_name = "vsd_lora"

    def __init__(self, prior: Prior, config: GuidanceConfig | None = None) -> None:
        super().__init__(prior, config)
        from peft import LoraConfig

        vsd = self.config.vsd
        self.unet = unet = lora_network(prior)
        self._lora_layers, lora_params = attach_lora(unet, self.adapter_name, LoraConfig(
            r=vsd.lora_rank, lora_alpha=vsd.lora_alpha or vsd.lora_rank, init_lora_weights="gaussian",
            target_modules=list(vsd.lora_target_modules)))
        self.camera_embedding: CameraEmbedding | None = None
        params = list(lora_params)
        # A diffusers UNet gets the camera through a class embedding; a network without that slot (the bundled
        # model's) is conditioned on each view's camera by the prior itself.
        if vsd.camera_condition and hasattr(unet, "class_embedding"):
            time_dim = unet.time_embedding.linear_2.out_features
            self.camera_embedding = CameraEmbedding(time_dim, unet.class_embedding).to(self.device)
            params += list(self.camera_embedding.parameters())
        self._params = params
        self.optimizer = torch.optim.AdamW(params, lr=vsd.lora_lr, weight_decay=0.0)

    def lora_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters of the VSD model: LoRA weights and the camera embedding."""
        return list(self._params)

    def _set_lora(self, enabled: bool) -> None:
        use_adapter(self._lora_layers, self.adapter_name if enabled else None)

    @contextlib.contextmanager
    def lora_active(self, keep: torch.Tensor | None = None):
        """Within the block the prior's UNet runs as the VSD model (LoRA on, camera embedding installed)."""
        original = getattr(self.unet, "class_embedding", None)
        self._set_lora(True)
        if self.camera_embedding is not None:
            self.camera_embedding.keep = keep
            self.unet.class_embedding = self.camera_embedding
        try:
            yield
        finally:
            self._set_lora(False)
            if self.camera_embedding is not None:
                self.camera_embedding.keep = None
                self.unet.class_embedding = original

    def target_noise(self, latents_t, t, noise, inputs, cameras) -> torch.Tensor:
        """The LoRA model's estimate at the same noisy latents (CFG with ``vsd.lora_guidance_scale``)."""
        with self.lora_active():
            return self.guided_noise(latents_t, t, inputs, cameras, scale=self.config.vsd.lora_guidance_scale)

    def after_step(self, latents, cameras, inputs, extras) -> None:
        """Train the LoRA on the current renders' latents."""
        steps = self.config.vsd.lora_steps_per_call
        losses = [self.update_lora(latents.detach(), cameras, inputs) for _ in range(steps)]
        extras["lora_loss"] = losses[-1] if losses else float("nan")

    def update_lora(self, latents: torch.Tensor, cameras: torch.Tensor, inputs: PriorInputs) -> float:
        """One AdamW step of the LoRA's denoising loss on latents (B, C, h, w); returns the loss."""
        vsd = self.config.vsd
        n = latents.shape[0]
        group = max(int(getattr(self.prior, "views_per_sample", 1)), 1)
        T = self.prior.num_train_timesteps
        lo = max(int(vsd.lora_timestep_range[0] * T), 0)
        hi = min(max(int(vsd.lora_timestep_range[1] * T), lo + 1), T)
        t = torch.randint(lo, hi, (n // group,), generator=self.generator, device=self.device).repeat_interleave(group)
        noise = torch.randn(latents.shape, generator=self.generator, device=self.device, dtype=latents.dtype)
        latents_t = self.add_noise(latents, noise, t)
        keep = None
        if self.camera_embedding is not None and vsd.camera_dropout > 0:
            keep = (torch.rand(n, generator=self.generator, device=self.device) >= vsd.camera_dropout).float()
        # Backward inside the block: leaving it switches the adapter off, and peft then stops its weights'
        # gradients (requires_grad False), so a backward after it would train the camera embedding alone.
        with torch.enable_grad(), self.lora_active(keep):
            pred = self.prior.predict_noise(latents_t, t, inputs.cond, cameras)
            loss = F.mse_loss(pred.float(), noise.float())
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.optimizer.step()
        return float(loss.detach())


GUIDANCE_MODES: dict[str, type[ScoreDistillation]] = {SDS: ScoreDistillation, VSD: VariationalScoreDistillation}
"""Score distillation methods by name."""


def build_guidance(prior: Prior, config: GuidanceConfig | None = None) -> ScoreDistillation:
    """The guidance named by ``config.mode`` ("sds" or "vsd") over ``prior``."""
    config = config or GuidanceConfig()
    try:
        cls = GUIDANCE_MODES[config.mode]
    except KeyError:
        raise ValueError(f"unknown guidance mode {config.mode!r}; known: {sorted(GUIDANCE_MODES)}") from None
    return cls(prior, config)
