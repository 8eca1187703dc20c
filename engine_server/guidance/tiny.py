"""Randomly initialised diffusers folders of the real classes, for tests and benchmarks (no download).

Each ``make_*`` writes a folder with the same layout as the real checkpoints
(``model_index.json`` plus one sub-folder per component, via ``save_pretrained``)
so the adapters load it through their normal ``from_pretrained`` path. The CLIP
tokenizer is built from a small local vocabulary (vocab.json / merges.txt).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

logger = logging.getLogger(__name__)

WORDS = (
    "a an the of and with on in photo render dslr high quality detailed red green blue yellow white black "
    "orange purple grey wooden metal glass stone plastic shiny small large round square chair table cup vase "
    "car house tree dog cat robot cube sphere cone cylinder torus teapot lamp bottle front side back overhead "
    "view ugly blurry low"
).split()


@dataclass(frozen=True)
class TinySize:
    """Sizes of a random model: small enough for CPU tests, or large enough for honest CPU timings."""

    unet_channels: tuple[int, ...] = (32, 64)
    """UNet block widths (first block(s) cross-attention, last one plain)."""
    latent_size: int = 8
    """UNet sample size (latent pixels)."""
    vae_channels: tuple[int, ...] = (32, 32)
    """VAE block widths; the VAE downsamples by 2 ** (len - 1)."""
    context_dim: int = 32
    """Text / image embedding width (cross-attention dim)."""
    attention_head_dim: int = 8
    """Channels per attention head."""
    layers_per_block: int = 1
    """ResNet layers per UNet block."""
    text_layers: int = 2
    """CLIP transformer layers."""
    max_tokens: int = 16
    """Tokenizer / text encoder sequence length (77 in real CLIP)."""
    norm_groups: int = 32
    """GroupNorm groups in the UNet and VAE."""
    vae_layers_per_block: int = 1
    """ResNet layers per VAE encoder block (2 in Stable Diffusion's VAE)."""


TINY = TinySize()
"""Seconds-scale CPU tests."""
MEDIUM = TinySize(unet_channels=(128, 256, 256), latent_size=16, vae_channels=(32, 64), context_dim=128,
                  attention_head_dim=32, layers_per_block=1, text_layers=2, max_tokens=32)
"""A CPU-friendly size where the denoiser dominates a guidance step (benchmarks)."""
SD21 = TinySize(unet_channels=(320, 640, 1280, 1280), latent_size=64, vae_channels=(128, 256, 512, 512),
                context_dim=1024, attention_head_dim=64, layers_per_block=2, text_layers=2, max_tokens=77,
                vae_layers_per_block=2)
"""Stable Diffusion 2.1's UNet / VAE shape (random weights; a 2-layer text encoder; for benchmarks and doctor)."""


def _unet(size: TinySize, in_channels: int = 4, **extra) -> UNet2DConditionModel:
    n = len(size.unet_channels)
    down = ("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1)
    heads = tuple(max(c // size.attention_head_dim, 1) for c in size.unet_channels)
    return UNet2DConditionModel(
        sample_size=size.latent_size,
        in_channels=in_channels,
        out_channels=4,
        layers_per_block=size.layers_per_block,
        block_out_channels=size.unet_channels,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=size.context_dim,
        attention_head_dim=heads,
        norm_num_groups=size.norm_groups,
        **extra,
    )


def _vae(size: TinySize) -> AutoencoderKL:
    """A random VAE whose ``scaling_factor`` gives unit-variance latents, as SD's 0.18215 does for SD's VAE."""
    n = len(size.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=size.vae_channels,
        layers_per_block=size.vae_layers_per_block,
        latent_channels=4,
        norm_num_groups=min(size.norm_groups, min(size.vae_channels)),
        sample_size=size.latent_size * 2 ** (n - 1),
    )
    gen = torch.Generator().manual_seed(0)
    probe = torch.rand(4, 3, 16 * 2 ** (n - 1), 16 * 2 ** (n - 1), generator=gen) * 2 - 1
    with torch.no_grad():
        std = vae.encode(probe).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / max(std, 1e-6))
    return vae


def _scheduler(prediction_type: str) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        clip_sample=False,
        steps_offset=1,
    )


def write_clip_tokenizer(folder: Path, words: tuple[str, ...] = WORDS, max_tokens: int = 16) -> int:
    """A CLIP BPE tokenizer (vocab.json, merges.txt, tokenizer_config.json) knowing ``words``; returns vocab size.

    The vocabulary has CLIP's 256 byte symbols (plain and word-final), the two
    special tokens, and merges that build each word letter by letter, so any text
    tokenizes (unknown words fall apart into letters, known words into few tokens).
    """
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab.setdefault(s, len(vocab))
    for s in symbols:
        vocab.setdefault(s + "</w>", len(vocab))
    merges: list[str] = []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merged = parts[0] + parts[1]
            merge = f"{parts[0]} {parts[1]}"
            if merge not in merges:
                merges.append(merge)
                vocab.setdefault(merged, len(vocab))
            parts = [merged] + parts[2:]
    vocab.setdefault("<|startoftext|>", len(vocab))
    vocab.setdefault("<|endoftext|>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_tokens,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }))
    return len(vocab)


def _byte_symbols() -> list[str]:
    """GPT-2 / CLIP byte-to-unicode table: printable stand-ins for the 256 byte values."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def _text_encoder(size: TinySize, vocab_size: int, folder: Path, hidden_act: str = "quick_gelu"):
    """A random CLIP text encoder: OpenAI CLIP's quick_gelu (SD 1.x), or OpenCLIP's gelu (SD 2.x)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=size.context_dim,
        intermediate_size=2 * size.context_dim,
        num_hidden_layers=size.text_layers,
        num_attention_heads=max(size.context_dim // 16, 1),
        max_position_embeddings=max(size.max_tokens, 77),
        projection_dim=size.context_dim,
        hidden_act=hidden_act,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return CLIPTextModel(config)


def _write_index(folder: Path, class_name: str, components: dict[str, list], **extra) -> None:
    import diffusers

    index = {"_class_name": class_name, "_diffusers_version": diffusers.__version__, **components, **extra}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def _text_components(folder: Path, size: TinySize) -> None:
    vocab_size = write_clip_tokenizer(folder / "tokenizer", max_tokens=size.max_tokens)
    _text_encoder(size, vocab_size, folder).save_pretrained(str(folder / "text_encoder"))


def make_stable_diffusion(folder: str | Path, size: TinySize = TINY, prediction_type: str = "epsilon",
                          seed: int = 0, version: int = 1) -> Path:
    """A random Stable Diffusion folder in the published layout, as the engine fetches it from the hub.

    ``version`` 2 builds it as SD 2.x's folders are: linear attention projections in the UNet
    (``use_linear_projection``) and an OpenCLIP text encoder (gelu); 1 as SD 1.x's.

    Written by ``StableDiffusionPipeline.save_pretrained``; its ``model_index.json`` then names the
    published repos' ``feature_extractor`` (written) and ``safety_checker`` (``StableDiffusionSafetyChecker``,
    whose folder the engine never fetches nor reads, so it is not written).
    """
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    vocab_size = write_clip_tokenizer(folder / "_tok", max_tokens=size.max_tokens)
    tokenizer = CLIPTokenizer.from_pretrained(str(folder / "_tok"))
    (folder / "tokenizer").mkdir(exist_ok=True)
    for f in (folder / "_tok").iterdir():
        f.replace(folder / "tokenizer" / f.name)
    (folder / "_tok").rmdir()
    pipe = StableDiffusionPipeline(
        vae=_vae(size),
        text_encoder=_text_encoder(size, vocab_size, folder, "gelu" if version == 2 else "quick_gelu"),
        tokenizer=tokenizer,
        unet=_unet(size, use_linear_projection=version == 2),
        scheduler=_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder))
    from transformers import CLIPImageProcessor

    CLIPImageProcessor().save_pretrained(str(folder / "feature_extractor"))
    index = json.loads((folder / "model_index.json").read_text())
    index.update(feature_extractor=["transformers", "CLIPImageProcessor"],
                 safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"], requires_safety_checker=True)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def save_variant(folder: str | Path, component: str, variant: str = "fp16", keep_default: bool = False,
                 scale: float = 1.0) -> list[Path]:
    """Rewrite a component's default ``*.safetensors`` as ``<name>.<variant>.safetensors`` in fp16, as the
    published repos ship them (e.g. a UNet with only ``diffusion_pytorch_model.fp16.safetensors``).

    ``scale`` multiplies the floating-point weights (tests tell the variants apart); ``keep_default``
    leaves the default file beside the variant. Returns the written files.
    """
    from safetensors.torch import load_file, save_file

    from engine_server.guidance.prior import weight_variant

    written = []
    for path in sorted((Path(folder) / component).glob("*.safetensors")):
        if weight_variant(path.name)[0] is not None:
            continue
        state = {k: (v * scale).to(torch.float16) if v.is_floating_point() else v
                 for k, v in load_file(str(path)).items()}
        out = path.with_name(f"{path.stem}.{variant}.safetensors")
        save_file(state, str(out), metadata={"format": "pt"})
        written.append(out)
        if not keep_default:
            path.unlink()
    return written


def write_hub_cache(folder: str | Path, cache: str | Path, repo_id: str, commit: str = "0" * 40,
                    configs_only: bool = False) -> Path:
    """Copy a model folder into a Hugging Face hub cache as ``repo_id``'s snapshot ``commit``; returns it.

    The layout huggingface_hub itself writes (``models--org--name/snapshots/<commit>``, ``refs/main``),
    so the hub-id path loads it with ``HF_HUB_OFFLINE=1``. ``configs_only`` copies the ``*.json`` and
    ``*.txt`` files alone, what diffusers' single-file loading fetches of the repo it builds a checkpoint from.
    """
    import shutil

    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    weights = shutil.ignore_patterns("*.safetensors", "*.bin") if configs_only else None
    shutil.copytree(folder, snapshot, ignore=weights)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def make_multiview(folder: str | Path, size: TinySize = TINY, num_views: int = 4, prediction_type: str = "epsilon",
                   seed: int = 0) -> Path:
    """A random MVDream-style folder: SD components, UNet with a 16-d camera projection class embedding."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    _text_components(folder, size)
    _unet(size, class_embed_type="projection", projection_class_embeddings_input_dim=16).save_pretrained(
        str(folder / "unet"))
    _vae(size).save_pretrained(str(folder / "vae"))
    _scheduler(prediction_type).save_pretrained(str(folder / "scheduler"))
    _write_index(folder, "MVDreamPipeline", {
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDPMScheduler"],
    }, num_views=num_views)
    return folder


RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
"""diffusers ResnetBlock2D names -> ldm ResBlock names."""


def ldm_unet_name(key: str, layers_per_block: int, up_attention: set[int]) -> str:
    """The ldm / MVDream name of a diffusers UNet2DConditionModel parameter (camera embedding as MVDream's).

    Blocks of ``layers_per_block`` ResNets; ``up_attention`` are the up blocks with attentions (their
    upsampler sits after the attention, at index 2 of its ldm output block).
    """
    per = layers_per_block + 1
    p = key.split(".")

    def resnet(rest: list[str]) -> str:
        return ".".join([RESNET_TO_LDM.get(rest[0], rest[0]), *rest[1:]])

    if p[0] in ("time_embedding", "class_embedding"):
        head = "time_embed" if p[0] == "time_embedding" else "camera_embed"
        return f"{head}.{0 if p[1] == 'linear_1' else 2}." + ".".join(p[2:])
    simple = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    if p[0] in simple:
        return f"{simple[p[0]]}." + ".".join(p[1:])
    if p[0] == "mid_block":
        index = {("resnets", "0"): 0, ("attentions", "0"): 1, ("resnets", "1"): 2}[(p[1], p[2])]
        rest = p[3:]
        return f"middle_block.{index}." + (resnet(rest) if p[1] == "resnets" else ".".join(rest))
    block = int(p[1])
    if p[0] == "down_blocks":
        if p[2] == "downsamplers":
            return f"input_blocks.{(block + 1) * per}.0.op." + ".".join(p[5:])
        i = 1 + block * per + int(p[3])
        return f"input_blocks.{i}." + ("0." + resnet(p[4:]) if p[2] == "resnets" else "1." + ".".join(p[4:]))
    if p[2] == "upsamplers":
        return f"output_blocks.{block * per + layers_per_block}.{2 if block in up_attention else 1}.conv." + \
            ".".join(p[5:])
    i = block * per + int(p[3])
    return f"output_blocks.{i}." + ("0." + resnet(p[4:]) if p[2] == "resnets" else "1." + ".".join(p[4:]))


VAE_ATTENTION_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
"""diffusers VAE mid-block attention names -> ldm AttnBlock names (``to_out.0`` is one layer)."""


def ldm_vae_name(key: str, num_blocks: int) -> str:
    """The ldm (CompVis ``first_stage_model``) name of a diffusers AutoencoderKL parameter.

    ldm numbers the decoder's up blocks from the lowest resolution's opposite end (diffusers' up block
    ``i`` is ldm's ``up.{num_blocks - 1 - i}``) and calls the ResNet shortcut ``nin_shortcut``.
    """
    p = key.split(".")
    if p[0] in ("quant_conv", "post_quant_conv") or p[1] in ("conv_in", "conv_out"):
        return key
    coder, part, rest = p[0], p[1], p[2:]
    if part == "conv_norm_out":
        return f"{coder}.norm_out." + ".".join(rest)

    def resnet(names: list[str]) -> str:
        return ".".join(["nin_shortcut" if names[0] == "conv_shortcut" else names[0], *names[1:]])

    if part == "mid_block":
        if rest[0] == "resnets":
            return f"{coder}.mid.block_{int(rest[1]) + 1}." + resnet(rest[2:])
        tail = rest[2:] if rest[2] != "to_out" else [rest[2], *rest[4:]]  # to_out.0.weight -> proj_out.weight
        return f"{coder}.mid.attn_1.{VAE_ATTENTION_TO_LDM[tail[0]]}." + ".".join(tail[1:])
    block = int(rest[0]) if part == "down_blocks" else num_blocks - 1 - int(rest[0])
    head = f"{coder}.{'down' if part == 'down_blocks' else 'up'}.{block}"
    if rest[1] == "resnets":
        return f"{head}.block.{rest[2]}." + resnet(rest[3:])
    return f"{head}.{'downsample' if part == 'down_blocks' else 'upsample'}." + ".".join(rest[3:])


OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
"""diffusers / transformers CLIP encoder-layer names -> OpenCLIP resblock names (q/k/v are one ``in_proj``)."""


def ldm_open_clip_state(text, seed: int = 0) -> dict[str, torch.Tensor]:
    """A CLIPTextModel as SD 2.x's published checkpoints store their OpenCLIP text tower (``cond_stage_model.model.*``).

    ``token_embedding.weight``, ``positional_embedding``, ``transformer.resblocks.{i}.*`` (q, k and v stacked
    as ``attn.in_proj_weight`` / ``in_proj_bias``), ``ln_final.*``; plus what the files hold and diffusers
    skips: one more resblock (SD 2 reads the penultimate layer's output, so the diffusers encoder has one
    layer fewer), ``text_projection`` (width x width) and ``logit_scale``; random from ``seed``.
    """
    state = {k.removeprefix("text_model."): v for k, v in text.state_dict().items()}
    out = {"token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
           "positional_embedding": state.pop("embeddings.position_embedding.weight"),
           "ln_final.weight": state.pop("final_layer_norm.weight"), "ln_final.bias": state.pop("final_layer_norm.bias")}
    layers = text.config.num_hidden_layers
    for i in range(layers):
        head = f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(
                [state.pop(f"{head}self_attn.{x}_proj.{kind}") for x in "qkv"])
        for ours, theirs in OPEN_CLIP_LAYER.items():
            for kind in ("weight", "bias"):
                out[f"transformer.resblocks.{i}.{theirs}.{kind}"] = state.pop(f"{head}{ours}.{kind}")
    if state:
        raise ValueError(f"unmapped CLIP text encoder weights: {sorted(state)[:5]}")
    gen = torch.Generator().manual_seed(seed)
    last = f"transformer.resblocks.{layers - 1}."
    out.update({k.replace(last, f"transformer.resblocks.{layers}."): torch.randn(v.shape, generator=gen) * 0.02
                for k, v in list(out.items()) if k.startswith(last)})
    width = text.config.hidden_size
    out["text_projection"] = torch.randn(width, width, generator=gen) * width**-0.5
    out["logit_scale"] = torch.tensor(4.6052)
    return {f"cond_stage_model.model.{k}": v for k, v in out.items()}


def write_ldm_checkpoint(folder: str | Path, path: str | Path) -> Path:
    """A diffusers Stable Diffusion 1.x / 2.x folder as one original (CompVis / ldm) single-file checkpoint.

    The layout of the published ``v1-5-pruned*.safetensors`` and ``v2-1_512-ema-pruned.safetensors`` /
    ``v2-1_768-ema-pruned.safetensors``: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE,
    attention projections as 1x1 convolutions), the text encoder and the DDPM schedule's buffers
    (``betas``, ``alphas_cumprod`` ...). The text encoder is CLIP's ``cond_stage_model.transformer.text_model.*``
    (``position_ids`` included) for SD 1.x, OpenCLIP's ``cond_stage_model.model.*``
    (:func:`ldm_open_clip_state`) for SD 2.x, told apart by the UNet's linear attention projections (2.x).
    Nothing in the file says epsilon or v: that is the original ``.yaml``'s ``parameterization``.
    Weights as stored, default variant.
    """
    from diffusers import AutoencoderKL, DDPMScheduler
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    folder = Path(folder)
    unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet")
    vae = AutoencoderKL.from_pretrained(str(folder), subfolder="vae")
    text = CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder")
    up_attention = {i for i, t in enumerate(unet.config.up_block_types) if t.startswith("CrossAttn")}
    state = {"model.diffusion_model." + ldm_unet_name(k, unet.config.layers_per_block, up_attention): v
             for k, v in unet.state_dict().items()}
    for k, v in vae.state_dict().items():
        conv = ".mid_block.attentions." in k and k.endswith(".weight") and v.dim() == 2
        state["first_stage_model." + ldm_vae_name(k, len(vae.config.block_out_channels))] = \
            v[:, :, None, None] if conv else v
    if unet.config.use_linear_projection:
        state.update(ldm_open_clip_state(text))
    else:
        text_state = {**text.state_dict(), "embeddings.position_ids": text.embeddings.position_ids}
        state.update({f"cond_stage_model.transformer.text_model.{k}": v for k, v in text_state.items()})
    betas = DDPMScheduler.from_pretrained(str(folder), subfolder="scheduler").betas.to(torch.float32)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    previous = torch.cat([torch.ones(1), alphas_cumprod[:-1]])
    posterior_variance = betas * (1.0 - previous) / (1.0 - alphas_cumprod)
    state.update({
        "betas": betas, "alphas_cumprod": alphas_cumprod, "alphas_cumprod_prev": previous,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - alphas_cumprod).log(),
        "sqrt_recip_alphas_cumprod": alphas_cumprod.rsqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / alphas_cumprod - 1).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp_min(1e-20).log(),
        "posterior_mean_coef1": betas * previous.sqrt() / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - previous) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod),
    })
    path = Path(path)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})
    return path


def write_original_config(path: str | Path, parameterization: str | None = None) -> Path:
    """An original (CompVis) SD 2.x inference ``.yaml`` as the web UIs keep beside a checkpoint (``NAME.yaml``).

    The head of the published ``v2-inference.yaml`` (no ``parameterization``: epsilon) or, with
    ``parameterization="v"``, of ``v2-inference-v.yaml``; the UNet / VAE / text encoder sections are
    left out (the engine reads only ``model.params.parameterization``).
    """
    line = f'    parameterization: "{parameterization}"\n' if parameterization else ""
    path = Path(path)
    path.write_text(
        "model:\n  base_learning_rate: 1.0e-4\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n"
        f"{line}    linear_start: 0.00085\n    linear_end: 0.0120\n    num_timesteps_cond: 1\n"
        "    log_every_t: 200\n    timesteps: 1000\n    first_stage_key: \"jpg\"\n    cond_stage_key: \"txt\"\n"
        "    image_size: 64\n    channels: 4\n    cond_stage_trainable: false\n    conditioning_key: crossattn\n"
        "    monitor: val/loss_simple_ema\n    scale_factor: 0.18215\n    use_ema: False\n"
        "    cond_stage_config:\n      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder\n"
        "      params:\n        freeze: True\n        layer: \"penultimate\"\n")
    return path


def make_mvdream_published(folder: str | Path, size: TinySize = TINY,
                           seed: int = 0) -> tuple[Path, UNet2DConditionModel]:
    """A random MVDream folder in the published diffusers layout (``ashawkey/mvdream-sd2.1-diffusers``).

    ``unet/`` is MVDream's ``MultiViewUNetModel``: its own config keys and ldm-style weight names
    (``input_blocks``, ``middle_block``, ``output_blocks``, ``time_embed``, ``camera_embed``); the
    scheduler a DDIM config. Returns the folder and the diffusers UNet its weights came from.
    """
    from diffusers import DDIMScheduler
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    _text_components(folder, size)
    unet = _unet(size, class_embed_type="projection", projection_class_embeddings_input_dim=16,
                 use_linear_projection=True)
    up_attention = {i for i, t in enumerate(unet.config.up_block_types) if t.startswith("CrossAttn")}
    state = {ldm_unet_name(k, size.layers_per_block, up_attention): v.contiguous()
             for k, v in unet.state_dict().items()}
    (folder / "unet").mkdir()
    save_file(state, str(folder / "unet" / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    n = len(size.unet_channels)
    (folder / "unet" / "config.json").write_text(json.dumps({
        "_class_name": "MultiViewUNetModel", "image_size": size.latent_size, "in_channels": 4, "out_channels": 4,
        "model_channels": size.unet_channels[0],
        "channel_mult": [c // size.unet_channels[0] for c in size.unet_channels],
        "attention_resolutions": [2**i for i in range(n - 1)], "num_res_blocks": size.layers_per_block,
        "num_head_channels": size.attention_head_dim, "transformer_depth": 1, "context_dim": size.context_dim,
        "use_checkpoint": False, "camera_dim": 16,
    }, indent=2))
    _vae(size).save_pretrained(str(folder / "vae"))
    DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  clip_sample=False, set_alpha_to_one=False, steps_offset=1).save_pretrained(str(folder / "scheduler"))
    _write_index(folder, "MVDreamPipeline", {
        "unet": ["mv_unet", "MultiViewUNetModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
    }, requires_safety_checker=False)
    return folder, unet


def make_novel_view(folder: str | Path, size: TinySize = TINY, projection_component: str = "clip_camera_projection",
                    prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """A random Zero123-layout folder (8-channel UNet, CLIP vision encoder, camera projection)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from engine_server.guidance.adapters.novel_view import CameraProjection

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    image_size = 32
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=size.context_dim, intermediate_size=2 * size.context_dim, num_hidden_layers=size.text_layers,
        num_attention_heads=max(size.context_dim // 16, 1), image_size=image_size, patch_size=8,
        projection_dim=size.context_dim,
    ))
    vision.save_pretrained(str(folder / "image_encoder"))
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
                       ).save_pretrained(str(folder / "feature_extractor"))
    _unet(size, in_channels=8).save_pretrained(str(folder / "unet"))
    _vae(size).save_pretrained(str(folder / "vae"))
    _scheduler(prediction_type).save_pretrained(str(folder / "scheduler"))
    CameraProjection(embedding_dim=size.context_dim).save_pretrained(str(folder / projection_component))
    if projection_component == "cc_projection":  # the community pipeline's layout names its layer "projection"
        from safetensors.torch import load_file, save_file

        path = next((folder / projection_component).glob("*.safetensors"))
        state = {k.replace("proj.", "projection."): v for k, v in load_file(str(path)).items()}
        save_file(state, str(path))
    _write_index(folder, "Zero123Pipeline", {
        "vae": ["diffusers", "AutoencoderKL"],
        "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        projection_component: ["zero123", "CLIPCameraProjection"],
        "safety_checker": [None, None],
    }, requires_safety_checker=False)
    return folder


BUILDERS = {"stable-diffusion": make_stable_diffusion, "novel-view": make_novel_view, "multi-view": make_multiview}
"""Random folder builders by adapter name."""
