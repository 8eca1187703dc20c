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
    from engine_server.cli import output_glb, pick_device, run_in_process
    from engine_server.pipelines.refine import RefineMesh, RefineMeshRequest

    out = output_glb(args.out, args.steps)

    def build(progress):  # a broken mesh file fails here, as one line like every other bad input
        vertices, faces, uvs = _load_mesh(Path(args.mesh))
        request = RefineMeshRequest(
            prompt=args.prompt, vertices=vertices, faces=faces, uvs=uvs, mode=args.mode, seed=args.seed,
            preset=args.preset, model=args.model, overrides={"steps": args.steps} if args.steps else {},
        )
        return RefineMesh(request, device=pick_device(args.device), progress=progress)

    pipeline, result = run_in_process(build, out)
    print(f"wrote {out} ({len(result.faces)} faces, texture {result.texture.shape[0]}px, mode {args.mode}) "
          f"in {pipeline.timings['total_s']:.1f} s")
    return 0
