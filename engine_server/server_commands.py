"""CLI commands of the engine server: ``serve`` and ``jobs [list | show ID | result ID --out FILE | delete ID]``.

The lead's ``engine_server/cli.py`` registers them with::

    from engine_server import server_commands
    server_commands.add_parsers(sub)

``serve`` runs the ZeroMQ server with the real worker (``--protocol-only`` for none).
``jobs`` reads the job store folder directly (SQLite in WAL mode, opened without taking
the server's lock), so it works the same whether a server is running or not; ``delete``
refuses a running job. Failures print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from engine_server.jobs import JobConflict, JobNotFound, JobStore


def add_serve_parser(sub) -> argparse.ArgumentParser:
    """``serve``: run the engine server."""
    from engine_server.server import add_serve_arguments

    p = sub.add_parser("serve", help="run the engine server (ZeroMQ, loopback by default) with a local worker")
    add_serve_arguments(p)
    p.set_defaults(func=cmd_serve)
    return p


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


def add_parsers(sub) -> None:
    """Register ``serve`` and ``jobs`` on the CLI's subparsers."""
    add_serve_parser(sub)
    add_jobs_parser(sub)


def _fail(command: str, message: str) -> int:
    print(f"engine-server {command}: error: {message}", file=sys.stderr)
    return 2


def cmd_serve(args: argparse.Namespace) -> int:
    from engine_server.server import run_serve

    return run_serve(args)


def _open_store(data: Path | None) -> JobStore:
    from engine_server.auth import user_data_dir

    root = Path(data).expanduser() if data else user_data_dir() / "data"
    if not (root / "jobs.sqlite3").is_file():
        raise FileNotFoundError(f"no job store in {root} (start a server with --data {root} first)")
    return JobStore(root, owner=False)


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def cmd_jobs(args: argparse.Namespace) -> int:
    action = args.jobs_command
    try:
        store = _open_store(args.data)
    except (FileNotFoundError, OSError) as exc:
        return _fail("jobs", str(exc))
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
            out = Path(args.out)
            if out.suffix.lower() != ".glb":
                return _fail("jobs", f"--out must be a .glb file, got {args.out!r}")
            if not out.parent.exists():
                return _fail("jobs", f"output folder {str(out.parent)!r} does not exist")
            result = store.read_result(args.job_id)
            out.write_bytes(result.glb)
            print(f"wrote {out} ({len(result.glb)} bytes)")
            return 0
        if action == "delete":
            store.delete(args.job_id)
            print(f"deleted {args.job_id}")
            return 0
        return _fail("jobs", f"unknown action {action!r}")
    except (JobNotFound, JobConflict) as exc:
        return _fail("jobs", str(exc))
    except OSError as exc:
        return _fail("jobs", str(exc))
    finally:
        store.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m engine_server.server_commands serve|jobs ...`` (the same as the ``engine-server`` commands)."""
    import logging

    parser = argparse.ArgumentParser(prog="engine-server")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_parsers(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
