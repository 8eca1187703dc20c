"""The add-on's connection to the engine, free of ``bpy``: jobs, their latest state, a local engine process.

The session is used from Blender's main thread. The engine client (``engine_server/wire/client.py``,
copied into the add-on by ``build_addon.py`` as ``engine_client``) never blocks in
:meth:`Session.drain` (``poll_events(0)``), and every request it makes has a timeout. The
requests an artist's click starts (connect, submit) may wait that long, so the UI runs them
with :meth:`Session.start`: one short-lived helper thread per request, which touches only
the client (never ``bpy``) while holding the session's lock; the main thread skips the
client while the lock is held and takes the outcome with :meth:`Session.finished`. A
loopback engine that is not running is found at once (a refused TCP connect), not after
the timeout. The session owns its own ZeroMQ context, so :meth:`Session.close` (helper
threads joined, sockets closed with linger 0, then the context terminated) leaves no
socket, thread or ZeroMQ I/O thread behind.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import shlex
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TERMINAL = ("done", "failed", "cancelled")
"""Job states that never change again."""


STAGE_WEIGHTS: dict[str, dict[str, float]] = {
    "text": {"coarse": 0.70, "extract": 0.04, "refine": 0.16, "texture": 0.08, "export": 0.02},
    "image": {"views": 0.15, "coarse": 0.60, "bsd": 0.0, "extract": 0.05, "texture": 0.15, "export": 0.05},
    "multiview": {"views": 0.15, "coarse": 0.60, "bsd": 0.0, "extract": 0.05, "texture": 0.15, "export": 0.05},
    "refine": {"refine": 0.80, "texture": 0.15, "export": 0.05},
}
"""Each kind's pipeline stages in order, weighted by their share of a job's time (draft/standard on a CPU); the
opt-in ``bsd`` stage weighs nothing, so a job without it moves on evenly (its own bar still shows its steps)."""

START_HINT = "start one with `engine-server serve`, or tick Start Engine Automatically in the add-on's preferences"
"""How to get an engine, for every message that says none answers."""


class SessionError(Exception):
    """Something the artist must be told (engine unreachable, key missing, bad endpoint); the message says what."""


class Pending:
    """One blocking request run on a helper thread; ``outcome`` is its return value, ``error`` its SessionError."""

    def __init__(self, what: str, job_name: str = ""):
        self.what = what
        """What it does, for the panel ("connect", "submit")."""
        self.job_name = job_name
        """The job it submits, if any."""
        self.outcome: Any = None
        self.error: str = ""
        self.thread: threading.Thread | None = None

    @property
    def done(self) -> bool:
        return self.thread is not None and not self.thread.is_alive()


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
    export_dir: str | None = None
    """Folder the result's files (the chosen export format) are saved into on import, or None."""
    rig_cameras: int = 0
    """Cameras of the rig the job was made for (0: none)."""
    reference_camera: dict | None = None
    """For an image job: the camera its reference was seen from, as the result's meta says (``source``: rig,
    estimated or default; ``elevation_deg``, ...), or, until the result comes, the scene camera sent with it
    (``{"source": "rig", "camera": name, "elevation_deg": ...}``)."""
    node: str = ""
    """The machine running the job, when the engine runs jobs on a cluster (its job listing says)."""
    submitted_at: float = field(default_factory=time.time)
    """Unix time of the submit."""

    def rests(self, meta: dict | None = None) -> bool:
        """Whether the result stands on its placement (its lowest point there). Not for a refine (it keeps the
        original's frame) nor for a rig job: its cameras were composed around the placement, so the object's
        centre stays there and it fills their frames as the artist framed them. ``meta``: the result's, for a
        job this Blender did not submit."""
        meta = meta or {}
        kind = meta.get("kind") or self.kind
        return kind != "refine" and not (self.rig_cameras or meta.get("rig_cameras"))

    def camera_line(self) -> str:
        """The reference camera in a few words for the panel ("" without one)."""
        cam = self.reference_camera
        if not cam:
            return ""
        what = {"rig": f"scene camera {cam['camera']}" if cam.get("camera") else "scene camera",
                "estimated": "estimated", "default": "default front view"}.get(cam.get("source"), str(cam.get("source")))
        elevation = cam.get("elevation_deg")
        return f"Reference camera: {what}" + (f", {float(elevation):.0f}\u00b0 up" if elevation is not None else "")

    @property
    def fraction(self) -> float:
        """Progress in [0, 1] within the current stage (1 when done)."""
        if self.state == "done":
            return 1.0
        return min(1.0, self.step / self.total) if self.total > 0 else 0.0

    @property
    def overall(self) -> float:
        """Progress of the whole job in [0, 1]: the stages before the current one by their weight
        (:data:`STAGE_WEIGHTS`), plus the current stage's share of its weight."""
        if self.state == "done":
            return 1.0
        weights = STAGE_WEIGHTS.get(self.kind, {})
        if self.stage not in weights:
            return 0.0
        stages = list(weights)
        before = sum(weights[s] for s in stages[:stages.index(self.stage)])
        return min(1.0, (before + weights[self.stage] * self.fraction) / sum(weights.values()))

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
        self.pending: list[Pending] = []
        """Requests running on helper threads (main thread: read, :meth:`finished` takes the ended ones)."""
        self._lock = threading.Lock()  # held by whoever talks to the client
        self._closing = False
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

    def connect(self, auto_start: str = "") -> dict[str, Any]:
        """``hello`` the engine (waits at most ``timeout`` s); returns the welcome fields.

        ``auto_start``: a command that starts a local engine when none answers at a loopback endpoint
        (then waits until it answers). Blocks: the UI uses :meth:`connect_later`.
        """
        with self._client():
            return self._connect(auto_start)

    def _connect(self, auto_start: str = "") -> dict[str, Any]:
        if self._refused():
            if not (auto_start and self.protocol.is_loopback(self.endpoint)):
                raise SessionError(f"the engine at {self.endpoint} did not answer (nothing listens there): {START_HINT}")
            self.start_engine(auto_start, wait_s=max(10.0, 6 * self.timeout))
            return self.welcome
        try:
            self.welcome = self.client.hello(timeout=self.timeout)
        except self.client_mod.EngineError as exc:
            if auto_start and self.protocol.is_loopback(self.endpoint):
                self.start_engine(auto_start, wait_s=max(10.0, 6 * self.timeout))
                return self.welcome
            raise SessionError(f"the engine at {self.endpoint} did not answer ({exc}): {START_HINT}") from None
        return self.welcome

    def _refused(self) -> bool:
        """True when a TCP endpoint on this machine refuses connections (no engine there); learnt in milliseconds."""
        scheme, _, rest = self.endpoint.partition("://")
        if scheme != "tcp" or not self.protocol.is_loopback(self.endpoint):
            return False
        host, _, port = rest.rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=0.2):
                return False
        except ConnectionRefusedError:
            return True
        except (OSError, ValueError):  # a timeout or an odd address: let ZeroMQ try
            return False

    @property
    def connected(self) -> bool:
        """We had a welcome and the engine still answers heartbeats."""
        return self.welcome is not None and self.client.is_responsive

    @property
    def lost(self) -> bool:
        """We had a welcome and the engine stopped answering heartbeats (a few seconds of silence)."""
        return self.welcome is not None and not self.client.is_responsive

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
        while not self._closing:
            if self.process.poll() is not None:
                raise SessionError(f"the engine command exited with status {self.process.returncode}: {command}")
            try:
                self.welcome = self.client.hello(timeout=min(2.0, self.timeout))
                return
            except self.client_mod.EngineError:
                if time.monotonic() > deadline:
                    raise SessionError(f"the engine started by '{command}' did not answer within {wait_s:g} s") from None
        raise SessionError("the session was closed while the engine started")

    # -- requests off the main thread

    def start(self, what: str, fn: Callable[[], Any], job_name: str = "") -> Pending:
        """Run ``fn`` (blocking client calls, no bpy) on a helper thread while holding the client; returns at once.

        Its return value lands in ``Pending.outcome``, a SessionError's message in ``Pending.error``.
        """
        pending = Pending(what, job_name)

        def run() -> None:
            with self._lock:
                try:
                    pending.outcome = fn()
                except SessionError as exc:
                    pending.error = str(exc)
                except Exception as exc:  # shown to the artist, never lost on a thread
                    logger.exception("%s failed", what)
                    pending.error = f"{what} failed: {exc}"

        pending.thread = threading.Thread(target=run, name=f"generate3d-{what}", daemon=True)
        self.pending.append(pending)
        pending.thread.start()
        return pending

    def finished(self) -> list[Pending]:
        """The helper requests that have ended (joined and removed from ``pending``)."""
        ended = [p for p in self.pending if p.done]
        for p in ended:
            p.thread.join()
            self.pending.remove(p)
        return ended

    @contextmanager
    def _client(self):
        """Hold the client on the main thread; a helper holding it longer than a request's timeout is an error."""
        if not self._lock.acquire(timeout=self.timeout + 1.0):
            raise SessionError("the engine connection is busy with an earlier request; try again in a moment")
        try:
            yield self.client
        finally:
            self._lock.release()

    def close_later(self) -> threading.Thread:
        """:meth:`close` on a thread of its own, so the UI never waits behind a helper's request (a connect to a
        hung engine takes up to its timeout); returns that thread."""
        self._closing = True
        closer = threading.Thread(target=self.close, name="generate3d-close", daemon=True)
        closer.start()
        return closer

    def close(self) -> None:
        """Join helper threads, close the socket (linger 0), end the ZeroMQ context and stop an engine we started
        (bounded waits: a helper's request ends within its timeout)."""
        self._closing = True
        for pending in self.pending:
            pending.thread.join(self.timeout + 3.0)
        self.pending.clear()
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
               export_dir: str | None = None, reference_camera: dict | None = None, **fields: Any) -> JobView:
        """Queue a job (fields as ``EngineClient.submit`` takes them, ``placement`` sent too); raises SessionError
        with the engine's reason. ``name`` labels the job in the panel until the result brings its own, as
        ``reference_camera`` (:attr:`JobView.reference_camera`) does its camera.
        Connects first when not yet connected. Blocks up to the timeout: the UI uses :meth:`submit_later`."""
        with self._client():
            job = self._submit(kind, name, placement, source, export_dir, reference_camera, fields)
        return self.add_job(job)

    def submit_later(self, kind: str, *, name: str, placement: list[list[float]] | None = None,
                     source: str | None = None, export_dir: str | None = None, reference_camera: dict | None = None,
                     auto_start: str = "", **fields: Any) -> Pending:
        """:meth:`submit` (connecting first, starting a local engine with ``auto_start`` if allowed) on a helper
        thread; the ended Pending's ``outcome`` is the JobView to pass to :meth:`add_job`."""
        def run() -> JobView:
            if self.welcome is None:
                self._connect(auto_start)
            return self._submit(kind, name, placement, source, export_dir, reference_camera, fields)

        return self.start("submit", run, job_name=name)

    def connect_later(self, auto_start: str = "") -> Pending:
        """:meth:`connect` on a helper thread; the ended Pending's ``outcome`` is the welcome."""
        return self.start("connect", lambda: self._connect(auto_start))

    def _submit(self, kind: str, name: str, placement, source, export_dir, reference_camera,
                fields: dict[str, Any]) -> JobView:
        if self.welcome is None:
            self._connect()
        try:
            job_id = self.client.submit(kind, timeout=self.timeout, placement=placement, **fields)
        except self.client_mod.RequestError as exc:
            field = f", field {exc.field}" if exc.field else ""
            raise SessionError(f"the engine refused the job ({exc.code}{field}): {exc.message}") from None
        except self.client_mod.EngineError as exc:
            raise SessionError(f"{exc}: {START_HINT}" if isinstance(exc, self.client_mod.EngineTimeout) else str(exc)) from None
        return JobView(job_id, kind=kind, name=name or "Generated", placement=placement, source=source,
                       export_dir=export_dir, rig_cameras=len(fields.get("rig") or ()),
                       reference_camera=reference_camera)

    def add_job(self, job: JobView) -> JobView:
        """Keep a submitted job (main thread) and save the job list."""
        self.jobs[job.job_id] = job
        self._save_jobs()
        return job

    def drain(self, timeout: float = 0.0) -> list[Any]:
        """Take the job events received so far (waits at most ``timeout`` s); job views are updated from them.

        Returns nothing, at once, while a helper thread holds the client."""
        if not self._lock.acquire(blocking=False):
            return []
        try:
            events = self.client.poll_events(timeout)
        finally:
            self._lock.release()
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
        """Ask the engine to cancel; returns the job's state now. Blocks up to the timeout (UI: :meth:`cancel_later`)."""
        with self._client():
            return self._cancel(job_id)

    def cancel_later(self, job_id: str) -> Pending:
        """:meth:`cancel` on a helper thread; the ended Pending's ``outcome`` is (job id, state)."""
        return self.start("cancel", lambda: (job_id, self._cancel(job_id)))

    def _cancel(self, job_id: str) -> str:
        self._check_listening()
        try:
            state = self.client.cancel(job_id, timeout=self.timeout)
        except self.client_mod.EngineError as exc:
            raise SessionError(f"cancel failed: {exc}") from None
        if job_id in self.jobs and state in TERMINAL:
            self.jobs[job_id].state = state
        return state

    def result(self, job_id: str) -> Any:
        """The finished job's result (``FetchedResult``: arrays, texture PNG, meta; the GLB and export files only
        for a job that saves them).
        Blocks up to the result timeout (UI: :meth:`result_later`)."""
        with self._client():
            return self._result(job_id)

    def result_later(self, job_id: str) -> Pending:
        """:meth:`result` on a helper thread; the ended Pending's ``outcome`` is (job id, FetchedResult)."""
        return self.start("result", lambda: (job_id, self._result(job_id)))

    def _result(self, job_id: str) -> Any:
        self._check_listening()
        job = self.jobs.get(job_id)
        try:  # the files to save come with the GLB; a job that saves none needs only the arrays
            return self.client.result(job_id, timeout=max(self.timeout, 30.0), glb=bool(job and job.export_dir))
        except self.client_mod.EngineError as exc:
            raise SessionError(f"cannot fetch the result of {job_id}: {exc}") from None

    def refresh(self, limit: int = 50) -> list[JobView]:
        """Update the job list from the engine (jobs that ended while Blender was closed included).
        Blocks up to the timeout (UI: :meth:`refresh_later`)."""
        with self._client():
            return self.apply_listing(self._list_jobs(limit))

    def refresh_later(self, limit: int = 50) -> Pending:
        """The engine's job list fetched on a helper thread; pass the ended Pending's ``outcome`` to :meth:`apply_listing`."""
        return self.start("jobs", lambda: self._list_jobs(limit))

    def _list_jobs(self, limit: int) -> list[dict[str, Any]]:
        self._check_listening()
        try:
            return self.client.jobs(limit=limit, timeout=self.timeout)
        except self.client_mod.EngineError as exc:
            raise SessionError(f"cannot list jobs: {exc}") from None

    def apply_listing(self, listed: list[dict[str, Any]]) -> list[JobView]:
        """Update the job views from the engine's job summaries (main thread)."""
        for summary in listed:
            job = self.jobs.get(summary["job_id"])
            if job is None:
                label = str(summary.get("label") or summary.get("kind") or "Generated")
                job = self.jobs[summary["job_id"]] = JobView(summary["job_id"], kind=str(summary.get("kind") or "text"),
                                                             name=label)
            job.state = summary["state"]
            progress = summary.get("progress")
            job.node = str(progress.get("node") or "") if isinstance(progress, dict) and not job.terminal else ""
            if summary.get("error_code"):  # the job summary's names (Job.summary in the engine's job store)
                job.message = f"{summary['error_code']}: {summary.get('error_message', '')}"
        self._save_jobs()
        return list(self.jobs.values())

    def _check_listening(self) -> None:
        if self._refused():
            raise SessionError(f"the engine at {self.endpoint} did not answer (nothing listens there): {START_HINT}")

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

