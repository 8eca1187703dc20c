"""``engine-server refine MESH.glb "PROMPT" --out OUT.glb``: the refine job, in-process (no server).

Registered by ``engine_server.cli`` through :func:`add_parser`. Bad input (unreadable
mesh, empty or broken mesh, unknown prompt words, bad options) ends with one line and
exit status 2, via the CLI's ``UsageError``.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``refine`` subcommand to the CLI's subparsers."""
    p = subparsers.add_parser("refine", help="mesh + prompt -> refined textured GLB, in-process (no server)")
    p.add_argument("mesh", metavar="MESH.glb", help="input mesh (GLB / glTF / OBJ / PLY, anything trimesh reads)")
    p.add_argument("prompt", help='what it should become, e.g. "a green cube"')
    p.add_argument("--out", required=True, metavar="OUT.glb", help="where to write the GLB (+ a .json sidecar)")
    p.add_argument("--mode", default="full", choices=["full", "texture"],
                   help="full: geometry + texture; texture: keep the geometry, only paint it")
    p.add_argument("--preset", default="draft", choices=["draft", "standard", "high"], help="quality preset")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--steps", type=int, default=None, help="refinement steps (overrides the preset)")
    p.add_argument("--model", default="bundled", metavar="PATH_OR_ID", help="prior: bundled, a folder or a hub id")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.set_defaults(func=cmd_refine)
    return p


def _load_mesh(path: Path):
    """(vertices, faces, uvs or None) of a mesh file, engine coordinates; ValueError when unusable."""
    from engine_server.export import load_glb

    if not path.is_file():
        raise ValueError(f"no such mesh file: {path}")
    if path.suffix.lower() in (".glb", ".gltf"):
        try:
            loaded = load_glb(path)
        except (ValueError, OSError, KeyError, IndexError) as exc:
            raise ValueError(f"cannot read {path} as a glTF mesh: {exc}") from None
        return loaded.vertices, loaded.faces, loaded.uvs
    import numpy as np
    import trimesh

    try:
        mesh = trimesh.load(path, force="mesh", process=False)
    except (ValueError, OSError, KeyError, IndexError) as exc:
        raise ValueError(f"cannot read {path} as a mesh: {exc}") from None
    if not isinstance(mesh, trimesh.Trimesh) or len(mesh.faces) == 0:
        raise ValueError(f"{path} holds no triangle mesh")
    return np.asarray(mesh.vertices), np.asarray(mesh.faces), None


def cmd_refine(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from engine_server.cli import UsageError
    from engine_server.guidance import PriorLoadError
    from engine_server.pipelines.events import ProgressEvent
    from engine_server.pipelines.refine import RefineMesh, RefineMeshRequest

    out = Path(args.out)
    if out.suffix.lower() != ".glb":
        raise UsageError(f"--out must be a .glb file, got {args.out!r}")
    if not out.parent.exists():
        raise UsageError(f"output folder {str(out.parent)!r} does not exist")
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    bars: dict[str, tqdm] = {}

    def progress(event: ProgressEvent) -> None:
        bar = bars.get(event.stage)
        if bar is None:
            for other in bars.values():
                other.close()
            bar = bars[event.stage] = tqdm(total=event.total, desc=event.stage, unit="step", leave=True)
        bar.n = event.step
        if event.loss is not None:
            bar.set_postfix(loss=f"{event.loss:.4g}", refresh=False)
        bar.refresh()

    try:
        vertices, faces, uvs = _load_mesh(Path(args.mesh))
        request = RefineMeshRequest(
            prompt=args.prompt, vertices=vertices, faces=faces, uvs=uvs, mode=args.mode, seed=args.seed,
            preset=args.preset, model=args.model, overrides={"steps": args.steps} if args.steps else {},
        )
        pipeline = RefineMesh(request, device=device, progress=progress)
        result = pipeline.run(out)
    except (ValueError, PriorLoadError) as exc:  # broken mesh, unknown prompt words, bad options, missing model
        text = str(exc)
        raise UsageError(text.splitlines()[0] if text else type(exc).__name__) from None
    finally:
        for bar in bars.values():
            bar.close()
    print(f"wrote {out} ({len(result.faces)} faces, texture {result.texture.shape[0]}px, mode {args.mode}) "
          f"in {pipeline.timings['total_s']:.1f} s")
    return 0
