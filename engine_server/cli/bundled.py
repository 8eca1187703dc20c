"""The bundled prior's verbs: ``train-bundled``, ``eval-bundled``, ``export-bundled`` and ``eval-text-to-3d``."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from engine_server.cli.common import UsageError
from engine_server.pipelines.presets import DEFAULT_PRESET, PRESETS

DEFAULT_RUN_DIR = "runs/bundled"


def add_train_parser(sub) -> argparse.ArgumentParser:
    """``train-bundled``: train (or resume) the bundled prior."""
    p = sub.add_parser("train-bundled", help="train the bundled diffusion prior (resumes from its checkpoint)")
    p.add_argument("--out", default=DEFAULT_RUN_DIR, help="run folder: checkpoint, data cache, EMA export")
    p.add_argument("--seed", type=int, default=0, help="seed of init, data and noise")
    p.add_argument("--steps", type=int, default=None, help="total steps (default: the ~2 h schedule)")
    p.add_argument("--batch-size", type=int, default=None, help="images per step")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--views", type=int, default=None, help="rendered training cameras per shape")
    p.add_argument("--minutes", type=float, default=0.0, help="stop after this many minutes (0: no limit)")
    p.add_argument("--threads", type=int, default=-1,
                   help="torch CPU threads (-1: adapt to the load of a shared CPU; 0: torch default)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="steps between checkpoints")
    p.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    p.add_argument("--init-from", default="", help="start a new run from this model folder's weights (fine-tuning)")
    p.add_argument("--shape-camera", action="store_true",
                   help="add the shape-camera embedding (a shape word's own turn with the azimuth; starts at zero)")
    p.add_argument("--warmup", type=int, default=None, help="linear warm-up steps")
    p.add_argument("--export", action="store_true",
                   help="when training stops, copy the EMA weights into the package and run eval + model card")
    p.set_defaults(func=cmd_train)
    return p


def add_eval_parser(sub) -> argparse.ArgumentParser:
    """``eval-bundled``: score the bundled prior on held-out cameras."""
    p = sub.add_parser("eval-bundled", help="evaluate the bundled prior on held-out cameras")
    p.add_argument("--weights", default=None, help="model folder (default: the shipped weights)")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.add_argument("--steps", type=int, default=None, help="DDIM sampling steps")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--write-card", action="store_true", help="(re)write MODEL_CARD.md beside the weights")
    p.add_argument("--grid", default=None, help="save a PNG grid of samples here")
    p.set_defaults(func=cmd_eval)
    return p


def add_export_parser(sub) -> argparse.ArgumentParser:
    """``export-bundled``: copy a run's EMA weights into the package, evaluate, write the card."""
    p = sub.add_parser("export-bundled", help="export a training run's EMA weights into the package + eval + card")
    p.add_argument("--run", default=DEFAULT_RUN_DIR, help="run folder written by train-bundled")
    p.add_argument("--json", action="store_true", help="print the eval table as JSON")
    p.set_defaults(func=cmd_export)
    return p


def add_eval_text_parser(sub) -> argparse.ArgumentParser:
    """``eval-text-to-3d``: text to 3D on the vocabulary, scored against the procedural ground truth."""
    p = sub.add_parser("eval-text-to-3d",
                       help="run text to 3D on the bundled vocabulary and score the meshes at held-out cameras")
    p.add_argument("--shapes", default=None, metavar="S,S", help="shape words (default: all)")
    p.add_argument("--colours", "--colors", dest="colours", default=None, metavar="C,C",
                   help="colour words, each with every shape (default: one colour per shape)")
    p.add_argument("--seeds", type=int, default=2, metavar="N", help="seeds 0..N-1 per prompt")
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=list(PRESETS), help="the pipeline's preset")
    p.add_argument("--steps", type=int, default=None, help="coarse steps (default: the preset's)")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                   help="write the result as JSON to FILE (no FILE: print it instead of the table)")
    p.add_argument("--keep", default=None, metavar="DIR",
                   help="keep the GLBs and coarse checkpoints here; a rerun resumes them (re-scores extraction and "
                        "texturing without distilling again: remove the folder after changing the coarse stage)")
    p.add_argument("--write-card", action="store_true", help="(re)write the card beside the prior's MODEL_CARD.md")
    p.set_defaults(func=cmd_eval_text)
    return p


