"""The supervised worker: jobs run in a child process, one job per device at a time.

:class:`LocalWorker` is the server's :class:`~engine_server.service.server.Executor`. For each
device it keeps one child process (``python -m engine_server.service.worker --child``) that
stays warm between jobs: the priors it loaded stay loaded. The server's loop talks to it
without ever blocking on the work:

- control, parent -> child: JSON lines on the child's stdin (``run``, ``cancel``,
  ``exit``); a thread in the child reads them, so a cancel is seen while a step runs;
- events, child -> parent: length-prefixed frames on the child's stdout (a JSON header
  whose arrays and images are blob references, as on the wire, then the raw blobs),
  read without blocking in :meth:`LocalWorker.poll`. Only plain data crosses: no pickle.

Cancel: the child's runner checks a flag between steps and ends the job; if it has not
within ``cancel_grace_s``, the parent terminates the child (SIGTERM, then SIGKILL), reports
``cancelled`` and starts a fresh child. A child that dies mid-job (kill -9, the kernel's
OOM killer, a crash) is reported as ``lost`` (``worker_died``, with the signal or exit
status): the server puts the job back in the queue to resume from its checkpoint on a
fresh child, up to its attempt limit. In the child, a non-finite loss fails the job with
``non_finite``, an out-of-memory error with ``out_of_memory`` and a full, read-only or
failing disk with ``storage``. When the server process dies, the child sees its stdin
close and exits at once.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import queue
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine_server.pipelines.events import Cancelled
from engine_server.service.executor import WorkerEvent
from engine_server.service.jobs import Job
from engine_server.service.runner import RunnerConfig
from engine_server.wire import protocol

logger = logging.getLogger(__name__)

_LEN = struct.Struct(">I")
MAX_FRAME_BYTES = 2**31 - 1
"""Largest event frame from a child."""


@dataclass
class WorkerConfig:
    """How the worker runs jobs."""

    runner: RunnerConfig = field(default_factory=RunnerConfig)
    """Device, models and threads of the runner in each child."""
    devices: list[str] = field(default_factory=lambda: ["auto"])
    """One child (and one job at a time) per device; "auto" picks CUDA when available."""
    cancel_grace_s: float = 0.4
    """How long a cancelled job may take to stop by itself before its child is terminated."""
    kill_grace_s: float = 0.25
    """How long a terminated child may take to exit before it is killed."""
    warm: bool = True
    """Start the children (and load the default prior) at once, and again after one is replaced."""
    log_level: str = "INFO"
    """Logging level in the children (their log goes to the server's stderr)."""


def _describe_exit(code: int) -> str:
    """A child's return code as words: 'was killed by signal 9 (SIGKILL)' / 'exited with status 1'."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = "unknown signal"
        return f"was killed by signal {-code} ({name})"
    return f"exited with status {code}"


# ----------------------------------------------------------------------------- framing (both sides)


def encode_frame(kind: str, job_id: str | None, fields: dict[str, Any]) -> bytes:
    """One event frame: length, header length, JSON header (blob references), blobs."""
    blobs: list = []
    wire = protocol.to_wire(fields, blobs)
    sizes = [len(memoryview(b).cast("B")) for b in blobs]
    header = json.dumps({"type": kind, "job_id": job_id, "fields": wire, "blobs": sizes},
                        allow_nan=False).encode("utf-8")
    body = b"".join([_LEN.pack(len(header)), header, *(bytes(b) for b in blobs)])
    return _LEN.pack(len(body)) + body


def decode_frame(body: bytes | memoryview) -> tuple[str, str | None, dict[str, Any]]:
    """(type, job_id, fields with Array / Image objects) from a frame body; raises ValueError when malformed."""
    body = memoryview(body)
    (hlen,) = _LEN.unpack_from(body, 0)
    header = json.loads(bytes(body[4:4 + hlen]).decode("utf-8"))
    blobs, pos = [], 4 + hlen
    for size in header["blobs"]:
        blobs.append(bytes(body[pos:pos + size]))
        pos += size
    if pos != len(body):
        raise ValueError(f"frame has {len(body) - pos} stray bytes")
    try:
        fields = protocol.from_wire(header["fields"], blobs, [False] * len(blobs))
    except protocol.ProtocolError as exc:
        raise ValueError(str(exc)) from None
    return header["type"], header["job_id"], fields


# ----------------------------------------------------------------------------- the parent side


class _Slot:
    """One device: its child process and the job it runs."""

    def __init__(self, device: str):
        self.device = device
        self.proc: subprocess.Popen | None = None
        self.buffer = bytearray()
        self.job_id: str | None = None
        self.cancel_at: float | None = None  # when the cancel was asked
        self.terminated_at: float | None = None
        self.pid: int | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class LocalWorker:
    """Executor over local child processes (see the module docstring).

    ``data_dir``: the job store's folder (job folders are ``<data_dir>/jobs/<job id>``).
    """

    def __init__(self, data_dir: str | os.PathLike, config: WorkerConfig | None = None):
        self.config = config or WorkerConfig()
        self.jobs_dir = Path(data_dir).expanduser() / "jobs"
        if not self.config.devices:
            raise ValueError("a worker needs at least one device")
        self._slots = [_Slot(d) for d in self.config.devices]
        self._events: list = []
        self._closed = False
        self.stats = {"children_started": 0, "children_lost": 0, "cancel_kills": 0}
        """Counters: children started, children that died mid-job, cancels that needed a kill."""
        if self.config.warm:
            for slot in self._slots:
                self._spawn(slot)

    # -- children

    def _spawn(self, slot: _Slot) -> None:
        runner = asdict(self.config.runner)
        runner["device"] = slot.device
        spec = json.dumps({"runner": runner, "log_level": self.config.log_level, "warm": self.config.warm})
        env = dict(os.environ)
        if self.config.runner.threads > 0:
            env["OMP_NUM_THREADS"] = str(self.config.runner.threads)
        slot.proc = subprocess.Popen(
            [sys.executable, "-m", "engine_server.service.worker", "--child", spec],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, env=env, start_new_session=True,
            close_fds=True)
        os.set_blocking(slot.proc.stdout.fileno(), False)
        slot.buffer = bytearray()
        slot.pid = slot.proc.pid
        self.stats["children_started"] += 1
        logger.info("worker child %d started for device %s", slot.proc.pid, slot.device)

    def _send(self, slot: _Slot, op: dict[str, Any]) -> bool:
        """A control line to the child; False when it is gone."""
        if slot.proc is None or slot.proc.stdin is None:
            return False
        try:
            slot.proc.stdin.write(json.dumps(op).encode() + b"\n")
            slot.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError, ValueError):
            return False

    def _reap(self, slot: _Slot) -> None:
        """Forget a child that has exited (or is being replaced)."""
        proc, slot.proc = slot.proc, None
        if proc is not None:
            for stream in (proc.stdin, proc.stdout):
                try:
                    stream.close()
                except (OSError, ValueError, BrokenPipeError):
                    pass
            try:
                proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        slot.buffer = bytearray()
        slot.cancel_at = slot.terminated_at = None

    def child_pids(self) -> list[int]:
        """Process ids of the live children (for supervision and tests)."""
        return [s.proc.pid for s in self._slots if s.alive]

    # -- Executor

    def capacity(self) -> int:
        """Devices without a job."""
        return 0 if self._closed else sum(s.job_id is None for s in self._slots)

    def start(self, job: Job) -> None:
        """Run ``job`` on a free device (a fresh child when the last one died)."""
        slot = next((s for s in self._slots if s.job_id is None), None)
        if slot is None:
            raise RuntimeError("no free device: check capacity() before start()")
        if not slot.alive:
            if slot.proc is not None:
                self._reap(slot)
            self._spawn(slot)
        slot.job_id = job.id
        slot.cancel_at = slot.terminated_at = None
        if not self._send(slot, {"op": "run", "job_id": job.id, "job_dir": str(self.jobs_dir / job.id),
                                 "attempt": job.attempts}):
            pass  # the child died already: poll() reports it

    def cancel(self, job_id: str) -> None:
        """Ask the job's child to stop; poll() terminates it when it has not within the grace period."""
        for slot in self._slots:
            if slot.job_id == job_id and slot.cancel_at is None:
                slot.cancel_at = time.monotonic()
                self._send(slot, {"op": "cancel", "job_id": job_id})

    def poll(self) -> list:
        """Events since the last call (never blocks); also supervises the children."""
        now = time.monotonic()
        for slot in self._slots:
            if slot.proc is None:
                continue
            for kind, job_id, fields in self._read(slot):
                if kind in ("progress", "preview", "mesh"):
                    if job_id == slot.job_id and slot.cancel_at is None:
                        self._events.append(WorkerEvent(job_id, kind, fields))
                elif kind in ("done", "failed", "cancelled"):
                    if job_id == slot.job_id:
                        self._events.append(WorkerEvent(job_id, kind, fields))
                        slot.job_id, slot.cancel_at = None, None
                elif kind == "ready":
                    logger.info("worker child %d ready on %s", fields.get("pid", 0), fields.get("device", "?"))
            if slot.proc is not None and slot.proc.poll() is not None:
                self._child_exited(slot)
            elif slot.job_id is not None and slot.cancel_at is not None:
                self._enforce_cancel(slot, now)
        events, self._events = self._events, []
        return events

    def _read(self, slot: _Slot) -> list[tuple[str, str | None, dict]]:
        out = []
        fd = slot.proc.stdout.fileno()
        while True:
            try:
                chunk = os.read(fd, 1 << 20)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                    break
                raise
            if not chunk:
                break
            slot.buffer += chunk
        buf = slot.buffer
        pos = 0
        while len(buf) - pos >= 4:
            (n,) = _LEN.unpack_from(buf, pos)
            if len(buf) - pos - 4 < n:
                break
            try:
                out.append(decode_frame(memoryview(buf)[pos + 4:pos + 4 + n]))
            except (ValueError, KeyError, TypeError) as exc:
                logger.error("bad frame from worker child %s: %s", slot.pid, exc)
            pos += 4 + n
        del buf[:pos]
        return out

    def _child_exited(self, slot: _Slot) -> None:
        how = _describe_exit(slot.proc.returncode)
        job_id = slot.job_id
        if job_id is not None:
            if slot.cancel_at is not None:
                self._events.append(WorkerEvent(job_id, "cancelled", {}))
            else:
                self.stats["children_lost"] += 1
                hint = "; the kernel's out-of-memory killer also does this" if slot.proc.returncode == -signal.SIGKILL else ""
                logger.error("worker child %d %s while running job %s", slot.pid, how, job_id)
                self._events.append(WorkerEvent(job_id, "lost", {
                    "code": "worker_died", "message": f"the worker process {how} while running the job{hint}"}))
        elif not self._closed:
            logger.warning("idle worker child %d %s", slot.pid, how)
        slot.job_id = None
        self._reap(slot)
        if self.config.warm and not self._closed:
            self._spawn(slot)

    def _enforce_cancel(self, slot: _Slot, now: float) -> None:
        if slot.terminated_at is None and now - slot.cancel_at >= self.config.cancel_grace_s:
            logger.info("job %s did not stop within %.2f s of its cancel: terminating child %d",
                        slot.job_id, self.config.cancel_grace_s, slot.pid)
            self.stats["cancel_kills"] += 1
            slot.terminated_at = now
            slot.proc.terminate()
        elif slot.terminated_at is not None and now - slot.terminated_at >= self.config.kill_grace_s:
            slot.proc.kill()

    def close(self) -> None:
        """Stop every child (running jobs stay ``running`` in the store and resume at the next start)."""
        self._closed = True
        for slot in self._slots:
            if slot.proc is None:
                continue
            self._send(slot, {"op": "exit"})
            try:
                slot.proc.stdin.close()
            except (OSError, ValueError, BrokenPipeError):
                pass
            try:
                slot.proc.wait(timeout=2.0 if slot.job_id is None else 0.2)
            except subprocess.TimeoutExpired:
                slot.proc.terminate()
                try:
                    slot.proc.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    slot.proc.kill()
            self._reap(slot)


# ----------------------------------------------------------------------------- the child side


class JobEvents:
    """EventSink of one job attempt: the runner's calls as protocol event fields, handed to ``emit(type, fields)``.

    Previews are also kept in the job folder. Shared by the local child (frames on its
    stdout) and the Ray actor (items of its streaming generator).
    """

    def __init__(self, job_dir: Path, emit: Callable[[str, dict[str, Any]], None]):
        self.job_dir, self.emit = job_dir, emit

    def progress(self, stage: str, step: int, total: int, *, loss: float | None = None,
                 eta_s: float | None = None, message: str | None = None) -> None:
        fields = {"stage": stage, "step": int(step), "total": int(total), "loss": loss,
                  "eta_s": eta_s if eta_s is None else max(0.0, float(eta_s)), "message": message}
        self.emit("progress", {k: v for k, v in fields.items() if v is not None})

    def preview(self, stage: str, step: int, png: bytes) -> None:
        from engine_server.service.jobs import write_preview

        write_preview(self.job_dir, step, png)
        self.emit("preview", {"stage": stage, "step": int(step), "image": protocol.Image.from_png(png)})

    def mesh(self, stage: str, step: int, vertices: Any, faces: Any) -> None:
        self.emit("mesh", {"stage": stage, "step": int(step), "vertices": vertices, "faces": faces})


_OOM_WORDS = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")
"""How allocators word an allocation failure (CUDA caching allocator, torch's CPU allocator, errno 12)."""


def _is_oom(exc: BaseException) -> bool:
    """Whether an exception is an allocation failure (host or device)."""
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):
        pass
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(s in text for s in _OOM_WORDS)


