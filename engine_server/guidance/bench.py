"""``engine-server bench guidance``: one guidance step against the bare network passes it needs.

For each adapter (random weights of the real diffusers classes, built on the fly)
and mode, the two are timed side by side in one run, interleaved, after warm-up:

- step: ``guidance(images, cameras, cond, step, total)`` plus ``loss.backward()``
  into the renders (what a pipeline pays per iteration);
- bare: the same network passes called directly on prepared inputs: the UNet
  pass(es) (CFG as one call of batch 2B; VSD adds the LoRA estimate of batch B
  and the LoRA's training forward + backward), plus the VAE encoder's forward
  and backward that a latent prior needs to get the gradient to the renders.

ratio = step / bare (medians) is the guidance's own overhead; ratio_min uses
the fastest repeats, which a busy machine disturbs less. ``unet_ms`` is the
UNet passes alone. Sizes: "tiny" (the test configs: fixed Python overhead shows),
"medium" (a CPU-friendly UNet where the denoiser dominates), and on CUDA "sd21"
(Stable Diffusion 2.1's UNet/VAE shapes at 64x64 latents, fp16, random weights).
"""
from __future__ import annotations

import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from engine_server.cameras import orbit_camera
from engine_server.guidance import tiny
from engine_server.guidance.config import Conditioning, GuidanceConfig
from engine_server.guidance.prior import load_prior
from engine_server.guidance.score import ScoreDistillation, VariationalScoreDistillation, build_guidance

logger = logging.getLogger(__name__)

ADAPTERS = ("stable-diffusion", "novel-view", "multi-view")
MODES = ("sds", "vsd")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1000.0


def _unet_kwargs(prior, emb: dict[str, Any], cameras: torch.Tensor) -> Callable[[torch.Tensor], dict]:
    """Prepared keyword arguments for a direct ``prior.unet`` call on latents x."""
    labels = prior.class_labels(cameras, cameras.shape[0])  # None unless the UNet has a camera embedding
    if "context" in emb:  # novel-view: reference latent concatenated, camera context
        ref, ctx = emb["reference"], emb["context"]
        return lambda x: {"sample": torch.cat([x, ref], dim=1), "encoder_hidden_states": ctx, "class_labels": labels}
    text = emb["text"]
    return lambda x: {"sample": x, "encoder_hidden_states": text, "class_labels": labels}


def _bare_pass(guidance: ScoreDistillation, images: torch.Tensor, cameras: torch.Tensor, cond: Conditioning,
               scale: float) -> tuple[Callable[[], None], Callable[[], None], Callable[[], None]]:
    """Closures for the bare passes a step needs: (encoder fwd+bwd, denoiser passes, both)."""
    prior = guidance.prior
    unet = prior.unet
    dtype = prior.dtype
    b = images.shape[0]
    inputs, _ = guidance.prepare_inputs(cond, cameras)
    with torch.no_grad():
        lat0 = prior.encode_images(images)
    t = torch.full((b,), 500, device=prior.device, dtype=torch.long)
    x = lat0.to(dtype)
    grad_lat = torch.randn_like(lat0)
    cfg = scale != 1.0
    kw_main = _unet_kwargs(prior, inputs.cfg_batch() if cfg else inputs.cond,
                           torch.cat([cameras, cameras]) if cfg else cameras)
    x_main = torch.cat([x, x]) if cfg else x
    t_main = torch.cat([t, t]) if cfg else t
    vsd = guidance if isinstance(guidance, VariationalScoreDistillation) else None
    if vsd is not None:
        lora_cfg = vsd.config.vsd.lora_guidance_scale != 1.0
        with vsd.lora_active():
            kw_lora = _unet_kwargs(prior, inputs.cfg_batch() if lora_cfg else inputs.cond,
                                   torch.cat([cameras, cameras]) if lora_cfg else cameras)
            kw_train = _unet_kwargs(prior, inputs.cond, cameras)

    def encoder() -> None:
        lat = prior.encode_images(images)
        lat.backward(grad_lat)

    def denoiser() -> None:
        with torch.no_grad():
            unet(timestep=t_main, return_dict=False, **kw_main(x_main))
        if vsd is None:
            return
        with vsd.lora_active():
            with torch.no_grad():
                unet(timestep=t_main if lora_cfg else t, return_dict=False, **kw_lora(x_main if lora_cfg else x))
            out = unet(timestep=t, return_dict=False, **kw_train(x))[0]
            out.float().square().mean().backward()

    def both() -> None:
        encoder()
        denoiser()

    return encoder, denoiser, both


