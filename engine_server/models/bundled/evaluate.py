"""Evaluation of the bundled prior on held-out cameras (``engine-server eval-bundled``), and its model card.

Text-conditioned: every caption (shape x colour) is sampled from two of the 16
held-out cameras (rotating, so every held-out camera is used) and scored for
colour (the foreground's colour class equals the prompt's) and shape (silhouette
IoU against the procedural render of the same caption from the same camera).
Image-conditioned: every caption's render from a fixed reference camera
conditions a sample at one held-out camera, with no prompt; scored the same way
against the procedural ground truth. The ground truth comes from the same
renderer as the training data.
"""
from __future__ import annotations

import colorsys
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from engine_server.models.bundled import procedural as P
from engine_server.models.bundled.prior import BundledPrior, Reference
from engine_server.models.bundled.vocab import COLOR_NAMES, COLORS, SHAPES, Caption, all_captions
from engine_server.multiview.rig import background_mask, mask_iou

logger = logging.getLogger(__name__)

TARGETS = {"text_color_accuracy": 0.90, "text_silhouette_iou": 0.75, "image_novel_view_iou": 0.70}
"""Acceptance thresholds of the issue."""

REFERENCE_VIEW = (0.0, 15.0)
"""(azimuth, elevation) of the reference camera in image-conditioned evaluation."""

MASK_THRESHOLD = 0.15
"""A pixel is foreground when some channel differs from the background by more than this."""


@dataclass
class EvalConfig:
    """Sampling settings of the evaluation."""

    steps: int = 20
    """DDIM steps per sample."""
    guidance_scale: float = 2.0
    """Classifier-free guidance for text-conditioned samples."""
    image_guidance_scale: float = 2.0
    """Classifier-free guidance for image-conditioned samples."""
    views_per_caption: int = 1
    """Held-out cameras per caption (text mode)."""
    batch_size: int = 64
    """Samples denoised together."""
    seed: int = 1234
    """Seed of the sampling noise."""


# ---------------------------------------------------------------- metrics
def foreground_mask(rgb: torch.Tensor, background=P.BACKGROUND_RGB, threshold: float = MASK_THRESHOLD) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> (N, H, W) bool: pixels that differ from the prior's background colour."""
    return background_mask(rgb, background, threshold)


def _proto_hues() -> dict[str, float]:
    return {c: colorsys.rgb_to_hsv(*COLORS[c])[0] for c in COLOR_NAMES if c not in ("white", "black")}


def classify_color(rgb: torch.Tensor, mask: torch.Tensor) -> str | None:
    """Colour word of the foreground (3, H, W) / (H, W) bool: black by value, white by saturation, else nearest hue."""
    if mask.sum() < 3:
        return None
    # interior pixels only (edges blend with the background), when enough remain
    core = -torch.nn.functional.max_pool2d(-mask[None, None].float(), 3, 1, 1)[0, 0] > 0.5
    pix = rgb[:, core if core.sum() >= 3 else mask].T  # (K, 3)
    med = pix.median(dim=0).values.tolist()
    h, s, v = colorsys.rgb_to_hsv(*med)
    if v < 0.2:
        return "black"
    if s < 0.3:
        return "white"
    hues = _proto_hues()
    return min(hues, key=lambda c: min(abs(h - hues[c]), 1 - abs(h - hues[c])))


def background_error(rgb: torch.Tensor, gt_mask: torch.Tensor) -> float:
    """Mean absolute error vs the background colour on pixels far (2 px) from the object. gt_mask (N, H, W) float."""
    near = torch.nn.functional.max_pool2d(gt_mask[:, None].float(), 5, 1, 2)[:, 0] > 0
    bg = torch.tensor(P.BACKGROUND_RGB).view(1, 3, 1, 1)
    err = (rgb - bg).abs().mean(dim=1)
    far = ~near
    return float(err[far].mean()) if far.any() else 0.0


MIN_CAPTION_IOU = 0.5

TURNS: dict[str, float] = {"cube": 45.0, "pyramid": 45.0, "table": 90.0}
"""The shapes whose look changes as the camera goes round them, and the turn about the vertical that changes it
most (half their symmetry): the turn margin is a sample's IoU with the truth from its own camera less that from
the camera turned this far. About 0 means the prior draws them the same from every azimuth (issue 23: such a
prior distils a cube into a cylinder and a table into a round one)."""


