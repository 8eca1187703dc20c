"""Durable jobs: a SQLite (WAL) job table plus one artifact folder per job, and the job-runner interface.

Layout under the data folder::

    jobs.sqlite3                 job table (state, request id, progress snapshot, error)
    lock                         held by the one server that owns the store
    jobs/<job_id>/request.json   the validated request, blob references into request/
    jobs/<job_id>/request/       blob-<i>.bin: reference image, mesh arrays
    jobs/<job_id>/checkpoints/   the pipeline's own checkpoint files (see :func:`checkpoint_dir`)
    jobs/<job_id>/previews/      preview-<step>.png
    jobs/<job_id>/work/          the pipeline's scratch files (its GLB is written here once)
    jobs/<job_id>/result/        model.glb (moved from work/), texture.png, normal.png, <name>.bin, meta.json,
                                 files/ (the export format's files, e.g. model.obj + model.mtl + PNGs)

Durability rules: a job id is handed out only after its request files are fsynced and
its row is committed (``synchronous=FULL``); every artifact is written atomically (temp
file, fsync, rename, fsync of the folder), the pipeline's checkpoints included
(``engine_server.pipelines.checkpoint``). On a restart the owner (:meth:`JobStore.recover`)
puts ``running`` jobs back in the queue to resume from their last checkpoint, and gives up
on a job that keeps killing its worker.

Storage errors (disk full, read-only file system, I/O error) of the store's own writes
raise :class:`StorageError`; the transaction is rolled back, so the table stays as it was.

No torch or numpy import: the pipeline writes its torch state into :func:`checkpoint_dir` itself.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from engine_server.wire.files import atomic_write, fsync_dir
from engine_server.wire.protocol import (
    JOB_STATES, TERMINAL_STATES, Array, Blob, Image, ProtocolError, from_wire, to_wire,
)

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
"""Version of the SQLite schema (PRAGMA user_version)."""
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
_JOB_ID_RE = re.compile(r"[0-9a-f]{16}")
_REQUEST_NOT_HASHED = ("subscribe",)
"""Request fields that do not change what a job computes (left out of the idempotency hash)."""

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS jobs (
    id               TEXT PRIMARY KEY,
    request_id       TEXT NOT NULL UNIQUE,
    request_hash     TEXT NOT NULL,
    kind             TEXT NOT NULL,
    label            TEXT NOT NULL DEFAULT '',
    state            TEXT NOT NULL CHECK (state IN ({", ".join(repr(s) for s in JOB_STATES)})),
    created          REAL NOT NULL,
    updated          REAL NOT NULL,
    started          REAL,
    finished         REAL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    error_code       TEXT,
    error_message    TEXT,
    progress         TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, created);
"""


class Busy(Exception):
    """The queue is full: the submit is refused at once (the server answers ``busy``)."""

    def __init__(self, queued: int, max_queued: int):
        super().__init__(f"queue full: {queued} jobs waiting (at most {max_queued})")
        self.queued = queued
        self.max_queued = max_queued


class JobNotFound(LookupError):
    """No job with this id."""


class JobConflict(Exception):
    """The operation does not fit the job's state, or a request id was reused for a different request."""


class StoreLocked(Exception):
    """Another server owns this data folder."""


