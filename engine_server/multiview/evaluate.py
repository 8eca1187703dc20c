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

The same table through a real server (``run(SimpleNamespace(server="tcp://127.0.0.1:5557"))``, or
``python -m engine_server.multiview.evaluate --server ENDPOINT``): each prompt is a ``multiview``
job whose rig puts the reference view (drawn from the prompt, checked, redrawn) at the first camera
and the six views at the evaluation's cameras, so the job draws what the in-process anchor strategy
draws; the views come back over the wire and are scored by the same function.
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
from engine_server.wire.client import EngineClient

logger = logging.getLogger(__name__)

AZIMUTHS = (0.0, 60.0, 120.0, 180.0, 240.0, 300.0)
"""Camera azimuths in degrees."""
ELEVATION, DISTANCE, FOV = 15.0, 2.5, 42.0
"""The cameras' elevation (degrees), distance and vertical FOV (degrees)."""
MAX_IOU_DROP = 0.05
"""How far below its text-evaluation IoU a shape's multi-view IoU may be."""
MIN_MEAN_IOU = 0.75
"""The mean IoU over shapes the issue asks for."""
JOB_OPTIONS = {"coarse_steps": 1, "tet_resolution": 24, "texture_size": 64}
"""A server job's fit after the views: not scored here, so as short as a job allows."""


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


def _row(cap: Caption, images: torch.Tensor, c2w: torch.Tensor, redrawn: int, seconds: float) -> dict:
    """A caption's row: its views (N, 3, R, R) at c2w (N, 4, 4) scored, with redrawn views and seconds."""
    iou, colors = score_views(images, cap, c2w, FOV)
    row = {"prompt": cap.text, "shape": cap.shape, "iou": float(iou.mean()), "iou_min": float(iou.min()),
           "color": sum(c == cap.color for c in colors) / len(colors), "redrawn": int(redrawn), "seconds": seconds}
    logger.info("%s: IoU %.3f (min %.3f), colour %.2f, %d redrawn, %.1f s", cap.text, row["iou"], row["iou_min"],
                row["color"], redrawn, seconds)
    return row


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
        rows.append(_row(cap, result.images, c2w, result.redrawn, time.perf_counter() - t0))
    return rows


def job_rig(resolution: int) -> list[dict]:
    """The evaluation's cameras as a ``multiview`` job's rig: the reference view's camera (the first), then all six."""
    cams = [orbit_camera(a, ELEVATION, DISTANCE, FOV, resolution) for a in (AZIMUTHS[0], *AZIMUTHS)]
    return [{"matrix_world": c.c2w.tolist(), "fov_y_deg": FOV, "width": resolution, "height": resolution}
            for c in cams]


def evaluate_prompts_server(client: EngineClient, caps: list[Caption], config: MultiViewConfig, resolution: int = 32,
                            timeout: float = 900.0) -> list[dict]:
    """``evaluate_prompts`` through a server: one ``multiview`` job per caption (same seeds), its views scored.

    The job samples with its own guidance scale and redraw limit (``MultiViewConfig``'s defaults); other
    values are refused here rather than scored as if used. Each job is deleted once its views are fetched.
    """
    default = MultiViewConfig()
    if (config.guidance_scale, config.max_redraws, config.shared_noise) != \
            (default.guidance_scale, default.max_redraws, default.shared_noise):
        raise ValueError(f"a multiview job samples at guidance {default.guidance_scale}, max_redraws "
                         f"{default.max_redraws}, shared noise; got {config.guidance_scale}, {config.max_redraws}, "
                         f"{config.shared_noise}")
    options = {**JOB_OPTIONS, "views": len(AZIMUTHS), "multiview_strategy": config.strategy,
               "multiview_steps": config.steps}
    rig = job_rig(resolution)
    rows = []
    for i, cap in enumerate(caps):
        t0 = time.perf_counter()
        job = client.submit("multiview", cap.text, seed=config.seed + i, rig=rig, options=options)
        end = client.wait(job, timeout)
        if end.type != "done":
            raise RuntimeError(f"the multiview job for {cap.text!r} ended {end.type}: {end.get('message')}")
        result = client.result(job, glb=False)
        client.delete(job)
        images = torch.tensor(result.arrays["views"].numpy()).permute(0, 3, 1, 2).float() / 255.0
        c2w = torch.tensor(result.arrays["view_c2w"].numpy()).float()
        rows.append(_row(cap, images, c2w, result.meta["views"]["redrawn"], time.perf_counter() - t0))
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
    strategy ("anchor"), steps (20), guidance_scale (2.0), seed (0), max_redraws (3), device ("cpu"); server
    (an endpoint: score its ``multiview`` jobs instead, the server's own prior must be the bundled one) and
    key_file (the server's key file; default: the per-user one)."""
    from engine_server.guidance import load_prior

    shapes = tuple(s.strip() for s in str(getattr(args, "shapes", None) or ",".join(SHAPES)).split(",") if s.strip())
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise ValueError(f"unknown shapes {unknown}; the bundled prior knows {', '.join(SHAPES)}")
    config = MultiViewConfig(strategy=str(getattr(args, "strategy", "anchor")), steps=int(getattr(args, "steps", 20)),
                             guidance_scale=float(getattr(args, "guidance_scale", 2.0)),
                             seed=int(getattr(args, "seed", 0)), max_redraws=int(getattr(args, "max_redraws", 3)))
    server = getattr(args, "server", None)
    t0 = time.perf_counter()
    caps = captions(shapes, int(getattr(args, "colors_per_shape", len(COLOR_NAMES))))
    if server:
        client = EngineClient(server, getattr(args, "key_file", None), timeout=30.0)
        try:
            prompt_rows = evaluate_prompts_server(client, caps, config)
        finally:
            client.close()
        path = f"a real server's multiview jobs ({server}: reference view at the first camera, then the six)"
    else:
        prompt_rows = evaluate_prompts(prior=load_prior("bundled", device=getattr(args, "device", "cpu")),
                                       caps=caps, config=config)
        path = "in process"
    seconds = time.perf_counter() - t0
    rows = per_shape(prompt_rows, text_eval_per_shape())
    mean_iou = sum(r["mv_iou"] for r in rows) / len(rows)
    passed = all(r["pass"] for r in rows) and mean_iou >= MIN_MEAN_IOU
    notes = [
        f"{len(prompt_rows)} prompts x {len(AZIMUTHS)} cameras (azimuth {AZIMUTHS[0]:.0f}-{AZIMUTHS[-1]:.0f}, "
        f"elevation {ELEVATION:.0f}, distance {DISTANCE}, FOV {FOV:.0f}), {path}; strategy {config.strategy}, "
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
    import argparse

    parser = argparse.ArgumentParser(description="The multi-view text path's per-shape table (issue 22).")
    parser.add_argument("--shapes", help="comma-separated shapes (default: all)")
    parser.add_argument("--colors-per-shape", type=int, default=len(COLOR_NAMES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server", help="score a running server's multiview jobs (its endpoint) instead")
    parser.add_argument("--key-file", help="the server's key file (default: the per-user one)")
    parser.add_argument("--json", help="also write the result here")
    cli = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    table = run(cli)
    if cli.json:
        from pathlib import Path

        Path(cli.json).write_text(json.dumps(table, indent=1))
    print(format_table(table))
