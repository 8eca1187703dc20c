"""What every verb of the command line shares: the usage error, the job flags, progress bars, output checks.

Imports stay light at module level (argparse, the torch-free preset table): ``engine-server
--help`` must answer before torch is loaded.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from engine_server.pipelines.presets import DEFAULT_PRESET, PRESETS
from engine_server.wire.protocol import FACES_RANGE, TEXTURE_SIZE_RANGE


class UsageError(Exception):
    """A bad argument or input: printed as one line, exit status 2."""


def add_job_flags(p: argparse.ArgumentParser, *, steps_help: str, preset: bool = True) -> None:
    """The flags of every in-process job verb: --preset, --seed, --model, --device, --steps."""
    if preset:
        p.add_argument("--preset", default=DEFAULT_PRESET, choices=list(PRESETS), help="quality preset")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--model", default="bundled", metavar="PATH_OR_ID",
                   help="prior: bundled, a folder, a single-file checkpoint or a hub id")
    add_model_config_flag(p)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--steps", type=int, default=None, help=steps_help)


def add_model_config_flag(p: argparse.ArgumentParser) -> None:
    """--model-config, beside every --model: the diffusers config a single-file --model is built from."""
    p.add_argument("--model-config", default=None, metavar="REPO_OR_FOLDER",
                   help="for a single-file --model (.safetensors / .ckpt): the diffusers config to build it from, a "
                        "hub id or a local diffusers folder (default: the live mirror a NAME.yaml beside the file "
                        "implies; SD 1.x files need none, SD 2.x ones need this or the .yaml to say base or 768-v)")


def use_model_config(args: argparse.Namespace) -> None:
    """Make this process build ``--model`` from ``--model-config`` wherever it loads it (the pipelines load their
    request's model by name; ``serve`` passes it to its workers itself)."""
    if getattr(args, "model_config", None) is None:
        return
    if not Path(args.model).expanduser().is_file():
        raise UsageError(f"--model-config applies to a single-file --model (.safetensors / .ckpt); {args.model!r} is "
                         "no file (a folder or hub id brings its own configs)")
    from engine_server.guidance.prior import set_single_file_config

    set_single_file_config(args.model, args.model_config)


def add_guidance_flags(p: argparse.ArgumentParser, perp_neg: bool = False) -> None:
    """The distillation flags of the generating verbs; unset ones leave the prior's defaults (``doctor`` shows them).
    ``perp_neg``: also --perp-neg (the verbs whose text prompts go to a text-to-image prior)."""
    p.add_argument("--guidance", default="sds", choices=["sds", "vsd"], help="score distillation mode")
    p.add_argument("--guidance-scale", type=float, default=None, metavar="S",
                   help="classifier-free guidance scale (default: the prior's for the mode, e.g. 100 for SDS "
                        "and 7.5 for VSD with Stable Diffusion)")
    p.add_argument("--negative-prompt", default="", metavar="TEXT", help="what to avoid")
    if perp_neg:
        p.add_argument("--perp-neg", action="store_true",
                       help="Perp-Neg against multi-faced (Janus) objects: text-to-image priors such as Stable "
                            "Diffusion; two extra denoiser passes per step")
    p.add_argument("--render-size", type=int, default=None, metavar="PX",
                   help="render size during distillation (default: the prior's; latent priors' renders are "
                        "upsampled for their encoder)")


def add_asset_flags(p: argparse.ArgumentParser) -> None:
    """The flags that shape the exported asset: --faces, --texture-size (unset: the preset's)."""
    p.add_argument("--faces", type=int, default=None, metavar="N",
                   help=f"most triangles of the mesh, {FACES_RANGE[0]:,} to {FACES_RANGE[1]:,} "
                        "(quadric decimation before the UV unwrap; default: the preset's)")
    p.add_argument("--texture-size", type=int, default=None, metavar="PX",
                   help=f"pixels per side of the base-colour and normal maps, {TEXTURE_SIZE_RANGE[0]} to "
                        f"{TEXTURE_SIZE_RANGE[1]} (default: the preset's)")


IMAGE_FIT_FLAGS = ("hybrid", "hybrid_weight", "view_start_range", "view_widen", "depth_weight", "normal_weight",
                   "bsd_steps", "bsd_t_start", "bsd_t_end")
"""The ImageFitConfig fields :func:`add_image_fit_flags` sets (flag: the name with dashes)."""


def add_image_fit_flags(p: argparse.ArgumentParser) -> None:
    """The DreamCraft3D stages of image to 3D (issue 25); unset ones keep the image fit's defaults."""
    g = p.add_argument_group("image to 3D, DreamCraft3D stages (with --image)")
    g.add_argument("--hybrid", action="store_true", default=None,
                   help="hybrid distillation: a text-to-image prior's SDS on the prompt plus --hybrid-weight x the "
                        "novel-view prior's (needs a prompt)")
    g.add_argument("--hybrid-weight", type=float, default=None, metavar="MU",
                   help="weight of the novel-view prior beside the text prior's (default 2, as in DreamCraft3D)")
    g.add_argument("--text-model", default=None, metavar="PATH_OR_ID",
                   help="the hybrid's text-to-image prior (default: --model when it reads prompts, as the bundled "
                        "one does; a Zero123 --model needs e.g. a Stable Diffusion folder here)")
    g.add_argument("--view-start-range", type=float, default=None, metavar="DEG",
                   help="progressive views: distillation starts within DEG degrees of the reference camera and "
                        "widens to all around (default: all around from the start)")
    g.add_argument("--view-widen", type=float, default=None, metavar="F",
                   help="fraction of the distillation over which the views widen to 360 degrees (default 0.5)")
    g.add_argument("--depth-weight", type=float, default=None, metavar="W",
                   help="geometry alignment: depth term against the silhouettes' visual hull (default 0: off)")
    g.add_argument("--normal-weight", type=float, default=None, metavar="W",
                   help="geometry alignment: normal term against the visual hull's smoothed normals (default 1; "
                        "0: off)")
    g.add_argument("--bsd-steps", type=int, default=None, metavar="N",
                   help="bootstrapped score distillation: N steps after the coarse fit that fine-tune a LoRA copy of "
                        "the novel-view prior on the object's own renders (noised to t' and denoised) and fit the "
                        "object against it with VSD (default 0: off)")
    g.add_argument("--bsd-t-start", type=float, default=None, metavar="F",
                   help="BSD's t' at the stage's start, a fraction of the timesteps (default 0.6)")
    g.add_argument("--bsd-t-end", type=float, default=None, metavar="F",
                   help="BSD's t' at the stage's end, at most --bsd-t-start (default 0.3)")


def image_fit_fields(args: argparse.Namespace) -> dict:
    """``{"fit": ImageFitConfig, "text_model": ...}`` from :func:`add_image_fit_flags` (checked); {} without any."""
    given = {name: getattr(args, name) for name in IMAGE_FIT_FLAGS if getattr(args, name) is not None}
    if not given and args.text_model is None:
        return {}
    flags = ", ".join("--" + n.replace("_", "-") for n in [*given, *(["text_model"] if args.text_model else [])])
    if not args.image:
        raise UsageError(f"{flags} apply to image to 3D: give --image REF.png")
    from engine_server.pipelines.image_to_3d import ImageFitConfig

    try:
        fit = ImageFitConfig(**given)
    except ValueError as exc:  # names the field and its bounds
        name = str(exc).split(" ")[0].removeprefix("ImageFitConfig.")
        raise UsageError(str(exc).replace(f"ImageFitConfig.{name}", "--" + name.replace("_", "-"))) from None
    return {"fit": fit, "text_model": args.text_model}


def asset_overrides(args: argparse.Namespace) -> dict:
    """The preset overrides of :func:`add_asset_flags` (checked; the same bounds as the wire's)."""
    over = {}
    for flag, key, (lo, hi) in (("--faces", "faces", FACES_RANGE), ("--texture-size", "texture_size", TEXTURE_SIZE_RANGE)):
        value = getattr(args, key)
        if value is not None:
            if not lo <= value <= hi:
                raise UsageError(f"{flag} must be in [{lo}, {hi}], got {value}")
            over[key] = value
    return over


def guidance_fields(args: argparse.Namespace) -> dict:
    """The request fields of :func:`add_guidance_flags` (checked), without the render size (a preset override)."""
    if args.guidance_scale is not None and args.guidance_scale < 0:
        raise UsageError(f"--guidance-scale must be >= 0, got {args.guidance_scale}")
    if args.render_size is not None and not 8 <= args.render_size <= 2048:
        raise UsageError(f"--render-size must be in [8, 2048], got {args.render_size}")
    fields = {"guidance": args.guidance, "guidance_scale": args.guidance_scale, "negative_prompt": args.negative_prompt}
    if getattr(args, "perp_neg", False):
        fields["perp_neg"] = True
    return fields


def usage_from(exc: Exception) -> UsageError:
    """A one-line UsageError from a pipeline's ValueError / PriorLoadError (first line of long messages)."""
    text = str(exc)
    return UsageError((text.splitlines()[0] if len(text) > 400 else text) or type(exc).__name__)


def output_glb(path: str, steps: int | None = None, flag: str = "--out", steps_flag: str = "--steps") -> Path:
    """``flag`` checked (a .glb in an existing folder) as a Path; ``steps_flag`` checked when given."""
    if Path(path).suffix.lower() != ".glb":
        raise UsageError(f"{flag} must be a .glb file, got {path!r}")
    return _output(Path(path), steps, steps_flag)


def output_file(path: str, steps: int | None = None, flag: str = "--out", steps_flag: str = "--steps") -> Path:
    """``flag`` checked as a Path: an export format's extension (.glb, .obj, .usd/.usda/.usdc, .usdz; USD needs
    usd-core) in an existing folder; ``steps_flag`` checked when given. Fails before any work."""
    from engine_server.export import format_of

    try:
        format_of(path)
    except ValueError as exc:
        raise UsageError(f"{flag}: {exc}") from None
    return _output(Path(path), steps, steps_flag)


def _output(out: Path, steps: int | None, steps_flag: str) -> Path:
    if not out.parent.exists():
        raise UsageError(f"output folder {str(out.parent)!r} does not exist")
    if steps is not None and steps < 1:
        raise UsageError(f"{steps_flag} must be >= 1, got {steps}")
    return out


class StageBars:
    """A pipeline progress callback: one tqdm bar per stage, optional preview PNGs into a folder."""

    def __init__(self, previews: Path | None = None) -> None:
        self.bars: dict = {}
        self.previews = previews
        if previews is not None:
            previews.mkdir(parents=True, exist_ok=True)

    def __call__(self, event) -> None:
        from tqdm import tqdm

        bar = self.bars.get(event.stage)
        if bar is None:
            self.close()  # the previous stage is over
            bar = self.bars[event.stage] = tqdm(total=event.total, desc=event.stage, unit="step", leave=True)
        bar.n = event.step
        if event.loss is not None:
            bar.set_postfix(loss=f"{event.loss:.4g}", refresh=False)
        bar.refresh()
        if self.previews is not None and event.preview is not None:
            from PIL import Image

            Image.fromarray(event.preview).save(self.previews / f"{event.stage}-{event.step:05d}.png")

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


def run_in_process(build, out: Path, previews: Path | None = None):
    """Build a pipeline with progress bars (``build(progress=...)``) and run it into ``out`` -> (pipeline, result).

    A bad input (image, mesh, prompt words, preset values) or a missing model becomes one UsageError line.
    """
    from engine_server.guidance import PriorLoadError

    progress = StageBars(previews)
    try:
        pipeline = build(progress=progress)
        result = pipeline.run(out)
    except (ValueError, PriorLoadError) as exc:
        raise usage_from(exc) from None
    finally:
        progress.close()
    return pipeline, result


def format_table(rows: list[dict]) -> str:
    """Rows of dicts as an aligned text table (columns from the first row)."""
    if not rows:
        return "(no rows)"
    cols = list(rows[0])

    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return str(v)

    cells = [[cell(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
