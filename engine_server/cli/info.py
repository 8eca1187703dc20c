"""``engine-server info`` (versions, devices, kernel backends, model search paths) and ``bench TARGET``."""
from __future__ import annotations

import argparse
import importlib
import json

from engine_server import __version__
from engine_server.cli.common import format_table

BENCHES: dict[str, str] = {
    "geometry": "engine_server.geometry.bench:run",
    "guidance": "engine_server.guidance.bench:run",
    "kernels": "kernels.hashgrid.bench:run",
    "pipeline": "engine_server.pipelines.bench:run",
    "rasterize": "kernels.rasterize.bench:run",
    "server": "engine_server.service.bench:run",
    "texture": "engine_server.texture.bench:run",
}
"""Benchmark targets: name -> "module:function". The function takes the parsed
arguments and returns {"title": str, "rows": [dict, ...]} (plus any extra keys)."""


def add_parsers(sub) -> None:
    p = sub.add_parser("info", help="versions, devices, kernel backends, model search paths")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("bench", help="benchmarks, measured side by side in one run")
    p.add_argument("target", choices=sorted(BENCHES), help="what to measure")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                   help="write results as JSON to FILE (stdout when no FILE)")
    p.add_argument("--repeat", type=int, default=5, help="timed repetitions per measurement")
    p.add_argument("--points", type=int, default=65536, help="points per batch (kernels)")
    p.set_defaults(func=cmd_bench)


def _version(name: str) -> str:
    """An installed package's version from its metadata, without importing it (diffusers alone takes seconds)."""
    from importlib import metadata

    dist = {"zmq": "pyzmq"}.get(name, name)
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def cmd_info(args: argparse.Namespace) -> int:
    import platform

    import torch

    from engine_server.models.bundled import bundled_info
    from kernels.hashgrid import backend_status

    info: dict = {
        "engine_server": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
    }
    for name in ("numpy", "diffusers", "transformers", "peft", "trimesh", "xatlas", "zmq", "triton"):
        info[name] = _version(name)
    devices = [f"cpu ({torch.get_num_threads()} threads)"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    info["devices"] = devices
    info["hashgrid_backends"] = {name: st.describe() for name, st in backend_status().items()}
    info["model_search"] = _model_search_paths()
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
    module, _, attr = BENCHES[args.target].partition(":")
    result = getattr(importlib.import_module(module), attr)(args)
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
