"""Evaluation of the multi-view text path on the bundled prior, beside the prior's own text evaluation.

    result = run(SimpleNamespace(shapes="torus,table"))    # or: python -m engine_server.multiview.evaluate
    print(format_table(result))

For every shape of the bundled vocabulary and every colour (``colors_per_shape`` fewer, rotating
so every colour is still used; few prompts per shape leave the mean noisy, about 0.02 at three),
``generate_views`` draws the prompt at six cameras (azimuth 0-300, elevation 15,
distance 2.5, FOV 42) with the strategy asked for. Each view is scored as
:mod:`engine_server.models.bundled.evaluate` scores text samples: silhouette IoU against the
procedural renderer's ground truth for that caption and camera, and the foreground's colour
word. Per shape the mean IoU and colour accuracy sit beside the text evaluation's numbers
(``weights/eval.json``); a shape passes when its colour is always right and its IoU is at most
``MAX_IOU_DROP`` below the text evaluation's. ``run`` returns the bench format (title, rows, notes).
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any

import torch

from engine_server.cameras import orbit_camera
from engine_server.models.bundled import procedural as P
from engine_server.models.bundled.evaluate import classify_color, foreground_mask
from engine_server.models.bundled.prior import DEFAULT_WEIGHTS_DIR
from engine_server.models.bundled.vocab import COLOR_NAMES, SHAPES, Caption
from engine_server.multiview.generate import MultiViewConfig, generate_views
from engine_server.multiview.rig import mask_iou

logger = logging.getLogger(__name__)

AZIMUTHS = (0.0, 60.0, 120.0, 180.0, 240.0, 300.0)
"""Camera azimuths in degrees."""
ELEVATION, DISTANCE, FOV = 15.0, 2.5, 42.0
"""The cameras' elevation (degrees), distance and vertical FOV (degrees)."""
MAX_IOU_DROP = 0.05
"""How far below its text-evaluation IoU a shape's multi-view IoU may be."""
MIN_MEAN_IOU = 0.75
"""The mean IoU over shapes the issue asks for."""


def captions(shapes: tuple[str, ...] = SHAPES, colors_per_shape: int = len(COLOR_NAMES)) -> list[Caption]:
    """Shape-major captions: each shape in ``colors_per_shape`` colours, each shape starting where the last stopped."""
    k = len(COLOR_NAMES)
    return [Caption(COLOR_NAMES[(i * colors_per_shape + j) % k], s)
            for i, s in enumerate(shapes) for j in range(colors_per_shape)]


def text_eval_per_shape() -> dict[str, dict]:
    """The bundled prior's own text evaluation per shape (``weights/eval.json``): {shape: {text_iou, text_color}}."""
    path = DEFAULT_WEIGHTS_DIR / "eval.json"
    if not path.is_file():
        return {}
    return {r["shape"]: r for r in json.loads(path.read_text())["per_shape"]}


def score_views(images: torch.Tensor, caption: Caption, c2w: torch.Tensor, fov: float) -> tuple[torch.Tensor, list]:
    """IoU (N,) of views (N, 3, R, R) against the caption's ground truth at c2w (N, 4, 4), and their colour words."""
    n, res = images.shape[0], images.shape[-1]
    r = P.render_shape(caption.shape, c2w, torch.full((n,), fov), res)
    gt = foreground_mask(P.compose(r.shade, r.mask, P.albedo_of(caption.color).expand(n, 3)))
    masks = foreground_mask(images)
    return mask_iou(masks, gt), [classify_color(images[i], masks[i]) for i in range(n)]


def evaluate_prompts(prior, caps: list[Caption], config: MultiViewConfig) -> list[dict]:
    """One row per caption: mean IoU, colour accuracy, redrawn views, seconds (the seed varies per caption)."""
    res = int(prior.resolution)
    cams = [orbit_camera(a, ELEVATION, DISTANCE, FOV, res) for a in AZIMUTHS]
    c2w = torch.stack([c.c2w.float() for c in cams])
    rows = []
    for i, cap in enumerate(caps):
        cfg = MultiViewConfig(**{**vars(config), "seed": config.seed + i})
        t0 = time.perf_counter()
        result = generate_views(prior, cams, prompt=cap.text, config=cfg)
        seconds = time.perf_counter() - t0
        iou, colors = score_views(result.images, cap, c2w, FOV)
        rows.append({"prompt": cap.text, "shape": cap.shape, "iou": float(iou.mean()), "iou_min": float(iou.min()),
                     "color": sum(c == cap.color for c in colors) / len(colors), "redrawn": result.redrawn,
                     "seconds": seconds})
        logger.info("%s: IoU %.3f (min %.3f), colour %.2f, %d redrawn, %.1f s", cap.text, rows[-1]["iou"],
                    rows[-1]["iou_min"], rows[-1]["color"], result.redrawn, seconds)
    return rows