class StorageError(Exception):
    """The store cannot write: its disk is full, read-only or failing. ``reason`` says which, in words."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"the job store cannot write ({reason}): {detail}")
        self.reason = reason


STORAGE_ERRNOS = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system",
                  errno.EIO: "I/O error"}
"""OSError numbers that mean the disk, not the request, is at fault."""
_SQLITE_STORAGE = {"SQLITE_FULL": "disk full", "SQLITE_READONLY": "read-only database", "SQLITE_IOERR": "I/O error",
                   "SQLITE_CANTOPEN": "cannot open the database file"}
"""SQLite result codes (primary, before any ``_`` extension) that mean the same."""


def as_storage_error(exc: BaseException) -> StorageError | None:
    """``exc`` as a StorageError when it is a disk failure (an OSError or a SQLite error); else None."""
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
        return StorageError(STORAGE_ERRNOS[exc.errno], str(exc))
    if isinstance(exc, sqlite3.Error):
        name = getattr(exc, "sqlite_errorname", "") or ""
        for code, reason in _SQLITE_STORAGE.items():
            if name == code or name.startswith(code + "_"):
                return StorageError(reason, str(exc))
    return None


class JobFailure(Exception):
    """Raised by a runner to end its job as ``failed`` with a code the client can act on (e.g. ``non_finite``)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Job:
    """One row of the job table."""

    id: str
    """Server-made job id (16 hex digits)."""
    request_id: str
    """The client's idempotency key: one job per request id."""
    kind: str
    """text | image | refine | multiview."""
    state: str
    """queued | running | done | failed | cancelled."""
    label: str
    """Short human label (the prompt's start)."""
    created: float
    """Unix time of the submit."""
    updated: float
    """Unix time of the last state or progress change."""
    started: float | None
    """Unix time the last attempt started."""
    finished: float | None
    """Unix time it reached a terminal state."""
    attempts: int
    """How many times a worker started it (a resume counts)."""
    cancel_requested: bool
    """Cancel asked while running: the worker ends it."""
    error_code: str | None
    """Why it failed (``non_finite``, ``out_of_memory``, ``worker_died``, ...)."""
    error_message: str | None
    """Human-readable reason."""
    progress: dict | None
    """Last progress snapshot (stage, step, total, loss, eta_s)."""

    @property
    def terminal(self) -> bool:
        """Whether the job has ended."""
        return self.state in TERMINAL_STATES

    def summary(self) -> dict[str, Any]:
        """The job as plain JSON, as sent in ``job_list`` and ``ok`` replies."""
        out = {"job_id": self.id, "request_id": self.request_id, "kind": self.kind, "state": self.state,
               "label": self.label, "created": self.created, "updated": self.updated, "attempts": self.attempts}
        if self.error_code:
            out["error_code"] = self.error_code
            out["error_message"] = self.error_message or ""
        if self.progress:
            out["progress"] = self.progress
        return out


@dataclass
class Result:
    """What a runner returns: the final object, its GLB already on disk."""

    glb_path: Path
    """The textured mesh as a binary glTF file inside the job folder; :func:`write_result` moves it into place."""
    texture_png: bytes | None = None
    """The base-colour texture as PNG (the bytes inside the GLB), sent with the result so clients need no GLB reader."""
    arrays: dict[str, Any] = field(default_factory=dict)
    """Named arrays for a direct import (vertices (V, 3) float32, faces (F, 3) int32, uvs (V, 2), ...): Array or numpy."""
    meta: dict[str, Any] = field(default_factory=dict)
    """JSON-able facts about the run (name, steps, seed, timings, model)."""
    normal_png: bytes | None = None
    """The tangent-space normal map as PNG (the bytes inside the GLB), or None."""
    files: list[Path] = field(default_factory=list)
    """Files of the requested export format inside the job folder (model.obj, model.mtl, ...); moved into place."""


@dataclass(frozen=True)
class JobResult:
    """A finished job's result as read back from the store."""

    glb_path: Path
    """The stored GLB file."""
    texture_png: bytes | None
    """The texture PNG, if the result has one."""
    arrays: dict[str, Array]
    """Named arrays."""
    meta: dict[str, Any]
    """Facts about the run."""
    normal_png: bytes | None = None
    """The normal map PNG, if the result has one."""
    files: dict[str, Path] = field(default_factory=dict)
    """The export format's files by name (empty for GLB-only results)."""


def _write_json(path: Path, obj: Any) -> Path:
    return atomic_write(path, json.dumps(obj, indent=1, allow_nan=False).encode("utf-8"))


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(f"artifact name {name!r} must be 1-64 letters, digits, '_', '.' or '-' (no folders)")
    return name


def _write_arrays(folder: Path, arrays: Mapping[str, Any]) -> dict[str, dict]:
    """Each array to ``<name>.bin`` (fsynced); returns the JSON index {name: {dtype, shape, file}}."""
    index = {}
    for name, value in arrays.items():
        arr = value if isinstance(value, Array) else Array.from_numpy(value)
        file = f"{_check_name(name)}.bin"
        with open(folder / file, "wb") as f:
            f.write(arr.data)
            f.flush()
            os.fsync(f.fileno())
        index[name] = {"dtype": arr.dtype, "shape": list(arr.shape), "file": file}
    return index


