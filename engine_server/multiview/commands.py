"""CLI handlers: ``engine-server multiview`` and ``engine-server generate --image`` (registered in cli.py)."""
from __future__ import annotations

import argparse
import json
import logging
from functools import partial
from pathlib import Path

logger = logging.getLogger(__name__)


def add_multiview_parser(sub) -> None:
    """Register ``engine-server multiview (PROMPT | --image REF.png) --out DIR [--views N]``."""
    p = sub.add_parser("multiview", help="prompt or reference image -> N agreeing views (PNGs + cameras.json)")
    p.add_argument("prompt", nargs="?", default=None, help='what to show, e.g. "a red cube"')
    p.add_argument("--image", metavar="REF.png", default=None, help="reference image (novel views of it)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for view_XX.png, mask_XX.png, cameras.json")
    p.add_argument("--views", type=int, default=7, help="number of views (a ring plus one overhead view)")
    p.add_argument("--strategy", default="anchor", choices=["anchor", "sequential", "independent"],
                   help="how views are made to agree")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--model", default="bundled", metavar="PATH_OR_ID", help="prior: bundled, a folder or a hub id")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--glb", metavar="FILE.glb", default=None,
                   help="also reconstruct the object from the views (field fit + distillation) into this GLB")
    p.add_argument("--fit-steps", type=int, default=None, metavar="N", help="coarse steps of the reconstruction")
    p.set_defaults(func=cmd_multiview)


def cmd_multiview(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from engine_server.cli import UsageError

    if args.prompt is None and args.image is None:
        raise UsageError("give a PROMPT or --image REF.png")
    if args.views < 2:
        raise UsageError(f"--views must be >= 2, got {args.views}")
    out = Path(args.out)
    if args.glb is not None:
        result = _reconstruct(args)
    else:
        result = _views_only(args)
    out.mkdir(parents=True, exist_ok=True)
    cams = []
    for i, (img, m) in enumerate(zip(result.images_uint8(), result.masks)):
        Image.fromarray(img).save(out / f"view_{i:02d}.png")
        Image.fromarray(m.numpy().astype(np.uint8) * 255).save(out / f"mask_{i:02d}.png")
        cams.append({"image": f"view_{i:02d}.png", "mask": f"mask_{i:02d}.png", "c2w": result.c2w[i].tolist(),
                     "fov_y_deg": float(result.fovs[i]), "agreement": float(result.agreement[i])})
    (out / "cameras.json").write_text(json.dumps({"strategy": result.strategy, "views": cams}, indent=2))
    print(f"wrote {len(cams)} views to {out} (silhouette agreement mean {float(result.agreement.mean()):.3f})")
    return 0


def _reconstruct(args: argparse.Namespace):
    """``multiview --glb``: the image-to-3D pipeline (reference drawn from the prompt without --image); its views."""
    from engine_server.cli import output_glb, pick_device, run_in_process
    from engine_server.pipelines.image_to_3d import ImageFitConfig, ImageTo3D, ImageTo3DRequest

    glb = output_glb(args.glb, args.fit_steps, flag="--glb", steps_flag="--fit-steps")
    request = ImageTo3DRequest(image=args.image, prompt=args.prompt or "", seed=args.seed, model=args.model,
                               views=args.views,
                               overrides={"coarse_steps": args.fit_steps} if args.fit_steps else {},
                               fit=ImageFitConfig(multiview_strategy=args.strategy, multiview_steps=args.steps))
    pipeline, mesh = run_in_process(partial(ImageTo3D, request, device=pick_device(args.device)), glb)
    print(f"wrote {glb} ({len(mesh.faces)} faces) in {pipeline.timings['total_s']:.1f} s")
    return pipeline.views


def _views_only(args: argparse.Namespace):
    """The views alone: ``generate_views`` on the default rig."""
    from engine_server.cameras import look_at, orbit_position
    from engine_server.cli import pick_device, usage_from
    from engine_server.guidance import PriorLoadError, load_prior
    from engine_server.multiview import (
        DEFAULT_ELEVATION,
        MultiViewConfig,
        ViewReference,
        default_rig,
        generate_views,
    )

    try:
        prior = load_prior(args.model, device=pick_device(args.device))
        res = int(getattr(prior, "resolution", 32))
        ranges = dict(getattr(prior, "camera_ranges", {}) or {})
        dist, fov = float(ranges.get("default_distance", 2.5)), float(ranges.get("default_fov", 42.0))
        reference = None
        if args.image:
            from engine_server.pipelines.image_to_3d import foreground_mask, prepare_reference, read_image

            rgba = read_image(args.image)
            mask, _ = foreground_mask(rgba)
            bg = getattr(prior, "background_rgb", (0.0, 0.75, 0.75))
            img, _ = prepare_reference(rgba, mask, bg, res)
            reference = ViewReference(img, look_at(orbit_position(0.0, DEFAULT_ELEVATION, dist)), fov)
        rig = default_rig(args.views, dist, fov, res)
        cfg = MultiViewConfig(strategy=args.strategy, steps=args.steps, seed=args.seed)
        return generate_views(prior, rig, prompt=args.prompt, reference=reference, config=cfg)
    except (ValueError, PriorLoadError) as exc:
        raise usage_from(exc) from None


def cmd_generate_image(args: argparse.Namespace) -> int:
    """``engine-server generate --image REF.png --out X.glb [PROMPT]``: image to 3D, in-process."""
    from engine_server.cli import output_glb, pick_device, run_in_process
    from engine_server.pipelines.image_to_3d import ImageTo3D, ImageTo3DRequest

    out = output_glb(args.out, args.steps)
    request = ImageTo3DRequest(image=args.image, prompt=args.prompt or "", seed=args.seed, preset=args.preset,
                               model=args.model, guidance=args.guidance,
                               overrides={"coarse_steps": args.steps} if args.steps else {})
    pipeline, result = run_in_process(partial(ImageTo3D, request, device=pick_device(args.device)), out,
                                      Path(args.previews) if getattr(args, "previews", None) else None)
    print(f"wrote {out} ({len(result.faces)} faces) in {pipeline.timings['total_s']:.1f} s")
    return 0
