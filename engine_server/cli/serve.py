"""The service verbs: ``serve`` and ``jobs [list | show ID | result ID --out FILE | delete ID]``.

``serve`` runs the ZeroMQ server with the real worker: child processes on this machine, or
actors on a Ray cluster with ``--executor ray`` (``--protocol-only`` for none).
``jobs`` reads the job store folder directly (SQLite in WAL mode, opened without taking
the server's lock), so it works the same whether a server is running or not; ``delete``
refuses a running job. Failures print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from engine_server.cli.common import UsageError, add_model_config_flag, output_glb
from engine_server.wire.protocol import DEFAULT_ENDPOINT


def add_parsers(sub) -> None:
    """Register ``serve`` and ``jobs``."""
    add_serve_parser(sub)
    add_jobs_parser(sub)


def add_serve_parser(sub) -> argparse.ArgumentParser:
    """``serve``: run the engine server."""
    p = sub.add_parser("serve", help="run the engine server (ZeroMQ, loopback by default) with a local worker "
                                     "or on a Ray cluster")
    p.add_argument("--bind", default=DEFAULT_ENDPOINT, metavar="ADDR",
                   help=f"ZeroMQ endpoint to listen on (default {DEFAULT_ENDPOINT}; port * picks a free one)")
    p.add_argument("--data", type=Path, default=None, metavar="DIR", help="job store folder (default: per-user data dir)")
    p.add_argument("--key-file", type=Path, default=None, metavar="FILE",
                   help="HMAC key file, created 0600 on first start (default: per-user data dir)")
    p.add_argument("--no-auth", action="store_true", help="no signatures (loopback only)")
    p.add_argument("--model", default="bundled", metavar="PATH_OR_ID",
                   help="default prior: bundled, a local diffusers folder, a single-file checkpoint or a hub id")
    add_model_config_flag(p)
    p.add_argument("--extra-model", action="append", default=[], metavar="PATH_OR_ID",
                   help="another prior a request may pick with options.model (repeatable)")
    p.add_argument("--device", action="append", default=None, metavar="DEV",
                   help="auto, cpu or cuda[:N]; repeat for one worker per device (default auto)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per worker (0: default)")
    p.add_argument("--heartbeat", type=float, default=1.0, help="heartbeat interval in seconds")
    p.add_argument("--max-queued", type=int, default=16, help="most waiting jobs before submits get busy")
    p.add_argument("--max-message-mb", type=float, default=64.0,
                   help="largest message accepted, header and blobs together, in MiB (also the per-frame limit)")
    p.add_argument("--max-attempts", type=int, default=3,
                   help="times a job may start (its worker died, the server was killed) before it fails")
    p.add_argument("--min-free-mb", type=float, default=64.0,
                   help="no job starts while the job store's disk has less free space than this, in MiB")
    p.add_argument("--cancel-grace", type=float, default=0.4,
                   help="seconds a cancelled job may take to stop before its worker is terminated")
    p.add_argument("--protocol-only", action="store_true",
                   help="no worker: accept and store jobs without running them (tests, debugging)")
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="where jobs run: local child processes, one per --device (default), or actors on a Ray "
                        "cluster, one per GPU (needs the cluster extra and a --data folder every node mounts)")
    p.add_argument("--ray-address", default=None, metavar="auto|local|HOST:PORT",
                   help="the Ray cluster: auto (started here with `ray start`), the head node's HOST:PORT, or local "
                        "(a private cluster of this machine); default auto")
    p.add_argument("--ray-actors", type=int, default=None, metavar="N",
                   help="Ray actors, one job each at a time (default 0: one per GPU, or one per CPU slot without GPUs)")
    p.add_argument("--ray-cpus-per-actor", type=float, default=None, metavar="C",
                   help="CPUs each Ray actor reserves (a CPU slot) and its torch threads (default 1)")
    p.set_defaults(func=cmd_serve)
    return p


def cmd_serve(args: argparse.Namespace) -> int:
    """Start a server; prints 'listening on ENDPOINT' when ready."""
    from engine_server.service.jobs import StoreLocked
    from engine_server.service.server import ConfigError, ServerConfig, serve
    from engine_server.wire.auth import KeyFileError
    from engine_server.wire.protocol import Limits

    if args.heartbeat <= 0 or args.max_queued < 1 or args.cancel_grace < 0:
        raise UsageError("--heartbeat must be > 0, --max-queued >= 1, --cancel-grace >= 0")
    if args.max_message_mb < 1 or args.max_attempts < 1 or args.min_free_mb < 0:
        raise UsageError("--max-message-mb must be >= 1, --max-attempts >= 1, --min-free-mb >= 0")
    devices = args.device or ["auto"]
    limits = Limits(max_message_bytes=int(args.max_message_mb * 2**20))
    config = ServerConfig(bind=args.bind, data_dir=args.data, key_file=args.key_file, auth=not args.no_auth,
                          heartbeat_s=args.heartbeat, max_queued=args.max_queued, limits=limits,
                          max_attempts=args.max_attempts, min_free_bytes=int(args.min_free_mb * 2**20),
                          models=[args.model, *[m for m in args.extra_model if m != args.model]],
                          device=", ".join(devices))
    given = [f for f in ("ray_address", "ray_actors", "ray_cpus_per_actor") if getattr(args, f) is not None]
    if given and args.executor != "ray":
        raise UsageError(f"--{given[0].replace('_', '-')} needs --executor ray")
    worker = make_executor = None
    log_level = "DEBUG" if args.verbose else "INFO"
    if args.executor == "ray" and not args.protocol_only:
        make_executor, config.device = _ray_executor(args, config.models, log_level)
    elif not args.protocol_only:
        from engine_server.service.runner import RunnerConfig
        from engine_server.service.worker import WorkerConfig

        worker = WorkerConfig(runner=RunnerConfig(model=args.model, model_config=args.model_config,
                                                  models=list(config.models), threads=args.threads),
                              devices=devices, cancel_grace_s=args.cancel_grace, log_level=log_level)
    try:
        return serve(config, ready=lambda ep: print(f"listening on {ep}", flush=True), worker=worker,
                     make_executor=make_executor)
    except (ConfigError, StoreLocked, KeyFileError, OSError) as exc:
        raise UsageError(str(exc)) from None


def _ray_executor(args: argparse.Namespace, models: list[str], log_level: str):
    """(executor factory, device description) for ``--executor ray``; UsageError when Ray is missing or a flag is bad."""
    if args.device is not None and len(args.device) > 1:
        raise UsageError("--executor ray runs one actor per GPU of the cluster: give --device once (auto, cpu or cuda)")
    try:
        from engine_server.service.ray_executor import ClusterError, RayConfig, RayExecutor
    except ImportError as exc:
        raise UsageError(f"--executor ray needs Ray ({exc}): pip install -e \".[cluster]\"") from None
    from engine_server.service.runner import RunnerConfig

    device = (args.device or ["auto"])[0]
    address = args.ray_address or "auto"
    try:
        ray_config = RayConfig(address=address, actors=0 if args.ray_actors is None else args.ray_actors,
                               cpus_per_actor=1.0 if args.ray_cpus_per_actor is None else args.ray_cpus_per_actor,
                               runner=RunnerConfig(model=args.model, model_config=args.model_config,
                                                   models=list(models), threads=args.threads, device=device),
                               cancel_grace_s=args.cancel_grace, log_level=log_level)
    except ClusterError as exc:
        raise UsageError(str(exc)) from None

    def make(root: Path) -> RayExecutor:
        try:
            return RayExecutor(root, ray_config)
        except ClusterError as exc:
            raise UsageError(str(exc)) from None

    return make, f"ray cluster ({address}), {device}"


def add_jobs_parser(sub) -> argparse.ArgumentParser:
    """``jobs``: list, show, fetch or delete stored jobs."""
    p = sub.add_parser("jobs", help="list, show, fetch the result of, or delete stored jobs (reads the job store)")
    p.add_argument("--data", type=Path, default=None, metavar="DIR", help="job store folder (default: per-user data dir)")
    p.add_argument("--json", action="store_true", help="print JSON")
    jobs_sub = p.add_subparsers(dest="jobs_command", metavar="ACTION")
    q = jobs_sub.add_parser("list", help="jobs, newest first (the default action)")
    q.add_argument("--state", default=None, choices=["queued", "running", "done", "failed", "cancelled"])
    q.add_argument("--limit", type=int, default=50)
    q = jobs_sub.add_parser("show", help="one job: state, progress, error, files, result facts")
    q.add_argument("job_id")
    q = jobs_sub.add_parser("result", help="write a finished job's GLB to a file")
    q.add_argument("job_id")
    q.add_argument("--out", required=True, metavar="FILE.glb")
    q = jobs_sub.add_parser("delete", help="delete a job that is not running, with its files")
    q.add_argument("job_id")
    p.set_defaults(func=cmd_jobs, jobs_command="list", state=None, limit=50)
    return p


def _open_store(data: Path | None):
    from engine_server.service.jobs import JobStore
    from engine_server.wire.auth import user_data_dir

    root = Path(data).expanduser() if data else user_data_dir() / "data"
    if not (root / "jobs.sqlite3").is_file():
        raise FileNotFoundError(f"no job store in {root} (start a server with --data {root} first)")
    return JobStore(root, owner=False)


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def cmd_jobs(args: argparse.Namespace) -> int:
    from engine_server.service.jobs import JobConflict, JobNotFound

    action = args.jobs_command
    try:
        store = _open_store(args.data)
    except (FileNotFoundError, OSError) as exc:
        raise UsageError(str(exc))
    try:
        if action == "list":
            jobs = store.list(args.state, max(1, args.limit))
            if args.json:
                print(json.dumps([j.summary() for j in jobs], indent=1))
            elif not jobs:
                print("(no jobs)")
            else:
                for j in jobs:
                    step = j.progress or {}
                    where = step.get("stage", "")
                    if step.get("total"):
                        where += f" {step.get('step', 0)}/{step['total']}"
                    if j.state == "running" and step.get("node"):  # set by the Ray executor
                        where += f" on {step['node']}"
                    err = f"  [{j.error_code}] {j.error_message}" if j.error_code else ""
                    print(f"{j.id}  {j.state:<9}  {j.kind:<6}  {_when(j.created)}  {j.label[:40]!r}  {where}{err}")
            return 0
        if action == "show":
            job = store.get(args.job_id)
            doc = job.summary() | {"started": job.started, "finished": job.finished,
                                   "folder": str(store.job_dir(job.id))}
            if job.state == "done":
                doc["result"] = store.read_result(job.id).meta
            preview = store.latest_preview(job.id)
            if preview is not None:
                doc["latest_preview"] = str(preview)
            print(json.dumps(doc, indent=1, default=str))
            return 0
        if action == "result":
            out = output_glb(args.out)
            glb = store.read_result(args.job_id).glb_path
            shutil.copyfile(glb, out)
            print(f"wrote {out} ({out.stat().st_size} bytes)")
            return 0
        if action == "delete":
            store.delete(args.job_id)
            print(f"deleted {args.job_id}")
            return 0
        raise UsageError(f"unknown action {action!r}")
    except (JobNotFound, JobConflict) as exc:
        raise UsageError(str(exc))
    except OSError as exc:
        raise UsageError(str(exc))
    finally:
        store.close()