def turned(c2w: torch.Tensor, degrees: float) -> torch.Tensor:
    """Cameras (N, 4, 4) c2w carried round the vertical (Z) axis by ``degrees``."""
    a = torch.deg2rad(torch.tensor(degrees, dtype=c2w.dtype))
    rz = torch.eye(4, dtype=c2w.dtype)
    rz[0, 0], rz[0, 1], rz[1, 0], rz[1, 1] = torch.cos(a), -torch.sin(a), torch.sin(a), torch.cos(a)
    return rz @ c2w
"""A view shows the caption's shape when its silhouette overlaps the training renderer's this much.

Well below the evaluation's mean (about 0.87) so a right but rough object passes; a wrong object
(a table drawn for a torus) lands near 0.4."""


def caption_match(images: torch.Tensor, c2w: torch.Tensor, fov: torch.Tensor, caption: Caption,
                  min_iou: float = MIN_CAPTION_IOU) -> tuple[torch.Tensor, list[str | None]]:
    """Whether views (N, 3, R, R) in [0, 1] at cameras c2w (N, 4, 4), FOVs (N,) show ``caption``.

    Shape: the foreground's IoU with the procedural render of the caption from the same camera
    (the renderer the prior was trained on; foreground by the evaluation's rule); colour:
    :func:`classify_color`. Returns a score (N,) (the IoU, minus 1 for a wrong colour) and per
    view None or what is wrong.
    """
    n = images.shape[0]
    masks = foreground_mask(images)
    iou = torch.ones(n)
    if caption.shape is not None:
        r = P.render_shape(caption.shape, c2w, fov, images.shape[-1])
        albedo = P.albedo_of(caption.color or "white").expand(n, 3)
        iou = mask_iou(masks, foreground_mask(P.compose(r.shade, r.mask, albedo)))  # the evaluation's rule
    score, problems = iou.clone(), []
    for i in range(n):
        wrong = []
        if iou[i] < min_iou:
            wrong.append(f"silhouette IoU {float(iou[i]):.2f} with a {caption.shape} below {min_iou}")
        color = classify_color(images[i], masks[i]) if caption.color is not None else None
        if caption.color is not None and color != caption.color:
            wrong.append(f"colour {color}, not {caption.color}")
            score[i] -= 1.0
        problems.append("; ".join(wrong) or None)
    return score, problems


# ---------------------------------------------------------------- evaluation
def _batched_sample(prior: BundledPrior, jobs: list[dict], cfg: EvalConfig, gen: torch.Generator, scale: float):
    """jobs: {"prompt", "c2w" (4,4), "reference": Reference or None}; denoised cfg.batch_size at a time."""
    out = []
    for s in range(0, len(jobs), cfg.batch_size):
        part = jobs[s:s + cfg.batch_size]
        cams = torch.stack([j["c2w"] for j in part])
        ref = None
        if part[0].get("reference") is not None:
            ref = Reference(torch.stack([j["reference"].image for j in part]),
                            torch.stack([j["reference"].c2w for j in part]), P.DEFAULT_FOV)
        out.append(prior.sample([j["prompt"] for j in part], cams, reference=ref, steps=cfg.steps,
                                guidance_scale=scale, generator=gen, fov=P.DEFAULT_FOV).cpu())
    return torch.cat(out)


