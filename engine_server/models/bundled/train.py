"""Training of the bundled prior (``engine-server train-bundled``).

Seeded and resumable: the data generator, the noise generator, the model, the
AdamW state, the EMA weights and the loss history live in one checkpoint written
atomically (temp file + rename) every ``checkpoint_every`` steps; a new run with
the same output folder resumes from it. Each checkpoint also exports the EMA
weights as a loadable model folder (``<out>/ema``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from engine_server.models.bundled import procedural as P
from engine_server.models.bundled.model import (
    BundledModelConfig,
    BundledUNet,
    camera_features,
    make_scheduler,
    relative_features,
    save_model,
)
from engine_server.models.bundled.vocab import COLOR_NAMES, COLORS, SHAPES

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Schedule and data of one training run."""

    out_dir: str = "runs/bundled"
    """Checkpoints, data cache, EMA export and log go here."""
    seed: int = 0
    """Seed of the model init, the data sampling and the noise."""
    steps: int = 6000
    """Total optimisation steps (about 70 min on 2 idle CPU cores at 1.45 it/s; the shipped weights add 2500 steps resumed at --lr 3e-4, see MODEL_CARD.md)."""
    batch_size: int = 32
    """Images per step."""
    lr: float = 1e-3
    """AdamW peak learning rate."""
    warmup: int = 200
    """Linear warm-up steps."""
    decay_start: float = 0.75
    """Fraction of the run after which the LR decays (cosine) to 10%."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    ema_decay: float = 0.999
    """EMA decay (with 1 - (1+n)/(10+n) warm-up)."""
    views_per_shape: int = 1024
    """Rendered training cameras per shape (any colour is composed on the fly)."""
    image_cond_prob: float = 0.5
    """Fraction of rows trained in image-conditioned (reference view) mode."""
    drop_prompt: float = 0.1
    """Probability of dropping the whole prompt (text rows)."""
    drop_word: float = 0.05
    """Probability of dropping only the shape word, and separately only the colour word."""
    drop_camera: float = 0.1
    """Probability of dropping the target camera (text rows)."""
    prompt_with_image: float = 0.3
    """Probability an image-conditioned row also keeps its prompt."""
    checkpoint_every: int = 250
    """Steps between checkpoints."""
    max_minutes: float = 0.0
    """Stop (after checkpointing) once this much wall time has passed in this process; 0 = no limit."""
    threads: int = 0
    """torch CPU threads (0 = torch's default; -1 = adapt every 50 steps: 2 when the machine is otherwise idle, else 1)."""
    model: BundledModelConfig = field(default_factory=BundledModelConfig)
    """Network architecture."""
    init_from: str = ""
    """Start a new run from these weights (a model folder); parameters the folder lacks, such as a branch the
    architecture adds (``shape_camera``), start as the architecture initialises them; empty: from scratch."""
    new_lr_scale: float = 10.0
    """With ``init_from``: the learning rate of the parameters the folder lacks, as a multiple of ``lr`` (they
    start from zero beside trained ones)."""


# ---------------------------------------------------------------- data
@dataclass
class ShapeData:
    """Colour-free renders of every shape from training cameras."""

    shade: torch.Tensor
    """(S, V, 1, H, W) float16."""
    mask: torch.Tensor
    """(S, V, 1, H, W) float16."""
    c2w: torch.Tensor
    """(S, V, 4, 4) float32."""
    fov: torch.Tensor
    """(S, V) float32."""


def build_dataset(views: int, resolution: int, seed: int, cache_dir: str | Path | None = None,
                  progress: bool = True) -> ShapeData:
    """Render (or load from cache) ``views`` training cameras per shape, deterministic from ``seed``."""
    key = hashlib.sha1(json.dumps([views, resolution, seed, SHAPES, P.BACKGROUND_RGB, P.HELD_OUT_VIEWS,
                                   P.DISTANCE_RANGE, P.FOV_RANGE, P.ELEVATION_RANGE, 3]).encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"data_{key}.pt" if cache_dir else None
    if path is not None and path.is_file():
        d = torch.load(path, weights_only=True)
        return ShapeData(**d)
    gen = torch.Generator().manual_seed(seed + 1_000_003)
    shades, masks, c2ws, fovs = [], [], [], []
    from tqdm import tqdm

    for shape in tqdm(SHAPES, desc="rendering training data", disable=not progress):
        cams = P.sample_training_cameras(views, gen)
        r = P.render_shape(shape, cams.c2w, cams.fov, resolution, chunk=128)
        shades.append(r.shade.half()), masks.append(r.mask.half()), c2ws.append(cams.c2w), fovs.append(cams.fov)
    data = ShapeData(torch.stack(shades), torch.stack(masks), torch.stack(c2ws), torch.stack(fovs))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(asdict(data), tmp)
        tmp.replace(path)
    return data


def make_batch(data: ShapeData, cfg: TrainConfig, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One training batch, deterministic given the generator state."""
    b = cfg.batch_size
    S, V = data.shade.shape[:2]
    albedos = torch.tensor([COLORS[c] for c in COLOR_NAMES])
    r = lambda: torch.rand(b, generator=gen)  # noqa: E731
    s = torch.randint(0, S, (b,), generator=gen)
    v = torch.randint(0, V, (b,), generator=gen)
    vr = torch.randint(0, V, (b,), generator=gen)
    c = torch.randint(0, len(COLOR_NAMES), (b,), generator=gen)
    img_mode = r() < cfg.image_cond_prob
    u_prompt, u_shape, u_color, u_cam, u_keep = r(), r(), r(), r(), r()
    alb = albedos[c]
    target = P.compose(data.shade[s, v].float(), data.mask[s, v].float(), alb)
    ref = P.compose(data.shade[s, vr].float(), data.mask[s, vr].float(), alb)
    c2w, ref_c2w = data.c2w[s, v], data.c2w[s, vr]
    cam_feat = camera_features(c2w, data.fov[s, v])
    ref_feat = torch.cat([camera_features(ref_c2w, data.fov[s, vr]), relative_features(c2w, ref_c2w)], dim=1)
    text_prompt = u_prompt >= cfg.drop_prompt
    keep_prompt = torch.where(img_mode, u_keep < cfg.prompt_with_image, text_prompt)
    keep_shape = keep_prompt & (u_shape >= cfg.drop_word)
    keep_color = keep_prompt & (u_color >= cfg.drop_word)
    cam_present = img_mode | (u_cam >= cfg.drop_camera)
    return {
        "x0": target * 2 - 1,
        "shape_idx": torch.where(keep_shape, s, torch.full_like(s, -1)),
        "color_idx": torch.where(keep_color, c, torch.full_like(c, -1)),
        "cam_feat": cam_feat,
        "cam_present": cam_present,
        "ref_feat": ref_feat * img_mode[:, None].float(),
        "ref_present": img_mode,
        "ref_image": ref * img_mode[:, None, None, None].float(),
    }


# ---------------------------------------------------------------- training
class EMA:
    """Exponential moving average of a model's parameters and buffers."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.n = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """Blend the model's current weights into the average."""
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict:
        """For checkpoints."""
        return {"n": self.n, "decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        """From checkpoints."""
        self.n, self.decay, self.shadow = state["n"], state["decay"], state["shadow"]

    def copy_to(self, model: torch.nn.Module) -> torch.nn.Module:
        """Load the averaged weights into ``model`` and return it."""
        model.load_state_dict(self.shadow)
        return model


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Warm-up, constant, then cosine decay to 10% over the last (1 - decay_start) of the run."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    start = int(cfg.decay_start * cfg.steps)
    if step < start:
        return cfg.lr
    frac = (step - start) / max(1, cfg.steps - start)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def train(cfg: TrainConfig, resume: bool = True, progress: bool = True, data: ShapeData | None = None) -> dict:
    """Train (or resume) until cfg.steps; return {"step", "losses", "ema_dir", "seconds", "device"}."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    elif cfg.threads < 0:
        adapt_threads()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    if data is None:
        data = build_dataset(cfg.views_per_shape, cfg.model.resolution, cfg.seed, out / "cache", progress)
    cfg.model.extra = {
        **cfg.model.extra,
        "background_rgb": list(P.BACKGROUND_RGB),
        "camera": {"distance": list(P.DISTANCE_RANGE), "fov": list(P.FOV_RANGE),
                   "elevation": list(P.ELEVATION_RANGE), "default_distance": P.DEFAULT_DISTANCE,
                   "default_fov": P.DEFAULT_FOV},
    }
    torch.manual_seed(cfg.seed)
    model = BundledUNet(cfg.model).to(device)
    new: list[str] = []
    if cfg.init_from:
        new = init_weights(model, cfg.init_from, load=not (resume and ckpt_path.is_file()))
    groups = [{"params": [p for n, p in model.named_parameters() if n not in new], "scale": 1.0},
              {"params": [p for n, p in model.named_parameters() if n in new], "scale": cfg.new_lr_scale}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = EMA(model, cfg.ema_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, losses, seconds = 0, [], 0.0
    if resume and ckpt_path.is_file():
        state = torch.load(ckpt_path, weights_only=False, map_location=device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        ema.load_state_dict(state["ema"])
        gen.set_state(state["gen"])
        step, losses, seconds = state["step"], state["losses"], state.get("seconds", 0.0)
        logger.info("resumed from %s at step %d", ckpt_path, step)
    scheduler = make_scheduler(cfg.model, "ddpm")
    acp = scheduler.alphas_cumprod.to(device)
    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=step, desc="train-bundled", disable=not progress, dynamic_ncols=True)
    t_start = time.time()
    last_save = step

    def save():
        state = {"model": model.state_dict(), "opt": opt.state_dict(), "ema": ema.state_dict(), "gen": gen.get_state(),
                 "step": step, "losses": losses, "seconds": seconds + time.time() - t_start,
                 "train_config": _cfg_json(cfg), "device": str(device)}
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, ckpt_path)
        export_ema(model, ema, out / "ema", step, losses, cfg, str(device), state["seconds"])

    model.train()
    while step < cfg.steps:
        batch = {k: v.to(device) for k, v in make_batch(data, cfg, gen).items()}
        x0 = batch["x0"]
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=gen).to(device)
        a = acp[t].sqrt()[:, None, None, None]
        sgm = (1 - acp[t]).sqrt()[:, None, None, None]
        x_t = a * x0 + sgm * noise
        target = a * noise - sgm * x0  # v-prediction
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg) * g["scale"]
        cond = model.condition(batch["shape_idx"], batch["color_idx"], batch["cam_feat"], batch["cam_present"],
                               batch["ref_feat"], batch["ref_present"])
        pred = model(x_t, t, cond, batch["ref_image"], batch["ref_present"])
        loss = torch.nn.functional.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model)
        step += 1
        losses.append(float(loss.detach()))
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save()
            last_save = step
        if cfg.threads < 0 and step % 50 == 0:
            adapt_threads()
        if cfg.max_minutes and time.time() - t_start > cfg.max_minutes * 60:
            logger.info("time budget of %.1f min reached at step %d", cfg.max_minutes, step)
            break
    if last_save != step:
        save()
    bar.close()
    return {"step": step, "losses": losses, "ema_dir": str(out / "ema"), "device": str(device),
            "seconds": seconds + time.time() - t_start}


def init_weights(model: BundledUNet, folder: str | Path, load: bool = True) -> list[str]:
    """Load a model folder's weights into ``model`` (unless ``load`` is false: a resumed run has them already)
    and return the names of the parameters it lacks: only a branch the folder's architecture has not
    (``shape_camera_embed``) may be missing; those keep their initialisation."""
    from safetensors.torch import load_file

    from engine_server.models.bundled.model import WEIGHTS_NAME

    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(Path(folder) / WEIGHTS_NAME)).items()}
    missing = [k for k in model.state_dict() if k not in state]
    unexpected = [k for k in state if k not in model.state_dict()]
    wrong = [k for k in missing if not k.startswith("shape_camera_embed.")]
    if unexpected or wrong:
        raise ValueError(f"weights in {folder} do not fit this architecture: unexpected {unexpected}, missing {wrong}")
    if load:
        model.load_state_dict(state, strict=False)
        logger.info("started from %s (%d new parameter tensors)", folder, len(missing))
    return missing