def child_main(spec: dict[str, Any]) -> int:
    """The child process: warm up, then run the jobs the parent sends, one at a time."""
    from engine_server.service.runner import EngineRunner

    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # stray prints go to stderr, never into the event stream
    logging.basicConfig(level=spec.get("log_level", "INFO"), format="%(levelname)s worker %(name)s: %(message)s")
    parent = os.getppid()
    jobs: queue.Queue = queue.Queue()
    cancel = threading.Event()
    current: dict[str, str | None] = {"job": None}
    control = os.fdopen(os.dup(0), "rb")

    def read_control() -> None:
        for line in control:
            try:
                op = json.loads(line)
            except ValueError:
                continue
            if op.get("op") == "run":
                jobs.put(op)
            elif op.get("op") == "cancel":
                logging.getLogger(__name__).info("cancel of job %s asked (running: %s)", op.get("job_id"), current["job"])
                if op.get("job_id") == current["job"]:
                    cancel.set()
            elif op.get("op") == "exit":
                jobs.put(None)
                return
        os._exit(0)  # the parent is gone: stop at once (checkpoints and results are written atomically)

    threading.Thread(target=read_control, daemon=True, name="worker-control").start()
    runner = EngineRunner(RunnerConfig(**spec["runner"]))
    if spec.get("warm", True):
        try:
            runner.warm_up()
        except Exception as exc:  # reported per job later; the child stays up
            logging.getLogger(__name__).warning("warm-up failed: %s", exc)
    out.write(encode_frame("ready", None, {"pid": os.getpid(), "device": runner.ctx.device, "parent": parent}))
    out.flush()
    lock = threading.Lock()

    def emit(kind: str, job_id: str | None, fields: dict[str, Any]) -> None:
        frame = encode_frame(kind, job_id, fields)
        with lock:
            out.write(frame)
            out.flush()

    while True:
        op = jobs.get()
        if op is None:
            return 0
        job_id, job_dir = op["job_id"], Path(op["job_dir"])
        current["job"] = job_id
        cancel.clear()
        events = JobEvents(job_dir, lambda kind, fields: emit(kind, job_id, fields))
        try:
            end, fields = run_job(runner, job_dir, events, cancel)
        finally:
            current["job"] = None
        emit(end, job_id, fields)
        runner.ctx.release()  # after the end is reported: a cancel must not wait for the garbage collector