def evaluate(weights: str | Path | BundledPrior, cfg: EvalConfig | None = None, grid_path: str | None = None) -> dict:
    """Sample and score; returns {"rows": [...], "passed": bool, "per_shape": [...], "seconds": float, ...}."""
    cfg = cfg or EvalConfig()
    t0 = time.time()
    prior = weights if isinstance(weights, BundledPrior) else BundledPrior.load(weights)
    if prior.resolution != 32 and prior.resolution != 64:
        logger.warning("unusual resolution %d", prior.resolution)
    held = P.held_out_cameras()
    n_held = held.c2w.shape[0]
    caps = all_captions()
    gen = torch.Generator().manual_seed(cfg.seed)

    # text-conditioned: caption i uses held-out cameras i*k .. i*k+k-1 (mod 16)
    text_jobs = []
    for i, cap in enumerate(caps):
        for k in range(cfg.views_per_caption):
            h = (i * cfg.views_per_caption + k) % n_held
            text_jobs.append({"prompt": cap.text, "c2w": held.c2w[h], "cap": cap, "h": h})
    # ground truth per shape from all held-out cameras, composed per colour
    gt_shape = {s: P.render_shape(s, held.c2w, held.fov, prior.resolution) for s in SHAPES}

    def gt_for(job):
        r = gt_shape[job["cap"].shape]
        h = job["h"]
        img = P.compose(r.shade[h:h + 1], r.mask[h:h + 1], P.albedo_of(job["cap"].color)[None])
        return img[0], foreground_mask(img)[0]  # the same foreground rule as for samples

    text_imgs = _batched_sample(prior, text_jobs, cfg, gen, cfg.guidance_scale)
    t_text = time.time() - t0

    # image-conditioned
    ref_cam = P.orbit_cameras([REFERENCE_VIEW[0]], [REFERENCE_VIEW[1]], P.DEFAULT_DISTANCE, P.DEFAULT_FOV)
    ref_r = {s: P.render_shape(s, ref_cam.c2w, ref_cam.fov, prior.resolution) for s in SHAPES}
    img_jobs = []
    for i, cap in enumerate(caps):
        h = (i * 5 + 3) % n_held
        r = ref_r[cap.shape]
        ref_img = P.compose(r.shade, r.mask, P.albedo_of(cap.color)[None])[0]
        img_jobs.append({"prompt": None, "c2w": held.c2w[h], "cap": cap, "h": h, "ref_key": cap.text,
                         "reference": Reference(ref_img, ref_cam.c2w[0], P.DEFAULT_FOV)})
    img_imgs = _batched_sample(prior, img_jobs, cfg, gen, cfg.image_guidance_scale)

    def score(jobs, imgs):
        gts = [gt_for(j) for j in jobs]
        gt_img = torch.stack([g[0] for g in gts])
        gt_mask = torch.stack([g[1] for g in gts])
        pred_mask = foreground_mask(imgs)
        iou = mask_iou(pred_mask, gt_mask)
        colors = [classify_color(imgs[i], pred_mask[i]) for i in range(len(jobs))]
        correct = torch.tensor([c == j["cap"].color for c, j in zip(colors, jobs)], dtype=torch.float32)
        return {"iou": iou, "correct": correct, "colors": colors, "gt_img": gt_img, "gt_mask": gt_mask,
                "bg_err": background_error(imgs, gt_mask), "mae": float((imgs - gt_img).abs().mean())}

    st, si = score(text_jobs, text_imgs), score(img_jobs, img_imgs)
    turn_margin = {}
    for shape, degrees in TURNS.items():
        rows_of = [k for k, j in enumerate(text_jobs) if j["cap"].shape == shape]
        cams = turned(held.c2w[[text_jobs[k]["h"] for k in rows_of]], degrees)
        r = P.render_shape(shape, cams, held.fov[:len(rows_of)], prior.resolution)
        albedo = torch.stack([P.albedo_of(text_jobs[k]["cap"].color) for k in rows_of])
        other = mask_iou(foreground_mask(text_imgs[rows_of]), foreground_mask(P.compose(r.shade, r.mask, albedo)))
        turn_margin[shape] = float(st["iou"][rows_of].mean() - other.mean())
    rows = [
        {"metric": "text: colour accuracy", "value": float(st["correct"].mean()), "target": ">= 0.90",
         "pass": bool(st["correct"].mean() >= TARGETS["text_color_accuracy"]), "n": len(text_jobs)},
        {"metric": "text: silhouette IoU (mean)", "value": float(st["iou"].mean()), "target": ">= 0.75",
         "pass": bool(st["iou"].mean() >= TARGETS["text_silhouette_iou"]), "n": len(text_jobs)},
        {"metric": "text: background error (MAE)", "value": st["bg_err"], "target": "-", "pass": True, "n": len(text_jobs)},
        {"metric": f"text: turn margin ({', '.join(TURNS)}; mean)", "value": sum(turn_margin.values()) / len(TURNS),
         "target": "-", "pass": True, "n": sum(1 for j in text_jobs if j["cap"].shape in TURNS)},
        {"metric": "image: novel-view silhouette IoU (mean)", "value": float(si["iou"].mean()), "target": ">= 0.70",
         "pass": bool(si["iou"].mean() >= TARGETS["image_novel_view_iou"]), "n": len(img_jobs)},
        {"metric": "image: novel-view colour accuracy", "value": float(si["correct"].mean()), "target": "-",
         "pass": True, "n": len(img_jobs)},
        {"metric": "image: novel-view pixel MAE", "value": si["mae"], "target": "-", "pass": True, "n": len(img_jobs)},
    ]
    per_shape = []
    for s in SHAPES:
        ti = [k for k, j in enumerate(text_jobs) if j["cap"].shape == s]
        ii = [k for k, j in enumerate(img_jobs) if j["cap"].shape == s]
        per_shape.append({"shape": s, "text_iou": float(st["iou"][ti].mean()), "text_color": float(st["correct"][ti].mean()),
                          "image_iou": float(si["iou"][ii].mean()), "image_color": float(si["correct"][ii].mean()),
                          "text_turn_margin": turn_margin.get(s)})
    if grid_path:
        _save_grid(grid_path, text_imgs, st["gt_img"], img_imgs, si["gt_img"], torch.stack([j["reference"].image for j in img_jobs]))
    seconds = time.time() - t0
    return {"rows": rows, "per_shape": per_shape, "passed": all(r["pass"] for r in rows), "seconds": seconds,
            "text_seconds": t_text, "config": asdict(cfg), "weights": str(prior.path),
            "held_out_views": [list(v) for v in P.HELD_OUT_VIEWS], "held_out_radius_deg": P.HELD_OUT_RADIUS_DEG,
            "reference_view": list(REFERENCE_VIEW), "threads": torch.get_num_threads()}