def per_shape(prompt_rows: list[dict], text: dict[str, dict]) -> list[dict]:
    """Per shape: multi-view IoU and colour beside the text evaluation's, the drop, redrawn views, pass."""
    out = []
    for s in dict.fromkeys(r["shape"] for r in prompt_rows):
        rows = [r for r in prompt_rows if r["shape"] == s]
        iou = sum(r["iou"] for r in rows) / len(rows)
        color = sum(r["color"] for r in rows) / len(rows)
        ref = text.get(s, {})
        text_iou = ref.get("text_iou", float("nan"))
        out.append({"shape": s, "mv_iou": iou, "mv_color": color, "text_iou": text_iou,
                    "text_color": ref.get("text_color", float("nan")), "drop": text_iou - iou,
                    "redrawn": sum(r["redrawn"] for r in rows), "views": 6 * len(rows),
                    "pass": bool(color == 1.0 and not iou < text_iou - MAX_IOU_DROP)})
    return out


def run(args: Any = None) -> dict:
    """The per-shape table (bench format). Options read from ``args``: shapes (comma list), colors_per_shape (8),
    strategy ("anchor"), steps (20), guidance_scale (2.0), seed (0), max_redraws (3), device ("cpu")."""
    from engine_server.guidance import load_prior

    shapes = tuple(s.strip() for s in str(getattr(args, "shapes", None) or ",".join(SHAPES)).split(",") if s.strip())
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise ValueError(f"unknown shapes {unknown}; the bundled prior knows {', '.join(SHAPES)}")
    config = MultiViewConfig(strategy=str(getattr(args, "strategy", "anchor")), steps=int(getattr(args, "steps", 20)),
                             guidance_scale=float(getattr(args, "guidance_scale", 2.0)),
                             seed=int(getattr(args, "seed", 0)), max_redraws=int(getattr(args, "max_redraws", 3)))
    prior = load_prior("bundled", device=getattr(args, "device", "cpu"))
    t0 = time.perf_counter()
    caps = captions(shapes, int(getattr(args, "colors_per_shape", len(COLOR_NAMES))))
    prompt_rows = evaluate_prompts(prior, caps, config)
    seconds = time.perf_counter() - t0
    rows = per_shape(prompt_rows, text_eval_per_shape())
    mean_iou = sum(r["mv_iou"] for r in rows) / len(rows)
    passed = all(r["pass"] for r in rows) and mean_iou >= MIN_MEAN_IOU
    notes = [
        f"{len(prompt_rows)} prompts x {len(AZIMUTHS)} cameras (azimuth {AZIMUTHS[0]:.0f}-{AZIMUTHS[-1]:.0f}, "
        f"elevation {ELEVATION:.0f}, distance {DISTANCE}, FOV {FOV:.0f}); strategy {config.strategy}, "
        f"{config.steps} DDIM steps, guidance {config.guidance_scale}, max_redraws {config.max_redraws}.",
        "mv_*: the multi-view text path; text_*: the bundled prior's own text evaluation (weights/eval.json, "
        "one held-out camera per caption); drop = text_iou - mv_iou; pass: colour 100 % and drop <= "
        f"{MAX_IOU_DROP}.",
        f"mean mv_iou {mean_iou:.3f} (target >= {MIN_MEAN_IOU}); {sum(r['redrawn'] for r in rows)} views redrawn; "
        f"{seconds:.0f} s ({seconds / len(prompt_rows):.1f} s per prompt, torch threads {torch.get_num_threads()}); "
        f"{'PASSED' if passed else 'NOT PASSED'}.",
    ]
    return {"title": "multi-view text path vs the bundled prior's text evaluation", "rows": rows, "notes": notes,
            "prompts": prompt_rows, "mean_iou": mean_iou, "passed": passed, "seconds": seconds}


def format_table(result: dict) -> str:
    """The per-shape rows as aligned text, then the notes."""
    rows = result["rows"]
    cols = list(rows[0])
    cell = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    cells = [[cell(r[c]) for c in cols] for r in rows]
    width = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, width)), "  ".join("-" * w for w in width)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, width)) for r in cells]
    return "\n".join(lines + [""] + result["notes"])


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(format_table(run()))