def _read_arrays(folder: Path, index: Mapping[str, dict]) -> dict[str, Array]:
    return {name: Array(spec["dtype"], tuple(spec["shape"]), (folder / spec["file"]).read_bytes())
            for name, spec in index.items()}


# ----------------------------------------------------------------------------- the runner interface


class EventSink(Protocol):
    """Where a runner reports what happens; each call is cheap and never blocks on a client.

    The worker forwards these to the server, which keeps only the latest progress, preview
    and mesh per job for a slow client ("latest value wins"); the job's end is always delivered.
    """

    def progress(self, stage: str, step: int, total: int, *, loss: float | None = None,
                 eta_s: float | None = None, message: str | None = None) -> None:
        """Progress within ``stage``: ``step`` of ``total``, the current loss and time left."""

    def preview(self, stage: str, step: int, png: bytes) -> None:
        """A preview render (PNG bytes)."""

    def mesh(self, stage: str, step: int, vertices: Any, faces: Any) -> None:
        """An intermediate mesh: vertices (V, 3) float32, faces (F, 3) int32 (the final one is the Result)."""


class JobRunner(Protocol):
    """A pipeline as the worker calls it, once per job attempt, in the worker's child process.

    ``request``: the validated ``submit`` fields (the wire schema, ``_check_submit`` in
    :mod:`engine_server.wire.protocol`) as :func:`load_request` (``job_dir``) returns them,
    blobs as protocol Array / Image objects; only the fields the kind reads
    (:mod:`engine_server.pipelines.kinds`) are there.

    ``job_dir``: the job's artifact folder; scratch files go under ``job_dir / "work"``.

    ``events``: progress, previews and meshes (see EventSink).

    ``cancelled()``: cheap; call it at least once per step and raise
    :class:`engine_server.pipelines.events.Cancelled`
    when it is true. The worker kills a runner that has not returned a second after a
    cancel, so a runner must not rely on cleanup code running.

    Checkpoints: hand :func:`checkpoint_dir` (``job_dir``) to the pipeline, which resumes from
    the files it finds there (the job was interrupted by a restart) and saves its state,
    RNGs included, every ``checkpoint_every`` steps, each file written atomically.

    Failures: raise :class:`JobFailure` (``code``, ``message``) for a reason the user can
    act on; a non-finite loss must roll back to the last checkpoint or raise
    ``JobFailure("non_finite", ...)``, never return a mesh with NaNs. Any other exception
    fails the job with code ``internal``; CUDA out-of-memory is reported by the worker
    as ``out_of_memory``. Return a :class:`Result`; the worker stores it with
    :func:`write_result` (``job_dir``) and then reports ``done``.
    """

    def __call__(self, request: dict[str, Any], job_dir: Path, events: EventSink,
                 cancelled: Callable[[], bool]) -> Result:
        ...


# ----------------------------------------------------------------------------- a job's folder
# Module functions on the folder alone, so a worker's child process needs no database.


def checkpoint_dir(job_dir: str | os.PathLike) -> Path:
    """The folder a job's pipeline keeps its checkpoints in (it survives restarts and retries)."""
    return Path(job_dir) / "checkpoints"


def load_request(job_dir: str | os.PathLike) -> dict[str, Any]:
    """A job's request fields from its folder, blob references resolved to Array / Image objects."""
    folder = Path(job_dir)
    doc = json.loads((folder / "request.json").read_text(encoding="utf-8"))
    blobs = [(folder / "request" / f"blob-{i}.bin").read_bytes() for i in range(int(doc["blobs"]))]
    try:
        return from_wire(doc["fields"], blobs, [False] * len(blobs))
    except ProtocolError as exc:
        raise ValueError(f"stored request in {folder} is damaged: {exc}") from None


def write_preview(job_dir: str | os.PathLike, step: int, png: bytes | memoryview) -> Path:
    """Keep a preview image under ``previews/`` (atomically); returns its path."""
    folder = Path(job_dir) / "previews"
    folder.mkdir(exist_ok=True)
    return atomic_write(folder / f"preview-{int(step):07d}.png", png)