def _save_grid(path, text_imgs, text_gt, img_imgs, img_gt, refs, per_row: int = 16) -> None:
    from PIL import Image

    def strip(x):
        x = x[: (len(x) // per_row) * per_row]
        rows = [torch.cat(list(x[i:i + per_row]), dim=2) for i in range(0, len(x), per_row)]
        return torch.cat(rows, dim=1)

    n = min(len(text_imgs), 64)
    m = min(len(img_imgs), 32)
    blocks = [strip(text_imgs[:n]), strip(text_gt[:n]), strip(refs[:m]), strip(img_imgs[:m]), strip(img_gt[:m])]
    grid = torch.cat(blocks, dim=1)
    arr = (grid.permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype("uint8")
    Image.fromarray(arr).resize((arr.shape[1] * 2, arr.shape[0] * 2), Image.NEAREST).save(path)


def format_rows(result: dict) -> str:
    """The eval table (and per-shape table) as aligned text."""
    def table(rows):
        cols = list(rows[0])
        cells = [[_cell(r[c]) for c in cols] for r in rows]
        w = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
        lines = ["  ".join(c.ljust(x) for c, x in zip(cols, w)), "  ".join("-" * x for x in w)]
        return "\n".join(lines + ["  ".join(v.ljust(x) for v, x in zip(r, w)) for r in cells])

    return (table(result["rows"]) + "\n\n" + table(result["per_shape"]) +
            f"\n\n{'PASSED' if result['passed'] else 'NOT PASSED'} in {result['seconds']:.0f} s")


def _cell(value) -> str:
    """A table cell: floats to 3 places, a measure a row does not have as "-"."""
    return f"{value:.3f}" if isinstance(value, float) else "-" if value is None else str(value)


def _md_table(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(_cell(r[c]) for c in cols) + " |" for r in rows])


def write_model_card(folder: str | Path, result: dict) -> Path:
    """Write MODEL_CARD.md beside the weights from the eval result and training_info.json."""
    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    info_path = folder / "training_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    tc = info.get("train_config", {})
    n_params = _count_params(folder)
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file() and f.name != "MODEL_CARD.md")
    cam = cfg.get("extra", {}).get("camera", {})
    curve = info.get("loss_curve", [])
    curve_txt = ", ".join(f"{v:.4f}" for v in curve[:: max(1, len(curve) // 12)]) if curve else "n/a"
    lines = [
        "# Bundled prior: model card",
        "",
        "*Written by `engine-server eval-bundled --write-card` / `export-bundled` from the evaluation below; do not edit by hand.*",
        "",
        "## What it is",
        f"A {cfg['resolution']}x{cfg['resolution']} pixel-space diffusion model (diffusers `UNet2DModel`, "
        f"{n_params / 1e6:.2f} M parameters, channels {cfg['block_out_channels']}, {cfg['layers_per_block']} ResNet block(s) "
        f"per level, self-attention at levels {cfg['attention_levels']}), {cfg['prediction_type']} with a "
        f"`{cfg['beta_schedule']}` schedule rescaled to zero terminal SNR ({cfg['num_train_timesteps']} steps; DDIM with "
        "trailing spacing for sampling).",
        "",
        "Conditions, summed into the timestep embedding (`class_embed_type=\"identity\"`): learned shape-word and "
        "colour-word embeddings; an MVDream-style camera embedding (c2w rotation, position / distance and FOV "
        "through a 2-layer MLP); in image-conditioned mode a Zero123-style embedding of the reference camera and the "
        "relative pose (sin/cos delta azimuth, delta elevation, delta distance)"
        + ("; a shape-camera embedding: the outer product of the shape word (one-hot) and the camera's azimuth "
           "harmonics (sin / cos of k az, k = 1-4) and elevation through a 2-layer MLP, so each shape word turns with "
           "the camera in its own way" if cfg.get("shape_camera") else "") + ". The reference view enters as 3 extra "
        "input channels plus a presence flag channel. Every condition has a null value used for classifier-free guidance "
        f"(dropout in training: prompt {tc.get('drop_prompt')}, each word {tc.get('drop_word')}, camera "
        f"{tc.get('drop_camera')}; {tc.get('image_cond_prob')} of the rows are image-conditioned, keeping the prompt "
        f"with probability {tc.get('prompt_with_image')}).",
        "",
        f"Weights: `model.safetensors` (fp16, EMA), `config.json`; {size / 1e6:.2f} MB in total.",
        "",
        "## Data",
        f"Procedural, rendered once per run (cached in the run folder) by `engine_server/models/bundled/procedural.py` (seeded): shapes {', '.join(SHAPES)} "
        f"in colours {', '.join(COLOR_NAMES)}; analytic SDFs normalised to the unit box, sphere-traced at 2x and "
        f"box-downsampled, ambient + two fixed world lights, plain background RGB {tuple(P.BACKGROUND_RGB)}. Cameras: "
        f"azimuth 0-360, elevation {cam.get('elevation')} (uniform on the sphere band), distance {cam.get('distance')}, "
        f"vertical FOV {cam.get('fov')} degrees; {tc.get('views_per_shape')} cameras per shape, any colour composed per "
        f"sample. Held out: no training camera lies within {P.HELD_OUT_RADIUS_DEG} degrees of the 16 evaluation views "
        f"(azimuth, elevation) = {list(P.HELD_OUT_VIEWS)}.",
        "",
        "## Training",
        f"`engine-server train-bundled` (seed {tc.get('seed')}): {info.get('step')} of {info.get('steps')} steps at batch "
        f"{info.get('batch_size')}, AdamW lr {tc.get('lr')} (warm-up {tc.get('warmup')}, cosine decay to 10% after "
        f"{tc.get('decay_start')} of the run), EMA {tc.get('ema_decay')}, gradient clipping 1.0. Hardware: {info.get('device')} "
        f"with {info.get('threads')} torch thread(s) on a shared 2-core machine; {info.get('seconds', 0) / 3600:.2f} h of "
        f"training. Final loss (mean of the last 200 steps): {info.get('final_loss', float('nan')):.4f}."
        + _parent_sentence(info, tc),
        "",
        f"Loss curve (mean per 100 steps, sampled): {curve_txt}",
        "",
        "## Evaluation (`engine-server eval-bundled`)",
        f"DDIM {result['config']['steps']} steps, guidance {result['config']['guidance_scale']} (text) / "
        f"{result['config']['image_guidance_scale']} (image), distance {P.DEFAULT_DISTANCE}, FOV {P.DEFAULT_FOV}, "
        f"held-out cameras only; image-conditioned mode uses the reference view (azimuth, elevation) = "
        f"{tuple(REFERENCE_VIEW)} and no prompt. Foreground = pixels more than {MASK_THRESHOLD} from the background in "
        "some channel; colour = median foreground colour classified by value (black), saturation (white) or nearest hue. "
        f"Took {result['seconds']:.0f} s on {result.get('threads')} thread(s).",
        "",
        _md_table(result["rows"]),
        "",
        _md_table(result["per_shape"]),
        "",
        f"Overall: **{'PASSED' if result['passed'] else 'NOT PASSED'}**.",
        "",
        "## Limits",
        "Knows only the words above (one colour, one shape per prompt; others raise `UnknownPromptError`). "
        "32x32 images on a fixed cyan background: compose renders on `background_rgb` before asking it for guidance. "
        "No joint multi-view mode: views are denoised independently, each with its camera.",
        "",
    ]
    path = folder / "MODEL_CARD.md"
    path.write_text("\n".join(lines))
    return path


def _parent_sentence(info: dict, tc: dict) -> str:
    """How the weights a fine-tune started from were trained, for the card (empty for a run from scratch)."""
    parent = info.get("parent")
    if not parent:
        return ""
    ptc = parent.get("train_config", {})
    return (f" Started from the weights shipped before ({parent.get('step')} steps at batch {parent.get('batch_size')}, "
            f"last lr {ptc.get('lr')}, {parent.get('seconds', 0) / 3600:.2f} h, final loss "
            f"{parent.get('final_loss', float('nan')):.4f}); the parameters they lack started at zero and were trained "
            f"at {tc.get('new_lr_scale')}x the learning rate (the steps and hours above are this fine-tune's own).")


def _count_params(folder: Path) -> int:
    from safetensors.torch import load_file

    return sum(v.numel() for v in load_file(str(folder / "model.safetensors")).values())


MAX_SHIPPED_BYTES = 20 * 1024 * 1024


def _parent_training(src: Path, target: Path) -> dict | None:
    """The training record (less its loss curve) of the weights in ``target`` when the run in ``src`` started
    from them (``train_config.init_from``), else None."""
    info_path, old_path = src / "training_info.json", target / "training_info.json"
    if not (info_path.is_file() and old_path.is_file()):
        return None
    init_from = json.loads(info_path.read_text()).get("train_config", {}).get("init_from")
    if not init_from or Path(init_from).resolve() != target.resolve():
        return None
    return {k: v for k, v in json.loads(old_path.read_text()).items() if k != "loss_curve"}


def export_run(run_dir: Path, target: Path | None = None, cfg: EvalConfig | None = None) -> tuple[dict, Path]:
    """Copy a run's EMA export into the package weights folder, evaluate it, write the model card."""
    from engine_server.models.bundled.prior import DEFAULT_WEIGHTS_DIR

    src = Path(run_dir) / "ema"
    target = Path(target) if target else DEFAULT_WEIGHTS_DIR
    for name in ("model.safetensors", "config.json"):
        if not (src / name).is_file():
            raise FileNotFoundError(f"no EMA export in {src} (missing {name}); run train-bundled first")
    target.mkdir(parents=True, exist_ok=True)
    parent = _parent_training(src, target)
    for name in ("model.safetensors", "config.json", "training_info.json"):
        if (src / name).is_file():
            shutil.copyfile(src / name, target / (name + ".tmp"))
            (target / (name + ".tmp")).replace(target / name)
    if parent is not None:  # the weights a fine-tune started from are replaced: their history goes with it
        info = json.loads((target / "training_info.json").read_text())
        (target / "training_info.json").write_text(json.dumps(info | {"parent": parent}, indent=1) + "\n")
    total = sum(f.stat().st_size for f in target.iterdir() if f.is_file())
    if total > MAX_SHIPPED_BYTES:
        raise ValueError(f"shipped weights in {target} are {total / 1e6:.1f} MB, over the 20 MB limit")
    result = evaluate(target, cfg)
    (target / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    return result, write_model_card(target, result)
