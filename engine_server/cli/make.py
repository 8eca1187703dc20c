"""The in-process job verbs: ``generate`` (prompt, or ``--image``), ``multiview`` and ``refine``.

Each builds the pipeline's request from its flags and runs it with progress bars; bad input
(image, mesh, prompt words, preset values) ends with one line and exit status 2.
"""
from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

from engine_server.cli.common import (
    UsageError,
    add_asset_flags,
    add_guidance_flags,
    add_image_fit_flags,
    add_job_flags,
    asset_overrides,
    guidance_fields,
    image_fit_fields,
    output_file,
    output_glb,
    run_in_process,
    usage_from,
)
from engine_server.pipelines.kinds import KINDS


def add_parsers(sub) -> None:
    p = sub.add_parser("generate", help="prompt (or --image) -> textured GLB / OBJ / USD, in-process (no server)")
    p.add_argument("prompt", nargs="?", default=None, help='what to make, e.g. "a red cube"')
    p.add_argument("--image", metavar="REF.png", default=None, help="reference image: image to 3D")
    p.add_argument("--out", required=True, metavar="FILE", help=_OUT_HELP)
    add_job_flags(p, steps_help="distillation steps (the preset's coarse_steps)")
    add_asset_flags(p)
    add_guidance_flags(p, perp_neg=True)
    add_image_fit_flags(p)
    p.add_argument("--previews", metavar="DIR", default=None, help="save preview renders here")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("multiview", help="prompt or reference image -> N agreeing views (PNGs + cameras.json)")
    p.add_argument("prompt", nargs="?", default=None, help='what to show, e.g. "a red cube"')
    p.add_argument("--image", metavar="REF.png", default=None, help="reference image (novel views of it)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for view_XX.png, mask_XX.png, cameras.json")
    p.add_argument("--views", type=int, default=7, help="number of views (a ring plus one overhead view)")
    p.add_argument("--strategy", default="anchor", choices=["anchor", "sequential", "independent"],
                   help="how views are made to agree")
    add_job_flags(p, preset=False, steps_help="DDIM steps of the view sampler (default 20)")
    p.add_argument("--glb", metavar="FILE.glb", default=None,
                   help="also reconstruct the object from the views (field fit + distillation) into this GLB")
    p.add_argument("--fit-steps", type=int, default=None, metavar="N", help="coarse steps of the reconstruction")
    p.set_defaults(func=cmd_multiview)

    p = sub.add_parser("refine", help="mesh + prompt -> refined textured GLB / OBJ / USD, in-process (no server)")
    p.add_argument("mesh", metavar="MESH.glb", help="input mesh (GLB / glTF / OBJ / PLY, anything trimesh reads)")
    p.add_argument("prompt", help='what it should become, e.g. "a green cube"')
    p.add_argument("--out", required=True, metavar="FILE", help=_OUT_HELP)
    p.add_argument("--mode", default="full", choices=["full", "texture"],
                   help="full: geometry + texture; texture: keep the geometry, only paint it")
    add_job_flags(p, steps_help="refinement steps (the preset's refine_steps)")
    add_asset_flags(p)
    add_guidance_flags(p)
    p.set_defaults(func=cmd_refine)


_OUT_HELP = ("where to write the object; the extension picks the format: .glb, .obj (+ .mtl and PNGs), "
             ".usd / .usda / .usdc (+ PNGs) or .usdz (USD needs usd-core: pip install 'engine-server[usd]'); "
             "a .json sidecar goes beside it")


def _overrides(args: argparse.Namespace, kind: str) -> dict:
    """``--steps`` as the override of the kind's steps knob (the kind table's ``steps_option``), ``--render-size``
    as ``render_resolution``, and ``--faces`` / ``--texture-size``."""
    over = {KINDS[kind].steps_option: args.steps} if args.steps else {}
    if getattr(args, "render_size", None):
        over["render_resolution"] = args.render_size
    return {**over, **asset_overrides(args)}


def _previews(args: argparse.Namespace) -> Path | None:
    return Path(args.previews) if getattr(args, "previews", None) else None


def cmd_generate(args: argparse.Namespace) -> int:
    from engine_server.devices import resolve_device

    out = output_file(args.out, args.steps)
    fit = image_fit_fields(args)
    device = resolve_device(args.device)
    if args.image:
        from engine_server.pipelines.image_to_3d import ImageTo3D, ImageTo3DRequest

        request = ImageTo3DRequest(image=args.image, prompt=args.prompt or "", seed=args.seed, preset=args.preset,
                                   model=args.model, overrides=_overrides(args, "image"), **guidance_fields(args),
                                   **fit)
        pipeline, result = run_in_process(partial(ImageTo3D, request, device=device), out, _previews(args))
        print(f"wrote {out} ({len(result.faces)} faces) in {pipeline.timings['total_s']:.1f} s")
        return 0
    if not args.prompt:
        raise UsageError("give a PROMPT or --image REF.png")
    from engine_server.pipelines.text_to_3d import TextTo3D, TextTo3DRequest

    request = TextTo3DRequest(prompt=args.prompt, seed=args.seed, preset=args.preset, model=args.model,
                              overrides=_overrides(args, "text"), **guidance_fields(args))
    pipeline, result = run_in_process(partial(TextTo3D, request, device=device), out, _previews(args))
    print(f"wrote {out} ({len(result.faces)} faces, texture {result.texture.shape[0]}px) "
          f"in {pipeline.timings['total_s']:.1f} s")
    return 0