def add_parsers(sub) -> None:
    """Register every bundled-prior command on an argparse subparsers object."""
    add_train_parser(sub)
    add_eval_parser(sub)
    add_export_parser(sub)
    add_eval_text_parser(sub)


def cmd_train(args: argparse.Namespace) -> int:
    """Run train-bundled."""
    from engine_server.models.bundled.train import TrainConfig, train

    cfg = TrainConfig(out_dir=args.out, seed=args.seed, max_minutes=args.minutes, threads=args.threads,
                      init_from=args.init_from)
    cfg.model.shape_camera = args.shape_camera
    for name, attr in (("steps", "steps"), ("batch_size", "batch_size"), ("lr", "lr"), ("views", "views_per_shape"),
                       ("checkpoint_every", "checkpoint_every"), ("warmup", "warmup")):
        value = getattr(args, name, None)
        if value is not None:
            setattr(cfg, attr, value)
    result = train(cfg, resume=not args.no_resume)
    tail = result["losses"][-200:]
    print(f"trained to step {result['step']} on {result['device']} in {result['seconds'] / 60:.1f} min; "
          f"mean loss of the last {len(tail)} steps {sum(tail) / max(1, len(tail)):.4f}; EMA weights: {result['ema_dir']}")
    if args.export:
        ns = argparse.Namespace(run=args.out, json=False)
        return cmd_export(ns)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Run eval-bundled."""
    from engine_server.models.bundled.evaluate import EvalConfig, evaluate, format_rows, write_model_card
    from engine_server.models.bundled.prior import DEFAULT_WEIGHTS_DIR
    from engine_server.models.bundled.train import adapt_threads

    adapt_threads()  # two OpenMP threads on a busy 2-core machine are slower than one

    cfg = EvalConfig()
    if args.steps is not None:
        cfg.steps = args.steps
    if args.guidance is not None:
        cfg.guidance_scale = args.guidance
    folder = Path(args.weights) if args.weights else DEFAULT_WEIGHTS_DIR
    result = evaluate(folder, cfg, grid_path=args.grid)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_rows(result))
    if args.write_card:
        path = write_model_card(folder, result)
        if not args.json:
            print(f"wrote {path}")
    return 0 if result["passed"] else 1


def cmd_export(args: argparse.Namespace) -> int:
    """Run export-bundled."""
    from engine_server.models.bundled.evaluate import export_run
    from engine_server.models.bundled.train import adapt_threads

    adapt_threads()

    result, card = export_run(Path(args.run))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        from engine_server.models.bundled.evaluate import format_rows

        print(format_rows(result))
        print(f"wrote {card}")
    return 0



def cmd_eval_text(args: argparse.Namespace) -> int:
    """Run eval-text-to-3d; exit status 1 when the issue's bar is not met."""
    from engine_server.models.bundled.train import adapt_threads
    from engine_server.pipelines.evaluate_text import TextEvalConfig, as_json, evaluate, format_table, write_card

    words = lambda text: tuple(w.strip() for w in text.split(",") if w.strip())  # noqa: E731
    overrides = {"coarse_steps": args.steps} if args.steps is not None else {}
    try:
        PRESETS[args.preset].override(**overrides)  # a bad --steps fails here, before any work
        cfg = TextEvalConfig(preset=args.preset, seeds=args.seeds, overrides=overrides,
                             **({"shapes": words(args.shapes)} if args.shapes is not None else {}),
                             **({"colors": words(args.colours)} if args.colours is not None else {}))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    adapt_threads()
    result = evaluate(cfg, out_dir=args.keep)
    if args.json == "-":
        print(as_json(result))
    else:
        print(format_table(result))
        if args.json:
            Path(args.json).write_text(as_json(result) + "\n")
    if args.write_card:
        path = write_card(result)
        if args.json != "-":
            print(f"wrote {path}")
    return 0 if result["passed"] else 1