def write_result(job_dir: str | os.PathLike, result: Result) -> Path:
    """Store a result under ``result/`` atomically (all files or none: the folder is renamed into place when complete).

    The GLB is not copied: it is moved (renamed) from where the pipeline wrote it, inside the job folder.
    """
    folder = Path(job_dir)
    glb = Path(result.glb_path)
    with open(glb, "rb") as f:
        if f.read(4) != b"glTF":
            raise ValueError(f"{glb} is not a binary glTF file")
    tmp = folder / f".result-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        glb_bytes = glb.stat().st_size
        os.replace(glb, tmp / "model.glb")  # same file system: a rename, the bytes stay where they are
        for name, png in (("texture.png", result.texture_png), ("normal.png", result.normal_png)):
            if png is not None:
                with open(tmp / name, "wb") as f:
                    f.write(png)
                    f.flush()
                    os.fsync(f.fileno())
        files = [_check_name(Path(p).name) for p in result.files]
        if files:
            (tmp / "files").mkdir()
            for path in result.files:  # moved like the GLB: renames inside the job folder
                os.replace(path, tmp / "files" / Path(path).name)
            fsync_dir(tmp / "files")
        index = _write_arrays(tmp, result.arrays)
        with open(tmp / "meta.json", "w", encoding="utf-8") as f:
            json.dump({"arrays": index, "meta": result.meta, "glb_bytes": glb_bytes,
                       "texture": "texture.png" if result.texture_png is not None else None,
                       "normal_texture": "normal.png" if result.normal_png is not None else None,
                       "files": files}, f, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        final = folder / "result"
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# ----------------------------------------------------------------------------- the store


def request_hash(fields: Mapping[str, Any]) -> str:
    """SHA-256 of a request's meaning (canonical JSON of its fields plus its blobs' bytes)."""
    blobs: list = []
    wire = to_wire({k: v for k, v in fields.items() if k not in _REQUEST_NOT_HASHED}, blobs)
    h = hashlib.sha256(json.dumps(wire, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("utf-8"))
    for blob in blobs:
        h.update(len(blob).to_bytes(8, "big"))
        h.update(blob)
    return h.hexdigest()


class JobStore:
    """The job table and artifact folders under one data folder.

    One server owns a store (``owner=True``: it takes the lock file and cleans up after
    a crash, then calls :meth:`recover` to re-queue interrupted jobs); command-line tools
    open it with ``owner=False`` to list, show, fetch or delete while the server runs.
    Thread-safe.
    """

    def __init__(self, root: str | os.PathLike, *, max_queued: int = 16, max_attempts: int = 3,
                 progress_interval_s: float = 2.0, owner: bool = True):
        self.root = Path(root).expanduser()
        self.jobs_dir = self.root / "jobs"
        self.max_queued = int(max_queued)
        """Most jobs waiting to run; a submit beyond it raises Busy."""
        self.max_attempts = int(max_attempts)
        """Attempts before a job that keeps dying (its worker killed, the server killed) is failed."""
        self.progress_interval_s = float(progress_interval_s)
        """Least time between two progress snapshots written for one job."""
        self._lock = threading.RLock()
        self._progress_written: dict[str, float] = {}
        self._lock_file = None
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        if owner:
            self._take_lock()
        self._db = sqlite3.connect(self.root / "jobs.sqlite3", isolation_level=None, check_same_thread=False,
                                   timeout=10.0)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=10000")
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"job store {self.root} has schema {version}, newer than this engine ({SCHEMA_VERSION})")
        self._db.executescript(f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;")
        if owner:
            self._clean_folders()

    # -- lifecycle

    def _take_lock(self) -> None:
        path = self.root / "lock"
        f = open(path, "a+")
        try:
            if os.name == "posix":
                import fcntl

                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            else:
                import msvcrt

                msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            f.close()
            raise StoreLocked(f"another engine server is using {self.root} (lock file {path})") from None
        self._lock_file = f

    def close(self) -> None:
        """Close the database and release the lock."""
        with self._lock:
            self._db.close()
            if self._lock_file is not None:
                self._lock_file.close()
                self._lock_file = None

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT), rolled back on error; disk failures raise StorageError."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                except BaseException:
                    self._rollback()
                    raise
            except sqlite3.Error as exc:
                storage = as_storage_error(exc)
                if storage is None:
                    raise
                raise storage from exc

    def _rollback(self) -> None:
        if self._db.in_transaction:  # SQLite may have rolled back by itself (a full disk does that)
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error as exc:
                logger.warning("rollback failed: %s", exc)

    def _clean_folders(self) -> None:
        """Remove half-written folders a crash left behind (temp, trash, request files with no row)."""
        known = {row[0] for row in self._db.execute("SELECT id FROM jobs")}
        for p in self.jobs_dir.iterdir():
            if p.name.startswith((".tmp-", ".trash-")) or (_JOB_ID_RE.fullmatch(p.name) and p.name not in known):
                logger.info("removing leftover %s", p)
                shutil.rmtree(p, ignore_errors=True)

    def recover(self) -> list[Job]:
        """At start-up: put interrupted (``running``) jobs back in the queue, or fail those out of attempts.

        Returns the jobs re-queued. Called by the owner before any worker starts.
        """
        requeued = []
        now = time.time()
        with self._tx() as db:
            for row in db.execute("SELECT * FROM jobs WHERE state = 'running'").fetchall():
                job = self._job(row)
                if job.cancel_requested:
                    self._set_state(db, job.id, "cancelled", now)
                elif job.attempts >= self.max_attempts:
                    self._set_state(db, job.id, "failed", now, "crash_loop",
                                    f"interrupted {job.attempts} times (server or worker killed); not retried")
                else:
                    db.execute("UPDATE jobs SET state = 'queued', updated = ? WHERE id = ?", (now, job.id))
                    requeued.append(job.id)
        if requeued:
            logger.info("resuming %d interrupted job(s): %s", len(requeued), ", ".join(requeued))
        return [self.get(j) for j in requeued]

    # -- reading

    @staticmethod
    def _job(row: sqlite3.Row) -> Job:
        return Job(
            id=row["id"], request_id=row["request_id"], kind=row["kind"], state=row["state"], label=row["label"],
            created=row["created"], updated=row["updated"], started=row["started"], finished=row["finished"],
            attempts=row["attempts"], cancel_requested=bool(row["cancel_requested"]),
            error_code=row["error_code"], error_message=row["error_message"],
            progress=json.loads(row["progress"]) if row["progress"] else None,
        )

    def get(self, job_id: str) -> Job:
        """The job; raises JobNotFound."""
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no job {job_id!r}")
        return self._job(row)

    def find_request(self, request_id: str) -> Job | None:
        """The job made for a client request id, if any."""
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE request_id = ?", (request_id,)).fetchone()
        return self._job(row) if row is not None else None

    def list(self, state: str | None = None, limit: int = 100) -> list[Job]:
        """Jobs, newest first, optionally of one state."""
        query, args = "SELECT * FROM jobs", ()
        if state is not None:
            query, args = query + " WHERE state = ?", (state,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY created DESC, rowid DESC LIMIT ?", (*args, int(limit))).fetchall()
        return [self._job(r) for r in rows]

    def counts(self) -> dict[str, int]:
        """Number of jobs in each state."""
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        out = dict.fromkeys(JOB_STATES, 0)
        out.update({r[0]: r[1] for r in rows})
        return out

    def queue_position(self, job_id: str) -> int | None:
        """0-based place of a queued job in the queue (None when not queued)."""
        job = self.get(job_id)
        if job.state != "queued":
            return None
        with self._lock:
            return self._db.execute(
                "SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND (created < ? OR (created = ? AND id < ?))",
                (job.created, job.created, job.id)).fetchone()[0]

    # -- submitting

    def submit(self, request_id: str, fields: Mapping[str, Any], label: str = "") -> tuple[Job, bool]:
        """Store a validated request durably and queue it; returns (job, duplicate).

        Idempotent on ``request_id``: the same request again returns the existing job
        with ``duplicate=True`` (even when the queue is full); the same id with a different
        request raises JobConflict. A full queue raises Busy. The request files are fsynced
        and the row committed before this returns.
        """
        digest = request_hash(fields)
        existing = self._check_submit(request_id, digest)
        if existing is not None:
            return existing, True
        job_id = secrets.token_hex(8)
        final = self.jobs_dir / job_id
        tmp = self.jobs_dir / f".tmp-{job_id}"
        try:
            (tmp / "request").mkdir(parents=True)
            blobs: list = []
            wire = to_wire(dict(fields), blobs)
            for i, blob in enumerate(blobs):
                with open(tmp / "request" / f"blob-{i}.bin", "wb") as f:
                    f.write(blob)
                    f.flush()
                    os.fsync(f.fileno())
            fsync_dir(tmp / "request")
            _write_json(tmp / "request.json", {"request_id": request_id, "fields": wire, "blobs": len(blobs)})
            os.replace(tmp, final)
            fsync_dir(self.jobs_dir)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            storage = as_storage_error(exc)
            if storage is not None:
                raise storage from exc
            raise
        now = time.time()
        try:
            with self._tx() as db:
                existing = self._check_submit(request_id, digest)
                if existing is None:
                    db.execute(
                        "INSERT INTO jobs (id, request_id, request_hash, kind, label, state, created, updated) "
                        "VALUES (?, ?, ?, ?, ?, 'queued', ?, ?)",
                        (job_id, request_id, digest, str(fields.get("kind", "")), label[:120], now, now))
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)
            raise
        if existing is not None:  # lost a race with an identical submit
            shutil.rmtree(final, ignore_errors=True)
            return existing, True
        logger.info("job %s queued (request %s, %s)", job_id, request_id, fields.get("kind"))
        return self.get(job_id), False

    def _check_submit(self, request_id: str, digest: str) -> Job | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE request_id = ?", (request_id,)).fetchone()
            if row is not None:
                if row["request_hash"] != digest:
                    raise JobConflict(f"request id {request_id!r} was already used for a different request")
                return self._job(row)
            queued = self._db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued'").fetchone()[0]
        if queued >= self.max_queued:
            raise Busy(queued, self.max_queued)
        return None

    def load_request(self, job_id: str) -> dict[str, Any]:
        """The job's request fields with blob references resolved to Array / Image objects."""
        return load_request(self.job_dir(job_id))

    # -- state changes

    def _set_state(self, db: sqlite3.Connection, job_id: str, state: str, now: float,
                   code: str | None = None, message: str | None = None) -> None:
        finished = now if state in TERMINAL_STATES else None
        db.execute("UPDATE jobs SET state = ?, updated = ?, finished = ?, error_code = ?, error_message = ? WHERE id = ?",
                   (state, now, finished, code, message, job_id))

    def claim_next(self) -> Job | None:
        """Take the oldest queued job and mark it running (one attempt more); None when the queue is empty."""
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY created, rowid LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET state = 'running', started = ?, updated = ?, attempts = attempts + 1 WHERE id = ?",
                       (now, now, row[0]))
        return self.get(row[0])

    def finish(self, job_id: str, state: str, code: str | None = None, message: str | None = None) -> Job:
        """End a job: ``done``, ``failed`` (with code and message) or ``cancelled``. Ending an ended job raises JobConflict."""
        if state not in TERMINAL_STATES:
            raise ValueError(f"finish needs a terminal state, got {state!r}")
        if state == "done" and not (self.job_dir(job_id) / "result" / "meta.json").exists():
            raise JobConflict(f"job {job_id} has no stored result; write_result before finishing it as done")
        with self._tx() as db:
            job = self._get_in(db, job_id)
            if job.terminal:
                raise JobConflict(f"job {job_id} already ended ({job.state})")
            self._set_state(db, job_id, state, time.time(), code, message)
        self._progress_written.pop(job_id, None)
        return self.get(job_id)

    def requeue(self, job_id: str) -> Job:
        """Put a running job back in the queue (to resume from its checkpoint)."""
        with self._tx() as db:
            job = self._get_in(db, job_id)
            if job.state != "running":
                raise JobConflict(f"job {job_id} is {job.state}, not running")
            db.execute("UPDATE jobs SET state = 'queued', updated = ? WHERE id = ?", (time.time(), job_id))
        return self.get(job_id)

    def request_cancel(self, job_id: str) -> Job:
        """Cancel: a queued job ends at once as ``cancelled``; a running one is flagged for its worker to end.

        An ended job is returned unchanged.
        """
        with self._tx() as db:
            job = self._get_in(db, job_id)
            if job.state == "queued":
                self._set_state(db, job_id, "cancelled", time.time())
            elif job.state == "running":
                db.execute("UPDATE jobs SET cancel_requested = 1, updated = ? WHERE id = ?", (time.time(), job_id))
        return self.get(job_id)

    def set_progress(self, job_id: str, snapshot: Mapping[str, Any], force: bool = False) -> bool:
        """Record the latest progress (at most once per ``progress_interval_s`` per job unless ``force``); returns whether written."""
        now = time.monotonic()
        if not force and now - self._progress_written.get(job_id, -1e18) < self.progress_interval_s:
            return False
        with self._tx() as db:
            clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in snapshot.items()}
            db.execute("UPDATE jobs SET progress = ?, updated = ? WHERE id = ?",
                       (json.dumps(clean, allow_nan=False), time.time(), job_id))
        self._progress_written[job_id] = now
        return True

    def delete(self, job_id: str) -> None:
        """Remove a job that is not running, with its artifacts; raises JobNotFound / JobConflict."""
        with self._tx() as db:
            job = self._get_in(db, job_id)
            if job.state == "running":
                raise JobConflict(f"job {job_id} is running; cancel it first")
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        folder = self.job_dir(job_id)
        if folder.exists():
            trash = self.jobs_dir / f".trash-{job_id}-{secrets.token_hex(4)}"
            os.replace(folder, trash)
            shutil.rmtree(trash, ignore_errors=True)
        self._progress_written.pop(job_id, None)

    def _get_in(self, db: sqlite3.Connection, job_id: str) -> Job:
        row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"no job {job_id!r}")
        return self._job(row)

    # -- artifacts

    def job_dir(self, job_id: str) -> Path:
        """The job's artifact folder."""
        if not _JOB_ID_RE.fullmatch(job_id):
            raise JobNotFound(f"no job {job_id!r} (job ids are 16 hex digits)")
        return self.jobs_dir / job_id

    def write_preview(self, job_id: str, step: int, png: bytes | memoryview) -> Path:
        """Keep a preview image (atomically); returns its path."""
        return write_preview(self.job_dir(job_id), step, png)

    def latest_preview(self, job_id: str) -> Path | None:
        """The newest preview image, if any."""
        files = sorted((self.job_dir(job_id) / "previews").glob("preview-*.png"))
        return files[-1] if files else None

    def write_result(self, job_id: str, result: Result) -> Path:
        """Store a job's result atomically (see the module function)."""
        folder = self.job_dir(job_id)
        if not folder.is_dir():
            raise JobNotFound(f"no job {job_id!r}")
        return write_result(folder, result)

    def read_result(self, job_id: str) -> JobResult:
        """A finished job's result; raises JobNotFound, or JobConflict when the job has not finished as done."""
        job = self.get(job_id)
        if job.state != "done":
            raise JobConflict(f"job {job_id} is {job.state}; a result exists only when done")
        folder = self.job_dir(job_id) / "result"
        doc = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        texture = (folder / doc["texture"]).read_bytes() if doc.get("texture") else None
        normal = (folder / doc["normal_texture"]).read_bytes() if doc.get("normal_texture") else None
        files = {name: folder / "files" / name for name in doc.get("files", [])}
        return JobResult(folder / "model.glb", texture, _read_arrays(folder, doc["arrays"]), doc["meta"], normal, files)

    def result_message_fields(self, job_id: str, glb: bool = True) -> dict[str, Any]:
        """The fields of a ``result`` reply for a done job: texture PNGs, arrays, meta and, when ``glb``, the GLB and
        the export format's files."""
        res = self.read_result(job_id)
        fields: dict[str, Any] = {"job_id": job_id, "arrays": res.arrays, "meta": res.meta}
        if res.texture_png is not None:
            fields["texture"] = Image.from_png(res.texture_png)
        if res.normal_png is not None:
            fields["normal_texture"] = Image.from_png(res.normal_png)
        if glb:
            fields["glb"] = Blob(res.glb_path.read_bytes(), "glb")
            if res.files:
                fields["files"] = {name: Blob(path.read_bytes(), "file") for name, path in res.files.items()}
        return fields

