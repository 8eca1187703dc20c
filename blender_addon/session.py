"""The add-on's connection to the engine, free of ``bpy``: jobs, their latest state, a local engine process.

Everything here runs on Blender's main thread; there is no network thread. The
engine client (``engine_server/wire/client.py``, copied into the add-on by
``build_addon.py`` as ``engine_client``) never blocks in :meth:`Session.drain`
(``poll_events(0)``), and every request it makes has a timeout. The session owns its
own ZeroMQ context, so :meth:`Session.close` (sockets closed with linger 0, then the
context terminated) leaves no socket and no ZeroMQ I/O thread behind.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import shlex
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TERMINAL = ("done", "failed", "cancelled")
"""Job states that never change again."""


class SessionError(Exception):
    """Something the artist must be told (engine unreachable, key missing, bad endpoint); the message says what."""


def client_modules() -> tuple[Any, Any, Any]:
    """(client, protocol, files) modules: the copies bundled by ``build_addon.py``, else ``engine_server.wire``."""
    package = __package__ or ""
    try:
        client = importlib.import_module(f"{package}.engine_client.client")
        protocol = importlib.import_module(f"{package}.engine_client.protocol")
        files = importlib.import_module(f"{package}.engine_client.files")
    except ModuleNotFoundError as exc:
        if exc.name == "zmq":
            raise SessionError("pyzmq is not available to Blender's Python: install the add-on from the zip that "
                               "build_addon.py makes (it bundles pyzmq), or put pyzmq on PYTHONPATH") from None
        if exc.name not in (f"{package}.engine_client", f"{package}.engine_client.client"):
            raise
        try:
            client = importlib.import_module("engine_server.wire.client")
            protocol = importlib.import_module("engine_server.wire.protocol")
            files = importlib.import_module("engine_server.wire.files")
        except ModuleNotFoundError as exc2:
            if exc2.name == "zmq":
                raise SessionError("pyzmq is not available to Blender's Python") from None
            raise SessionError("the engine client is missing: build the add-on with build_addon.py") from None
    return client, protocol, files


@dataclass
class JobView:
    """What the add-on knows about one job: enough to draw it and to place its result."""

    job_id: str
    """The engine's job id."""
    kind: str = "text"
    """text | image | refine | multiview."""
    name: str = "Generated"
    """What the panel calls the job (its prompt); the result object takes the engine's name for it."""
    state: str = "queued"
    """queued | running | done | failed | cancelled."""
    stage: str = ""
    """Current pipeline stage."""
    step: int = 0
    """Step within the stage."""
    total: int = 0
    """Steps in the stage."""
    message: str = ""
    """Last message (the failure's, when failed)."""
    placement: list[list[float]] | None = None
    """The result object's 4x4 world matrix, rows first, or None (the engine's, else identity)."""
    source: str | None = None
    """Name of the object a refine job started from."""
    imported: str | None = None
    """Name of the object the result became, once imported."""
    submitted_at: float = field(default_factory=time.time)
    """Unix time of the submit."""

    @property
    def fraction(self) -> float:
        """Progress in [0, 1] within the current stage (1 when done)."""
        if self.state == "done":
            return 1.0
        return min(1.0, self.step / self.total) if self.total > 0 else 0.0

    @property
    def terminal(self) -> bool:
        """The job has ended."""
        return self.state in TERMINAL