def adapt_threads() -> None:
    """On a shared CPU, two threads only pay when nobody else is busy (OpenMP barriers stall otherwise)."""
    if torch.cuda.is_available() or not hasattr(os, "getloadavg"):
        return
    cores = os.cpu_count() or 1
    others = os.getloadavg()[0] - torch.get_num_threads()
    want = max(1, min(cores, int(cores - others + 0.5))) if others < cores - 0.5 else 1
    if want != torch.get_num_threads():
        logger.info("load %.1f: using %d torch thread(s)", others, want)
        torch.set_num_threads(want)


def _cfg_json(cfg: TrainConfig) -> dict:
    d = asdict(cfg)
    d["model"] = cfg.model.to_json()
    return d


def export_ema(model: BundledUNet, ema: EMA, folder: Path, step: int, losses: list[float], cfg: TrainConfig,
               device: str, seconds: float) -> None:
    """Write the EMA weights as a loadable model folder plus training_info.json."""
    tmp_model = BundledUNet(cfg.model)
    ema.copy_to(tmp_model)
    save_model(tmp_model, folder)
    tail = losses[-200:]
    info = {"step": step, "steps": cfg.steps, "batch_size": cfg.batch_size, "final_loss": sum(tail) / max(1, len(tail)),
            "device": device, "seconds": seconds, "threads": torch.get_num_threads(),
            "train_config": _cfg_json(cfg), "loss_curve": [sum(losses[i:i + 100]) / len(losses[i:i + 100])
                                                          for i in range(0, len(losses), 100)]}
    (folder / "training_info.json").write_text(json.dumps(info, indent=1) + "\n")