def _measure(adapter: str, mode: str, size_name: str, size: tiny.TinySize, device: torch.device, repeat: int,
             batch: int, scale: float, folder: Path) -> dict:
    model = folder / f"{adapter}-{size_name}"
    if not (model / "model_index.json").is_file():  # built once, shared by the modes
        extra = {"version": 2} if size is tiny.SD21 else {}  # the full-size row in SD 2.1's own layout
        tiny.BUILDERS[adapter](model, size=size, **extra)
    prior = load_prior(model, device)
    guidance = build_guidance(prior, GuidanceConfig(mode=mode, guidance_scale=scale))
    res = prior.resolution
    cams = torch.stack([orbit_camera(360.0 * i / batch, 15.0, 2.5, 40.0, res).c2w for i in range(batch)]).to(device)
    ref = torch.rand(3, res, res, device=device)
    cond = Conditioning(prompt="a red wooden chair", negative_prompt="ugly, blurry", reference_image=ref,
                        reference_c2w=cams[0])
    images = torch.rand(batch, 3, res, res, device=device, requires_grad=True)

    def step() -> None:
        out = guidance(images, cams, cond, 10, 100)
        out.loss.backward()

    encoder, denoiser, bare = _bare_pass(guidance, images, cams, cond, scale)
    for _ in range(2):  # warm-up: allocator, kernels, caches
        step()
        bare()
    step_ms, bare_ms, unet_ms, enc_ms = [], [], [], []
    for _ in range(repeat):
        step_ms.append(_time(step, device))
        bare_ms.append(_time(bare, device))
        unet_ms.append(_time(denoiser, device))
        enc_ms.append(_time(encoder, device))
    step_med, bare_med = statistics.median(step_ms), statistics.median(bare_ms)
    row = {
        "adapter": adapter,
        "mode": mode,
        "size": size_name,
        "step_ms": step_med,
        "denoiser_ms": bare_med,
        "ratio": step_med / bare_med,
        "ratio_min": min(step_ms) / min(bare_ms),
        "unet_ms": statistics.median(unet_ms),
        "encoder_ms": statistics.median(enc_ms),
        "latent": f"{prior.latent_channels}x{res // prior.vae_scale_factor}",
        "device": f"{device.type} {str(prior.dtype).replace('torch.', '')}",
    }
    return row


def run(args) -> dict:
    """Rows of step_ms vs the bare passes (denoiser_ms) per adapter, mode and size."""
    repeat = max(int(getattr(args, "repeat", 5)), 1)
    batch = int(getattr(args, "batch", 4))
    scale = float(getattr(args, "guidance_scale", 7.5))
    sizes_arg = getattr(args, "sizes", None)
    adapters_arg = getattr(args, "adapters", None)
    wanted_adapters = [a.strip() for a in str(adapters_arg).split(",")] if adapters_arg else list(ADAPTERS)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes: dict[str, tiny.TinySize] = {"tiny": tiny.TINY, "medium": tiny.MEDIUM}
    notes = [
        "step_ms: one guidance call + backward into the renders; denoiser_ms: the bare network passes that "
        "step needs (UNet: CFG as one batch-2B call, VSD adds the LoRA estimate (B) and LoRA training "
        "fwd+bwd (B); VAE encoder fwd+bwd to reach the renders); ratio = step_ms / denoiser_ms (medians of "
        "interleaved repeats after 2 warm-ups), ratio_min the same from the fastest repeats (robust to a "
        "busy machine); unet_ms: the UNet passes alone.",
        f"batch {batch} views, guidance_scale {scale}, repeat {repeat}, torch threads {torch.get_num_threads()}.",
        "tiny: the test configs (fixed Python overhead is a large share); medium: UNet (128, 256, 256) at "
        f"{tiny.MEDIUM.latent_size}x{tiny.MEDIUM.latent_size} latents, where the denoiser dominates.",
    ]
    if device.type == "cuda":
        sizes["sd21"] = tiny.SD21
    else:
        notes.append("no CUDA GPU here: the full-size SD 2.1 UNet row (64x64 latents, fp16) was skipped.")
    if sizes_arg:
        wanted = [s.strip() for s in str(sizes_arg).split(",") if s.strip()]
        sizes = {k: v for k, v in sizes.items() if k in wanted}
    rows = []
    with tempfile.TemporaryDirectory(prefix="guidance-bench-") as tmp:
        for size_name, size in sizes.items():
            adapters = ADAPTERS if size_name != "sd21" else ("stable-diffusion",)
            for adapter in (a for a in adapters if a in wanted_adapters):
                for mode in MODES:
                    logger.info("bench guidance: %s %s %s", adapter, mode, size_name)
                    rows.append(_measure(adapter, mode, size_name, size, device, repeat, batch, scale, Path(tmp)))
    return {"title": "guidance step vs bare denoiser passes", "rows": rows, "notes": notes}