class Session:
    """One connection to one engine, with the jobs submitted through it (newest last).

    ``state_dir``: where the job list is kept between Blender sessions (``jobs.json``).
    """

    def __init__(self, endpoint: str, key_file: str | None = None, *, timeout: float = 5.0,
                 state_dir: str | os.PathLike | None = None, allow_online: bool = True):
        self.client_mod, self.protocol, self._files = client_modules()
        if not self.protocol.is_loopback(endpoint) and not allow_online:
            raise SessionError(f"{endpoint} is not on this machine and Blender does not allow online access "
                               "(Preferences > System > Network > Allow Online Access)")
        self.endpoint = endpoint
        self.timeout = float(timeout)
        self.state_dir = Path(state_dir) if state_dir else None
        self.jobs: dict[str, JobView] = {}
        self.welcome: dict[str, Any] | None = None
        self.last_error: str = ""
        self.process: subprocess.Popen | None = None
        self._zmq = self.client_mod.zmq
        self._ctx = self._zmq.Context()
        self._ctx.setsockopt(self._zmq.LINGER, 0)
        try:
            self.client = self.client_mod.EngineClient(
                endpoint, key_file or None, timeout=self.timeout, retries=0, context=self._ctx,
                client_name="blender-addon")
        except Exception as exc:  # key file problems are the usual cause: say which
            self._ctx.term()
            raise SessionError(f"cannot create the engine client: {exc}") from exc
        self._load_jobs()

    # -- connection

    def connect(self) -> dict[str, Any]:
        """``hello`` the engine (waits at most ``timeout`` s); returns the welcome fields."""
        try:
            self.welcome = self.client.hello(timeout=self.timeout)
        except self.client_mod.EngineError as exc:
            raise SessionError(f"engine at {self.endpoint} did not answer: {exc}") from None
        return self.welcome

    @property
    def connected(self) -> bool:
        """We had a welcome and the engine still answers heartbeats."""
        return self.welcome is not None and self.client.is_responsive

    def start_engine(self, command: str, wait_s: float = 30.0) -> None:
        """Start a local engine with ``command`` (split like a shell would) and wait until it answers."""
        args = shlex.split(command)
        if not args:
            raise SessionError("no engine command set in the add-on preferences")
        try:
            self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        except OSError as exc:
            raise SessionError(f"cannot start the engine ({command}): {exc}") from None
        deadline = time.monotonic() + wait_s
        while True:
            if self.process.poll() is not None:
                raise SessionError(f"the engine command exited with status {self.process.returncode}: {command}")
            try:
                self.welcome = self.client.hello(timeout=min(2.0, self.timeout))
                return
            except self.client_mod.EngineError:
                if time.monotonic() > deadline:
                    raise SessionError(f"the engine started by '{command}' did not answer within {wait_s:g} s") from None

    def close(self) -> None:
        """Close the socket (linger 0), end the ZeroMQ context and stop an engine we started (bounded waits)."""
        try:
            self.client.close()
        finally:
            self._ctx.term()
            if self.process is not None and self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(5.0)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(5.0)
            self.process = None

    # -- jobs

    def submit(self, kind: str, *, name: str, placement: list[list[float]] | None = None, source: str | None = None,
               **fields: Any) -> JobView:
        """Queue a job (fields as ``EngineClient.submit`` takes them, ``placement`` sent too); raises SessionError
        with the engine's reason. ``name`` labels the job in the panel until the result brings its own."""
        try:
            job_id = self.client.submit(kind, timeout=self.timeout, placement=placement, **fields)
        except self.client_mod.RequestError as exc:
            raise SessionError(f"the engine refused the job: {exc.message}" + (f" ({exc.field})" if exc.field else "")) from None
        except self.client_mod.EngineError as exc:
            raise SessionError(str(exc)) from None
        job = JobView(job_id, kind=kind, name=name or "Generated", placement=placement, source=source)
        self.jobs[job_id] = job
        self._save_jobs()
        return job

    def drain(self, timeout: float = 0.0) -> list[Any]:
        """Take the job events received so far (waits at most ``timeout`` s); job views are updated from them."""
        events = self.client.poll_events(timeout)
        for event in events:
            job = self.jobs.get(event.job_id)
            if job is None:
                continue
            if event.type == "progress":
                job.stage = event.get("stage", job.stage)
                job.step = event.get("step", 0)
                job.total = event.get("total", 0)
                job.message = event.get("message") or job.message
                if job.state == "queued":
                    job.state = event.get("state") or "running"
            elif event.type in ("preview", "mesh") and job.state == "queued":
                job.state = "running"
            elif event.type == "failed":
                job.state = "failed"
                job.message = f"{event.get('code')}: {event.get('message', '')}"
            elif event.type in ("done", "cancelled"):
                job.state = event.type
        if any(e.type in TERMINAL for e in events):
            self._save_jobs()
        return events

    def cancel(self, job_id: str) -> str:
        """Ask the engine to cancel; returns the job's state now."""
        try:
            state = self.client.cancel(job_id, timeout=self.timeout)
        except self.client_mod.EngineError as exc:
            raise SessionError(f"cancel failed: {exc}") from None
        if job_id in self.jobs and state in TERMINAL:
            self.jobs[job_id].state = state
        return state

    def result(self, job_id: str) -> Any:
        """The finished job's result (``FetchedResult``: arrays, texture PNG, meta; no GLB, nothing here reads one)."""
        try:
            return self.client.result(job_id, timeout=max(self.timeout, 30.0), glb=False)
        except self.client_mod.EngineError as exc:
            raise SessionError(f"cannot fetch the result of {job_id}: {exc}") from None

    def refresh(self, limit: int = 50) -> list[JobView]:
        """Update the job list from the engine (jobs that ended while Blender was closed included)."""
        try:
            listed = self.client.jobs(limit=limit, timeout=self.timeout)
        except self.client_mod.EngineError as exc:
            raise SessionError(f"cannot list jobs: {exc}") from None
        for summary in listed:
            job = self.jobs.get(summary["job_id"])
            if job is None:
                label = str(summary.get("label") or summary.get("kind") or "Generated")
                job = self.jobs[summary["job_id"]] = JobView(summary["job_id"], kind=str(summary.get("kind") or "text"),
                                                             name=label)
            job.state = summary["state"]
            if summary.get("error_code"):  # the job summary's names (Job.summary in the engine's job store)
                job.message = f"{summary['error_code']}: {summary.get('error_message', '')}"
        self._save_jobs()
        return list(self.jobs.values())

    def active(self) -> list[JobView]:
        """Jobs that have not ended."""
        return [j for j in self.jobs.values() if not j.terminal]

    # -- persistence

    def _jobs_file(self) -> Path | None:
        return self.state_dir / "jobs.json" if self.state_dir else None

    def _load_jobs(self) -> None:
        path = self._jobs_file()
        if path is None or not path.exists():
            return
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            for entry in saved.get(self.endpoint, []):
                job = JobView(**entry)
                self.jobs[job.job_id] = job
        except (OSError, ValueError, TypeError) as exc:
            logger.warning("ignoring unreadable job list %s: %s", path, exc)

    def _save_jobs(self) -> None:
        path = self._jobs_file()
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            saved = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
            saved[self.endpoint] = [asdict(j) for j in list(self.jobs.values())[-100:]]
            self._files.atomic_write(path, json.dumps(saved).encode("utf-8"))
        except (OSError, ValueError) as exc:
            logger.warning("cannot save the job list to %s: %s", path, exc)