def cmd_multiview(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    if args.prompt is None and args.image is None:
        raise UsageError("give a PROMPT or --image REF.png")
    if args.views < 2:
        raise UsageError(f"--views must be >= 2, got {args.views}")
    out = Path(args.out)
    result = _reconstruct(args) if args.glb is not None else _views_only(args)
    out.mkdir(parents=True, exist_ok=True)
    cams = []
    for i, (img, m) in enumerate(zip(result.images_uint8(), result.masks)):
        Image.fromarray(img).save(out / f"view_{i:02d}.png")
        Image.fromarray(m.numpy().astype(np.uint8) * 255).save(out / f"mask_{i:02d}.png")
        cams.append({"image": f"view_{i:02d}.png", "mask": f"mask_{i:02d}.png", "c2w": result.c2w[i].tolist(),
                     "fov_y_deg": float(result.fovs[i]), "agreement": float(result.agreement[i])})
    (out / "cameras.json").write_text(json.dumps({"strategy": result.strategy, "redrawn": result.redrawn,
                                                  "views": cams}, indent=2))
    print(f"wrote {len(cams)} views to {out} (silhouette agreement mean {float(result.agreement.mean()):.3f}, "
          f"{result.redrawn} redrawn for not showing the prompt)")
    return 0


def _view_steps(args: argparse.Namespace) -> int:
    from engine_server.pipelines.image_to_3d import ImageFitConfig

    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    return args.steps or ImageFitConfig.multiview_steps


def _reconstruct(args: argparse.Namespace):
    """``multiview --glb``: the image-to-3D pipeline (reference drawn from the prompt without --image); its views."""
    from engine_server.devices import resolve_device
    from engine_server.pipelines.image_to_3d import ImageFitConfig, ImageTo3D, ImageTo3DRequest

    glb = output_glb(args.glb, args.fit_steps, flag="--glb", steps_flag="--fit-steps")
    request = ImageTo3DRequest(image=args.image, prompt=args.prompt or "", seed=args.seed, model=args.model,
                               views=args.views,
                               overrides={KINDS["multiview"].steps_option: args.fit_steps} if args.fit_steps else {},
                               fit=ImageFitConfig(multiview_strategy=args.strategy, multiview_steps=_view_steps(args)))
    pipeline, mesh = run_in_process(partial(ImageTo3D, request, device=resolve_device(args.device)), glb)
    print(f"wrote {glb} ({len(mesh.faces)} faces) in {pipeline.timings['total_s']:.1f} s")
    return pipeline.views


def _views_only(args: argparse.Namespace):
    """The views alone: ``generate_views`` on the default rig."""
    from engine_server.devices import resolve_device
    from engine_server.guidance import PriorLoadError, load_prior, prior_defaults
    from engine_server.multiview import DEFAULT_ELEVATION, MultiViewConfig, ViewReference, default_rig, generate_views

    steps = _view_steps(args)
    try:
        prior = load_prior(args.model, device=resolve_device(args.device))
        res = int(getattr(prior, "resolution", 32))
        defaults = prior_defaults(prior)
        ranges = defaults.camera_ranges
        dist, fov = float(ranges.get("default_distance", 2.5)), float(ranges.get("default_fov", 42.0))
        reference, rig = None, default_rig(args.views, dist, fov, res)
        if args.image:  # prepared and placed as generate --image does (its pipeline's views stage)
            from engine_server.multiview.reference import (
                estimate_reference_camera,
                matte_reference,
                prepare_matte,
                read_image,
            )

            matte = matte_reference(read_image(args.image))
            img, _ = prepare_matte(matte, defaults.background_rgb or (1.0, 1.0, 1.0), res)
            cam = estimate_reference_camera(prior, img, dist, fov, DEFAULT_ELEVATION, seed=args.seed,
                                            coverage=matte.rgba[..., 3])
            reference = ViewReference(img, cam.c2w, cam.fov_y_deg)
            rig = default_rig(args.views, cam.distance, cam.fov_y_deg, res, start_azimuth=cam.azimuth_deg)
        cfg = MultiViewConfig(strategy=args.strategy, steps=steps, seed=args.seed)
        return generate_views(prior, rig, prompt=args.prompt, reference=reference, config=cfg)
    except (ValueError, PriorLoadError) as exc:
        raise usage_from(exc) from None


def cmd_refine(args: argparse.Namespace) -> int:
    from engine_server.devices import resolve_device
    from engine_server.export import read_mesh_file
    from engine_server.pipelines.refine import RefineMesh, RefineMeshRequest

    out = output_file(args.out, args.steps)
    fields = guidance_fields(args)

    def build(progress):  # a broken mesh file fails here, as one line like every other bad input
        vertices, faces, uvs = read_mesh_file(Path(args.mesh))
        request = RefineMeshRequest(
            prompt=args.prompt, vertices=vertices, faces=faces, uvs=uvs, mode=args.mode, seed=args.seed,
            preset=args.preset, model=args.model, overrides=_overrides(args, "refine"), **fields,
        )
        return RefineMesh(request, device=resolve_device(args.device), progress=progress)

    pipeline, result = run_in_process(build, out)
    print(f"wrote {out} ({len(result.faces)} faces, texture {result.texture.shape[0]}px, mode {args.mode}) "
          f"in {pipeline.timings['total_s']:.1f} s")
    return 0