def run_job(runner: Any, job_dir: Path, events: JobEvents, cancel: threading.Event) -> tuple[str, dict[str, Any]]:
    """One attempt of the job in ``job_dir`` with ``runner`` (an EngineRunner) -> its end event (type, fields).

    ``done`` once the result is stored; ``failed`` with a code (the runner's JobFailure,
    ``non_finite``, ``out_of_memory``, ``storage``, ``internal``); ``cancelled`` when ``cancel``
    was set, whatever else happened meanwhile. Used by the local child and the Ray actor alike.
    """
    from engine_server.service.jobs import JobFailure, as_storage_error, load_request, write_result

    try:
        request = load_request(job_dir)
        result = runner(request, job_dir, events, cancel.is_set)
        if cancel.is_set():
            raise Cancelled()
        write_result(job_dir, result)
        return "done", {}
    except Cancelled:
        return "cancelled", {}
    except JobFailure as exc:
        end: tuple[str, dict[str, Any]] = ("failed", {"code": exc.code, "message": exc.message})
    except FloatingPointError as exc:
        end = ("failed", {"code": "non_finite", "message": str(exc)})
    except Exception as exc:
        storage = as_storage_error(exc)
        if storage is not None:
            end = ("failed", {"code": "storage", "message": f"{storage} (writing the job's files in {job_dir})"})
        elif _is_oom(exc):
            end = ("failed", {"code": "out_of_memory", "message": f"out of memory: {str(exc)[:500]}"})
        else:
            logging.getLogger(__name__).exception("job in %s failed", job_dir)
            end = ("failed", {"code": "internal", "message": f"{type(exc).__name__}: {exc}"[:2000]})
    return ("cancelled", {}) if cancel.is_set() else end


def main(argv: list[str] | None = None) -> int:
    """``python -m engine_server.service.worker --child SPEC``: the worker child (started by LocalWorker)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] != "--child":
        print("usage: python -m engine_server.service.worker --child SPEC_JSON (started by the engine server)", file=sys.stderr)
        return 2
    return child_main(json.loads(argv[1]))


if __name__ == "__main__":
    sys.exit(main())
