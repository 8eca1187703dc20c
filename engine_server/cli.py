"""The ``engine-server`` command line.

Each subcommand imports what it needs when it runs, so ``engine-server --help``
stays fast and a missing optional dependency only affects the command using it.
Only this module configures logging handlers.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys

from engine_server import __version__

logger = logging.getLogger(__name__)

BENCHES: dict[str, str] = {
    "geometry": "engine_server.geometry.bench:run",
    "guidance": "engine_server.guidance.bench:run",
    "kernels": "kernels.hashgrid.bench:run",
    "pipeline": "engine_server.pipelines.bench:run",
    "rasterize": "kernels.rasterize.bench:run",
    "server": "engine_server.server:bench",
    "texture": "engine_server.texture.bench:run",
}
"""Benchmark targets: name -> "module:function". The function takes the parsed
arguments and returns {"title": str, "rows": [dict, ...]} (plus any extra keys)."""


class UsageError(Exception):
    """A bad argument or input: printed as one line, exit status 2."""


def _load(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


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


def cmd_info(args: argparse.Namespace) -> int:
    import platform

    import numpy
    import torch

    from kernels.hashgrid import backend_status

    info: dict = {
        "engine_server": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
    }
    for name in ("diffusers", "transformers", "peft", "trimesh", "xatlas", "zmq", "triton"):
        try:
            info[name] = getattr(importlib.import_module(name), "__version__", "installed")
        except ImportError as exc:
            info[name] = f"not installed ({exc})"
    devices = [f"cpu ({torch.get_num_threads()} threads)"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    info["devices"] = devices
    info["hashgrid_backends"] = {name: st.describe() for name, st in backend_status().items()}
    info["model_search"] = _model_search_paths()
    from engine_server.models.bundled import bundled_info

    info["bundled_model"] = {k: (", ".join(map(str, v)) if isinstance(v, (list, tuple)) else
                                 json.dumps(v) if isinstance(v, dict) else v)
                             for k, v in bundled_info().items()}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k:<12} {v}")
        elif isinstance(value, list):
            print(f"{key}:")
            for v in value:
                print(f"  {v}")
        else:
            print(f"{key:<16} {value}")
    return 0


def _model_search_paths() -> list[str]:
    """Where a --model name is looked up, in order."""
    import os

    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub"
    )
    return ["a local folder given as --model PATH", f"the Hugging Face cache: {hub}"]


def cmd_bench(args: argparse.Namespace) -> int:
    result = _load(BENCHES[args.target])(args)
    if args.json is not None:
        text = json.dumps(result, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
            print(f"wrote {args.json}")
    if args.json != "-":
        print(result.get("title", args.target))
        print(format_table(result["rows"]))
        for line in result.get("notes", []):
            print(line)
    return 0


# ---------------------------------------------------------------- shared by the pipeline commands
def usage_from(exc: Exception) -> UsageError:
    """A one-line UsageError from a pipeline's ValueError / PriorLoadError (first line of long messages)."""
    text = str(exc)
    return UsageError((text.splitlines()[0] if len(text) > 400 else text) or type(exc).__name__)


def output_glb(path: str, steps: int | None = None, flag: str = "--out", steps_flag: str = "--steps"):
    """``flag`` checked (a .glb in an existing folder) as a Path; ``steps_flag`` checked when given."""
    from pathlib import Path

    out = Path(path)
    if out.suffix.lower() != ".glb":
        raise UsageError(f"{flag} must be a .glb file, got {path!r}")
    if not out.parent.exists():
        raise UsageError(f"output folder {str(out.parent)!r} does not exist")
    if steps is not None and steps < 1:
        raise UsageError(f"{steps_flag} must be >= 1, got {steps}")
    return out


def pick_device(name: str) -> str:
    """``--device auto`` -> cuda when available, else cpu."""
    import torch

    return name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


class StageBars:
    """A pipeline progress callback: one tqdm bar per stage, optional preview PNGs into a folder."""

    def __init__(self, previews=None) -> None:
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


def run_in_process(build, out, previews=None):
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


def cmd_generate(args: argparse.Namespace) -> int:
    from functools import partial
    from pathlib import Path

    from engine_server.pipelines.text_to_3d import TextTo3D, TextTo3DRequest

    if getattr(args, "image", None):
        from engine_server.multiview.commands import cmd_generate_image

        return cmd_generate_image(args)
    if not args.prompt:
        raise UsageError("give a PROMPT or --image REF.png")
    out = output_glb(args.out, args.steps)
    request = TextTo3DRequest(
        prompt=args.prompt, seed=args.seed, preset=args.preset, model=args.model, guidance=args.guidance,
        overrides={"coarse_steps": args.steps} if args.steps else {},
    )
    pipeline, result = run_in_process(partial(TextTo3D, request, device=pick_device(args.device)), out,
                                      Path(args.previews) if args.previews else None)
    total = pipeline.timings["total_s"]
    print(f"wrote {out} ({len(result.faces)} faces, texture {result.texture.shape[0]}px) in {total:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engine-server", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"engine-server {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="versions, devices, kernel backends, model search paths")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help="prompt -> textured GLB, in-process (no server)")
    p.add_argument("prompt", nargs="?", default=None, help='what to make, e.g. "a red cube"')
    p.add_argument("--image", metavar="REF.png", default=None, help="reference image: image to 3D")
    p.add_argument("--out", required=True, metavar="FILE.glb", help="where to write the GLB (+ a .json sidecar)")
    p.add_argument("--preset", default="draft", choices=["draft", "standard", "high"], help="quality preset")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--model", default="bundled", metavar="PATH_OR_ID", help="prior: bundled, a folder or a hub id")
    p.add_argument("--guidance", default="sds", choices=["sds", "vsd"], help="score distillation mode")
    p.add_argument("--steps", type=int, default=None, help="distillation steps (overrides the preset)")
    p.add_argument("--previews", metavar="DIR", default=None, help="save preview renders here")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.set_defaults(func=cmd_generate)

    from engine_server.models.bundled import commands as bundled_commands

    bundled_commands.add_parsers(sub)

    from engine_server.multiview import commands as multiview_commands

    multiview_commands.add_multiview_parser(sub)

    from engine_server.pipelines import refine_commands

    refine_commands.add_parser(sub)

    from engine_server import server_commands

    server_commands.add_parsers(sub)

    p = sub.add_parser("bench", help="benchmarks, measured side by side in one run")
    p.add_argument("target", choices=sorted(BENCHES), help="what to measure")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                   help="write results as JSON to FILE (stdout when no FILE)")
    p.add_argument("--repeat", type=int, default=5, help="timed repetitions per measurement")
    p.add_argument("--points", type=int, default=65536, help="points per batch (kernels)")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"engine-server {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
