"""``engine-server info`` (versions, devices, kernel backends, model search paths) and ``bench TARGET``."""
from __future__ import annotations

import argparse
import importlib
import json

from engine_server import __version__
from engine_server.cli.common import UsageError, format_table

BENCHES: dict[str, str] = {
    "geometry": "engine_server.geometry.bench:run",
    "guidance": "engine_server.guidance.bench:run",
    "kernels": "kernels.hashgrid.bench:run",
    "pipeline": "engine_server.pipelines.bench:run",
    "rasterize": "kernels.rasterize.bench:run",
    "cluster": "engine_server.service.bench:run_cluster",
    "draft": "engine_server.pipelines.bench:run_draft",
    "server": "engine_server.service.bench:run",
    "texture": "engine_server.texture.bench:run",
}
"""Benchmark targets: name -> "module:function". The function takes the parsed
arguments and returns {"title": str, "rows": [dict, ...]} (plus any extra keys)."""


def add_parsers(sub) -> None:
    p = sub.add_parser("info", help="versions, devices, kernel backends, model search paths (and a Ray cluster)")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.add_argument("--ray-address", default=None, metavar="auto|HOST:PORT",
                   help="also show this Ray cluster: its nodes, GPUs and CPUs, the engine's actors and the job each runs")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("bench", help="benchmarks, measured side by side in one run")
    p.add_argument("target", choices=sorted(BENCHES), help="what to measure")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                   help="write results as JSON to FILE (stdout when no FILE)")
    p.add_argument("--repeat", type=int, default=5, help="timed repetitions per measurement")
    p.add_argument("--points", type=int, default=65536, help="points per batch (kernels)")
    p.add_argument("--jobs", type=int, default=4, help="tiny jobs per actor count (cluster)")
    p.add_argument("--variant", action="append", metavar="NAME:KEY=VALUE,...",
                   help="draft: also run the draft preset with these overrides, e.g. fast:coarse_steps=120 "
                        "(repeatable)")
    p.add_argument("--seed", type=int, default=0, help="draft: the runs' seed")
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
    cluster = _cluster(args.ray_address) if args.ray_address else None
    if args.json:
        print(json.dumps(info | ({"cluster": cluster} if cluster else {}), indent=2))
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
    if cluster:
        _print_cluster(cluster)
    return 0


def _cluster(address: str) -> dict:
    """The Ray cluster at ``address`` (ray_executor.cluster_info); UsageError without Ray or a cluster."""
    try:
        from engine_server.service.ray_executor import ClusterError, cluster_info
    except ImportError as exc:
        raise UsageError(f"--ray-address needs Ray ({exc}): pip install -e \".[cluster]\"") from None
    try:
        return cluster_info(address)
    except ClusterError as exc:
        raise UsageError(str(exc)) from None


def _print_cluster(cluster: dict) -> None:
    print(f"cluster          {cluster['address']}: {len(cluster['nodes'])} node(s), {cluster['gpus']:g} GPU(s), "
          f"{cluster['cpus']:g} CPU(s)")
    print(format_table([{"node": n["node"], "ip": n["ip"], "alive": n["alive"], "gpus": n["gpus"], "cpus": n["cpus"],
                         "object_store_mib": n["object_store_mib"]} for n in cluster["nodes"]]))
    if not cluster["actors"]:
        print("engine actors    none (no engine-server serve --executor ray on this cluster)")
        return
    print(format_table([{"actor": a["name"], "state": a["state"], "node": a.get("node", "-"),
                         "pid": a.get("pid", "-"), "device": a.get("device", "-"), "job": a.get("job") or "-",
                         "jobs_run": a.get("jobs_run", "-")} for a in cluster["actors"]]))


def _model_search_paths() -> list[str]:
    """Where a --model name is looked up, in order."""
    import os

    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.expanduser("~/.cache/huggingface")), "hub"
    )
    return ["a local folder given as --model PATH", f"the Hugging Face cache: {hub}"]


def cmd_bench(args: argparse.Namespace) -> int:
    if args.variant:
        if args.target != "draft":
            raise UsageError("--variant is for `bench draft`")
        from engine_server.pipelines.bench import parse_variants

        try:
            parse_variants(args.variant)
        except ValueError as exc:
            raise UsageError(f"--variant: {exc}") from None
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
