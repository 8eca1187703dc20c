"""The engine server: one ROUTER socket, one loop, many clients; jobs in the durable store.

The loop never runs work itself. It answers requests (hello, ping, submit, subscribe,
cancel, result, jobs, delete), starts queued jobs on an :class:`Executor` (the
supervised worker), and fans each job's events out to the clients subscribed to it.

Per client the server keeps replies and reliable events (the job's end)
in order, and for progress, previews and intermediate meshes only the latest value
per job ("latest value wins"): a client that stalls lets its socket pipe fill to the
high-water mark, after which its progress overwrites itself instead of piling up.
``ROUTER_MANDATORY`` makes a vanished client an error (its state is dropped) instead
of a silent loss; a client silent for ``peer_expiry_s`` is forgotten.

Heartbeats: clients ping every ``heartbeat_s`` and count the server unresponsive after
``liveness`` silent intervals; the server answers pings on the loop, never behind job
work, and also runs ZMTP heartbeats so a dead TCP peer is closed.

Safety: loopback bind by default; with authentication on (the default) a peer must
first pass a CURVE handshake with keys derived from the key file
(:mod:`engine_server.wire.curve`), so libzmq buffers nothing from a peer without the key
and the wire is encrypted; every message is then signed (HMAC-SHA256, key file 0600,
created on first start) with a nonce and a replay window, and messages stamped before
this server started refused (see :class:`~engine_server.wire.auth.ReplayGuard`); a
non-loopback bind without authentication refuses to start. Frames above the size limit
are refused by the socket; a message is received frame by frame and the frames past
the message limit are released as they are read, before anything is parsed (libzmq
itself assembles a multipart message before handing out its first frame and bounds only
each frame, by ``MAXMSGSIZE``; the handshake is what keeps strangers from filling it;
see :meth:`EngineServer._receive`).

Isolation: a message that makes the loop raise anything is dropped (``internal`` reply,
counted in ``stats``, logged), as is an event that cannot be stored or sent and a reply
that cannot be encoded; a failing loop phase is logged and the loop goes on. Nothing a
client sends ends the process.

Storage: an error of the job store (disk full, read-only, I/O) fails only the job
concerned, with code ``storage``, delivered to its subscribers even when the store
cannot record it (it is recorded once the store accepts writes again); a submit the
store cannot take gets a ``storage`` error; no job starts while the store's disk has
less than ``min_free_bytes`` free, so queued jobs stay queued until space is freed.
"""
from __future__ import annotations

import logging
import secrets
import shutil
import signal
import socket
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import zmq

from engine_server import __version__
from engine_server.models.bundled.vocab import UnknownPromptError, parse_prompt
from engine_server.pipelines.kinds import check_submit
from engine_server.pipelines.presets import PRESETS
from engine_server.wire import protocol
from engine_server.wire.auth import SIGNATURE_SCHEME, ReplayGuard, Signer, default_key_path, load_or_create_key, user_data_dir
from engine_server.wire.curve import CurveServer, derive_keys
from engine_server.service.executor import Executor, WorkerEvent
from engine_server.service.jobs import Busy, Job, JobConflict, JobNotFound, JobStore, StorageError
from engine_server.wire.files import atomic_write
from engine_server.wire.protocol import Limits, Message, ProtocolError

logger = logging.getLogger(__name__)

RELIABLE = ("done", "failed", "cancelled")
"""Events every subscriber receives, in order, however slow it is."""
BUNDLED_MODEL = "bundled"
"""The model name of the bundled prior, whose vocabulary is checked at submit time."""
STORAGE_RETRY_S = 1.0
"""How often the loop tries again to record job ends and to start jobs after a storage error."""


class ConfigError(Exception):
    """The server cannot start with this configuration (e.g. a public bind without authentication)."""


@dataclass
class ServerConfig:
    """How the server listens, authenticates and bounds its work."""

    bind: str = protocol.DEFAULT_ENDPOINT
    """ZeroMQ endpoint to bind (``tcp://127.0.0.1:*`` picks a free port)."""
    data_dir: Path | None = None
    """Job store folder (default: <user data dir>/data)."""
    key_file: Path | None = None
    """HMAC key file, created 0600 on first start (default: <user data dir>/key)."""
    auth: bool = True
    """Sign and check every message. Off is allowed on loopback / ipc only."""
    heartbeat_s: float = 1.0
    """Heartbeat interval announced to clients (they ping this often)."""
    liveness: int = 3
    """Silent heartbeat intervals before a peer counts as gone (ZMTP heartbeat timeout)."""
    peer_expiry_s: float = 120.0
    """A client silent this long is forgotten (its subscriptions and pending events dropped)."""
    max_peers: int = 1000
    """Most clients remembered at once (the longest silent is forgotten first)."""
    max_pending: int = 1000
    """Most queued replies and reliable events per client before it is dropped as stuck."""
    max_queued: int = 16
    """Most jobs waiting; a submit beyond it gets ``busy`` at once."""
    limits: Limits = field(default_factory=Limits)
    """Request bounds (also the socket's per-frame size limit)."""
    sndhwm: int = 256
    """Messages the socket buffers per client before sends to it wait (then latest value wins)."""
    rcvhwm: int = 256
    """Messages buffered per client on receipt."""
    linger_ms: int = 500
    """How long closing the socket may wait to deliver what is queued."""
    replay_window_s: float = 300.0
    """Accepted clock difference for timestamps; nonces are remembered this long."""
    max_attempts: int = 3
    """Times a job may start (a worker that died, a server that was killed) before it fails."""
    min_free_bytes: int = 64 * 2**20
    """No job starts while the job store's disk has less free space than this (queued jobs wait)."""
    models: list[str] = field(default_factory=list)
    """Models offered, announced in ``welcome``."""
    presets: tuple[str, ...] = tuple(PRESETS)
    """Preset names accepted in ``submit`` and announced in ``welcome`` (a submit without one gets the default)."""
    device: str = "cpu"
    """Device description announced in ``welcome``."""


def _coalescable(event_type: str) -> bool:
    """Whether a newer event of the same job and type may replace this one (the result is fetched, not streamed)."""
    return event_type in ("progress", "preview", "mesh")


class _Mailbox:
    """Job events on their way into the loop, from any thread: the latest progress, preview and
    intermediate mesh per job, plus every other event in order. Bounded however fast they come."""

    def __init__(self):
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple, WorkerEvent] = OrderedDict()
        self._serial = 0
        self.replaced = 0
        """Events dropped because a newer one of the same job and type came first."""

    def put(self, event: WorkerEvent) -> None:
        with self._lock:
            if _coalescable(event.type):
                key: tuple = (event.job_id, event.type)
                if self._items.pop(key, None) is not None:
                    self.replaced += 1
            else:
                self._serial += 1
                key = (event.job_id, event.type, self._serial)
            self._items[key] = event

    def take(self) -> list[WorkerEvent]:
        with self._lock:
            items = list(self._items.values())
            self._items.clear()
        return items


class _Peer:
    """One client: its subscriptions and what waits to be sent to it."""

    def __init__(self, identity: bytes, now: float):
        self.identity = identity
        self.last_seen = now
        self.fresh = True  # no message handled yet: a ping tells the client to subscribe again
        self.subscriptions: set[str] = set()
        self.reliable: deque[Message] = deque()
        self.latest: OrderedDict[tuple[str, str], Message] = OrderedDict()

    def pending(self) -> bool:
        return bool(self.reliable or self.latest)

    def put_latest(self, msg: Message) -> None:
        """A coalescable event: replaces the unsent one of the same job and type."""
        key = (msg.job_id or "", msg.type)
        self.latest.pop(key, None)
        self.latest[key] = msg

    def put_reliable(self, msg: Message) -> None:
        """A reply or reliable event; the job's unsent coalesced events go first, to keep the order."""
        if msg.job_id is not None and msg.type in protocol.EVENT_TYPES:
            for key in [k for k in self.latest if k[0] == msg.job_id]:
                self.reliable.append(self.latest.pop(key))
        self.reliable.append(msg)


class EngineServer:
    """The ROUTER loop. ``serve_forever`` runs it; ``stop`` (from any thread or a signal) ends it."""

    def __init__(self, config: ServerConfig, store: JobStore | None = None, executor: Executor | None = None,
                 context: zmq.Context | None = None):
        self.config = config
        if not config.auth and not protocol.is_loopback(config.bind):
            raise ConfigError(f"refusing to bind {config.bind} without authentication: "
                              "use a loopback address or keep authentication on")
        key = load_or_create_key(config.key_file or default_key_path()) if config.auth else None
        if not config.auth:
            logger.warning("authentication is OFF: any local process can use this engine")
        self.signer = Signer(key)
        self._curve_keys = derive_keys(key) if key is not None else None
        self._curve: CurveServer | None = None  # the ZAP handler, started at bind
        self.guard = ReplayGuard(config.replay_window_s, not_before=time.time())
        data_dir = Path(config.data_dir) if config.data_dir else user_data_dir() / "data"
        self.store = store or JobStore(data_dir, max_queued=config.max_queued, max_attempts=config.max_attempts)
        self._owns_store = store is None
        self.executor = executor
        self.session = secrets.token_hex(8)
        """Changes at every start, so clients notice a restart and subscribe again."""
        self._ctx = context or zmq.Context.instance()
        self._socket: zmq.Socket | None = None
        self.endpoint: str | None = None
        """The bound endpoint (the real port when bound to ``*``)."""
        self._peers: OrderedDict[bytes, _Peer] = OrderedDict()
        self._last_progress: dict[str, dict[str, Any]] = {}  # job id -> fields of its latest progress
        self._mailbox = _Mailbox()
        self._unrecorded: dict[str, tuple[str, str | None, str | None]] = {}  # job id -> end the store could not take
        self._storage_retry_at = 0.0  # monotonic time before which no job starts (after a storage error)
        self._wake_pending = False
        self._wake_r, self._wake_w = socket.socketpair()  # post() wakes the loop at once
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stop = threading.Event()
        self._handlers: dict[str, Callable[[_Peer, Message], None]] = {
            "hello": self._on_hello, "ping": self._on_ping, "submit": self._on_submit,
            "subscribe": self._on_subscribe, "unsubscribe": self._on_unsubscribe, "cancel": self._on_cancel,
            "result": self._on_result, "jobs": self._on_jobs, "delete": self._on_delete,
        }
        self.stats = {"received": 0, "refused": 0, "sent": 0, "coalesced": 0, "coalesced_before_loop": 0,
                      "dropped_peers": 0, "dropped_messages": 0, "dropped_events": 0, "unsendable": 0,
                      "oversize_messages": 0, "loop_errors": 0, "storage_errors": 0, "resumed": 0}
        """Counters: messages received, refused and sent; progress replaced by newer values for a slow client
        (coalesced) or before the loop took it (coalesced_before_loop); clients dropped; messages whose handling
        raised (dropped_messages, answered ``internal``); events that could not be handled (dropped_events);
        replies that could not be encoded (unsendable); messages over the size limit (their frames released as read); loop
        phases that raised; storage errors; jobs resumed after their worker died."""
        self.store.recover()

    # -- lifecycle

    def bind(self) -> str:
        """Create and bind the socket; returns the endpoint (written to <data>/endpoint for local clients)."""
        c = self.config
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.MAXMSGSIZE, c.limits.max_message_bytes)
        sock.setsockopt(zmq.SNDHWM, c.sndhwm)
        sock.setsockopt(zmq.RCVHWM, c.rcvhwm)
        sock.setsockopt(zmq.LINGER, c.linger_ms)
        sock.setsockopt(zmq.HEARTBEAT_IVL, int(c.heartbeat_s * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(c.heartbeat_s * c.liveness * 1000))
        if self._curve_keys is not None:
            self._curve = CurveServer(self._ctx, self._curve_keys)
            self._curve.secure(sock)
        try:
            sock.bind(c.bind)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise ConfigError(f"cannot bind {c.bind}: {exc}") from exc
        self._socket = sock
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        atomic_write(self.store.root / "endpoint", (self.endpoint + "\n").encode())
        logger.info("listening on %s (auth %s, data %s)", self.endpoint, "on" if self.signer.enabled else "OFF",
                    self.store.root)
        return self.endpoint

    def stop(self) -> None:
        """Ask the loop to end (thread- and signal-safe)."""
        self._stop.set()
        self._wake()

    def close(self) -> None:
        """Release the socket, the executor and the store."""
        if self.executor is not None:
            self.executor.close()
        if self._socket is not None:
            self._socket.close()
            self._socket = None
            (self.store.root / "endpoint").unlink(missing_ok=True)
        if self._curve is not None:
            self._curve.close()
            self._curve = None
        if self._owns_store:
            self.store.close()
        self._wake_r.close()
        self._wake_w.close()

    @property
    def client_count(self) -> int:
        """Clients the server currently remembers."""
        return len(self._peers)

    def post(self, job_id: str, type: str, **fields: Any) -> None:
        """Report a job event from another thread (an executor's callback); the loop publishes it."""
        self._mailbox.put(WorkerEvent(job_id, type, fields))
        if not self._wake_pending:
            self._wake_pending = True
            self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # already woken (buffer full) or closing

    def serve_forever(self) -> None:
        """Run until ``stop``; a bad message or a failing handler never ends the loop."""
        if self._socket is None:
            self.bind()
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        while not self._stop.is_set():
            busy = self.executor is not None or any(p.pending() for p in self._peers.values())
            ready = dict(poller.poll(20 if busy else 100))
            if self._wake_r.fileno() in ready:
                self._wake_pending = False
                try:
                    while self._wake_r.recv(4096):
                        pass
                except OSError:
                    pass  # drained
            phases = [self._drain_socket] if self._socket in ready else []
            for phase in (*phases, self._drain_events, self._record_ends, self._schedule, self._flush,
                          self._expire_peers):
                try:
                    phase()
                except Exception:  # a bug must not end the server: log it and go on with the next phase
                    self.stats["loop_errors"] += 1
                    logger.exception("error in the server loop (%s); going on", phase.__name__)

    # -- receiving

    def _drain_socket(self, max_messages: int = 1000) -> None:
        for _ in range(max_messages):
            received = self._receive()
            if received is None:
                return
            identity, frames = received
            self.stats["received"] += 1
            if not frames:
                continue  # an identity with no message: nothing to answer
            try:
                self._handle(identity, frames)
            except Exception as exc:  # one message must never end the loop
                self.stats["dropped_messages"] += 1
                logger.exception("dropped a message that made the server fail")
                self._send_now(identity, protocol.make("error", code="internal",
                                                       message=protocol.printable(f"{type(exc).__name__}: {exc}", 1000)))

    def _receive(self) -> tuple[bytes, list | ProtocolError] | None:
        """One message as (identity, frames), frame by frame; None when none waits.

        The frames past ``max_blobs + 2`` or past ``max_message_bytes`` in all are released as
        they are read (never copied, never kept), and the message comes back as the
        ProtocolError that refuses it: nothing of an oversize message is parsed, verified or
        held by this loop. libzmq delivers a multipart message only once all of it has
        arrived and bounds each frame (``MAXMSGSIZE``), not their sum: the limit here stops
        this process from holding a copy of it on top, not libzmq from assembling it.
        """
        sock = self._socket
        try:
            identity = sock.recv(flags=zmq.NOBLOCK, copy=True)
        except zmq.Again:
            return None
        limits = self.config.limits
        max_frames = limits.max_blobs + 2
        frames: list = []
        total = count = 0
        over = False
        while sock.getsockopt(zmq.RCVMORE):
            frame = sock.recv(copy=False)  # a zero-copy view of libzmq's buffer, freed once dropped
            count += 1
            total += len(frame)
            if not over and (count > max_frames or total > limits.max_message_bytes):
                over = True
                frames.clear()  # release what was kept; nothing more is kept
            if not over:
                frames.append(frame.buffer)
        if not over:
            return identity, frames
        self.stats["oversize_messages"] += 1
        if count > max_frames:
            return identity, ProtocolError("too_large", f"message of more than {max_frames} frames "
                                           f"(header, signature and at most {limits.max_blobs} blobs)", "blobs")
        return identity, ProtocolError("too_large", f"message of {total} bytes, at most {limits.max_message_bytes}",
                                       "frames")

    def _handle(self, identity: bytes, frames: list | ProtocolError) -> None:
        try:
            if isinstance(frames, ProtocolError):
                raise frames
            msg = protocol.decode(frames, self.signer, self.guard, self.config.limits)
        except ProtocolError as exc:
            self.stats["refused"] += 1
            logger.debug("refused a message: %s", exc)
            peer = self._peers.get(identity)
            if peer is not None:  # a known client: keep its replies in order
                self._reply(peer, protocol.error_message(exc))
            else:  # possibly unauthenticated: answer once, keep no state for it
                self._send_now(identity, protocol.error_message(exc))
            return
        peer = self._peer(identity)
        try:
            self._handlers[msg.type](peer, msg)
            peer.fresh = False
        except ProtocolError as exc:
            self._reply(peer, protocol.error_message(exc, msg.id))
        except JobNotFound as exc:
            self._reply(peer, protocol.make("error", msg.id, code="not_found", message=str(exc), field="job_id"))
        except StorageError as exc:
            self._storage_failed(exc)
            self._reply(peer, protocol.make("error", msg.id, code="storage", message=str(exc)[:1000]))
        except Exception as exc:  # a bug in a handler must not end the loop
            self.stats["dropped_messages"] += 1
            logger.exception("internal error handling %s", msg.type)
            self._reply(peer, protocol.make("error", msg.id, code="internal",
                                            message=protocol.printable(f"{type(exc).__name__}: {exc}", 1000)))

    def _peer(self, identity: bytes) -> _Peer:
        now = time.monotonic()
        peer = self._peers.get(identity)
        if peer is None:
            peer = self._peers[identity] = _Peer(identity, now)
            while len(self._peers) > self.config.max_peers:
                self._drop_peer(next(iter(self._peers)), "too many clients")
        else:
            self._peers.move_to_end(identity)
        peer.last_seen = now
        return peer

    # -- handlers

    def _on_hello(self, peer: _Peer, msg: Message) -> None:
        if protocol.PROTOCOL_VERSION not in msg["versions"]:
            raise ProtocolError("version", f"client speaks {msg['versions']}, server speaks {list(protocol.SUPPORTED_VERSIONS)}", "versions")
        self._reply(peer, protocol.make(
            "welcome", msg.id, server=f"engine-server {__version__}", versions=list(protocol.SUPPORTED_VERSIONS),
            models=list(self.config.models), presets=list(self.config.presets), device=self.config.device,
            heartbeat_s=self.config.heartbeat_s, signature=SIGNATURE_SCHEME if self.signer.enabled else "none",
            session=self.session, limits=self.config.limits.to_dict(),
            capabilities={"kinds": list(protocol.KINDS), "refine_modes": list(protocol.REFINE_MODES),
                          "max_queued": self.config.max_queued, "executor": self.executor is not None},
        ))

    def _on_ping(self, peer: _Peer, msg: Message) -> None:
        running = self.store.counts()["running"] if self.executor is not None else 0
        self._reply(peer, protocol.make("pong", msg.id, server_ts=time.time(), jobs_running=running, session=self.session,
                                        new_client=peer.fresh))

    def _on_submit(self, peer: _Peer, msg: Message) -> None:
        fields = dict(msg.fields)
        if fields.get("preset") is not None and fields["preset"] not in self.config.presets:
            raise ProtocolError("invalid", f"unknown preset {fields['preset']!r}; known: {', '.join(self.config.presets)}", "preset")
        check_submit(fields)
        self._check_prompt(fields)
        subscribe = fields.pop("subscribe")
        try:
            job, duplicate = self.store.submit(fields["request_id"], fields, label=fields["prompt"][:80])
        except Busy as exc:
            self._reply(peer, protocol.make("busy", msg.id, queued=exc.queued, max_queued=exc.max_queued,
                                            retry_after_s=5.0))
            return
        except JobConflict as exc:
            raise ProtocolError("conflict", str(exc), "request_id") from None
        if subscribe:
            peer.subscriptions.add(job.id)
        self._reply(peer, protocol.make("accepted", msg.id, job_id=job.id, request_id=job.request_id, state=job.state,
                                        duplicate=duplicate, queue_position=self.store.queue_position(job.id)))
        if subscribe and duplicate:
            self._catch_up(peer, job)

    def _check_prompt(self, fields: dict[str, Any]) -> None:
        """Refuse now a prompt the bundled prior would refuse once the job runs (after waiting in the queue).

        Only for the bundled prior: its vocabulary is known here without torch; a real prior
        takes any text. The model is ``options.model``, else the server's default (its first).
        """
        model = fields["options"].get("model") or (self.config.models[0] if self.config.models else None)
        if model != BUNDLED_MODEL or not fields["prompt"].strip():
            return
        try:
            parse_prompt(fields["prompt"])
        except UnknownPromptError as exc:
            raise ProtocolError("invalid", f"the bundled prior cannot draw this prompt: {exc}", "prompt") from None

    def _on_subscribe(self, peer: _Peer, msg: Message) -> None:
        job = self.store.get(msg["job_id"])
        peer.subscriptions.add(job.id)
        self._reply(peer, protocol.make("ok", msg.id, job_id=job.id, state=job.state, job=job.summary()))
        self._catch_up(peer, job)

    def _catch_up(self, peer: _Peer, job: Job) -> None:
        """Bring a (re)subscribing client up to date: the latest progress, or the job's end."""
        if job.terminal:
            peer.put_reliable(self._end_event(job))
            peer.subscriptions.discard(job.id)
        elif job.id in self._last_progress:  # a fresh message: the client may have seen the last one (nonce)
            peer.put_latest(protocol.make("progress", job_id=job.id, **self._last_progress[job.id]))

    @staticmethod
    def _end_event(job: Job) -> Message:
        if job.state == "failed":
            return protocol.make("failed", job_id=job.id, code=job.error_code or "failed", message=job.error_message or "")
        if job.state == "done":
            return protocol.make("done", job_id=job.id, summary={"attempts": job.attempts})
        return protocol.make("cancelled", job_id=job.id)

    def _on_unsubscribe(self, peer: _Peer, msg: Message) -> None:
        peer.subscriptions.discard(msg["job_id"])
        self._reply(peer, protocol.make("ok", msg.id, job_id=msg["job_id"]))

    def _on_cancel(self, peer: _Peer, msg: Message) -> None:
        before = self.store.get(msg["job_id"])
        job = self.store.request_cancel(before.id)
        if before.state == "running" and self.executor is not None:
            self.executor.cancel(job.id)
        self._reply(peer, protocol.make("ok", msg.id, job_id=job.id, state=job.state))
        if before.state == "queued":
            self._publish(self._end_event(job))

    def _on_result(self, peer: _Peer, msg: Message) -> None:
        try:
            fields = self.store.result_message_fields(msg["job_id"], glb=msg["glb"])
        except JobConflict as exc:
            raise ProtocolError("not_ready", str(exc), "job_id") from None
        self._reply(peer, protocol.make("result", msg.id, **fields))

    def _on_jobs(self, peer: _Peer, msg: Message) -> None:
        jobs = self.store.list(msg.get("state"), msg["limit"])
        self._reply(peer, protocol.make("job_list", msg.id, jobs=[j.summary() for j in jobs]))

    def _on_delete(self, peer: _Peer, msg: Message) -> None:
        try:
            self.store.delete(msg["job_id"])
        except JobConflict as exc:
            raise ProtocolError("conflict", str(exc), "job_id") from None
        for p in self._peers.values():
            p.subscriptions.discard(msg["job_id"])
        self._last_progress.pop(msg["job_id"], None)
        self._reply(peer, protocol.make("ok", msg.id, job_id=msg["job_id"]))

    # -- jobs and their events

    def _schedule(self) -> None:
        """Start queued jobs while the executor has room and the store's disk has space."""
        if self.executor is None or self.executor.capacity() <= 0 or not self._storage_ok():
            return
        while self.executor.capacity() > 0:
            try:
                job = self.store.claim_next()
            except StorageError as exc:  # rolled back: the job stays queued
                self._storage_failed(exc)
                return
            if job is None:
                return
            logger.info("starting job %s (attempt %d of %d)", job.id, job.attempts, self.store.max_attempts)
            self._on_event(WorkerEvent(job.id, "progress", {"stage": "starting", "state": "running",
                                                            "message": f"attempt {job.attempts}"}))
            self.executor.start(job)

    def _storage_ok(self) -> bool:
        """Whether jobs may start: no storage error in the last second and ``min_free_bytes`` free."""
        now = time.monotonic()
        if now < self._storage_retry_at:
            return False
        try:
            free = shutil.disk_usage(self.store.root).free
        except OSError as exc:
            free, why = 0, str(exc)
        else:
            why = f"{free / 2**20:.1f} MiB free, {self.config.min_free_bytes / 2**20:.1f} MiB needed"
        if free >= self.config.min_free_bytes:
            return True
        self._storage_retry_at = now + STORAGE_RETRY_S
        if self.store.counts()["queued"]:
            logger.warning("not starting queued jobs: the job store's disk (%s) has too little space (%s)",
                           self.store.root, why)
        return False

    def _storage_failed(self, exc: StorageError) -> None:
        """Note a storage error: count it, log it, and start no job for a while."""
        self.stats["storage_errors"] += 1
        self._storage_retry_at = time.monotonic() + STORAGE_RETRY_S
        logger.error("%s", exc)

    def _record_ends(self) -> None:
        """Record the job ends the store could not take when they happened (its subscribers already know them)."""
        if not self._unrecorded or time.monotonic() < self._storage_retry_at:
            return
        for job_id, (state, code, message) in list(self._unrecorded.items()):
            try:
                self.store.finish(job_id, state, code, message)
            except (JobConflict, JobNotFound):
                pass  # ended or deleted meanwhile
            except StorageError as exc:
                self._storage_failed(exc)
                return
            self._unrecorded.pop(job_id, None)
            logger.info("recorded the end of job %s (%s) now that the store accepts writes", job_id, state)

    def _drain_events(self) -> None:
        if self.executor is not None:
            for event in self.executor.poll():
                self._mailbox.put(event)
        events = self._mailbox.take()
        self.stats["coalesced_before_loop"] = self._mailbox.replaced
        for event in events:
            try:
                self._on_event(event)
            except Exception:  # one bad event must not stop the others or the loop
                self.stats["dropped_events"] += 1
                logger.exception("dropped worker event %s for job %s", event.type, event.job_id)

    def _on_event(self, event: WorkerEvent) -> None:
        if event.type == "lost":
            event = self._resume_or_fail(event)
            if event is None:
                return
        msg = protocol.make(event.type, job_id=event.job_id, **event.fields)
        if event.type == "progress":
            self._last_progress[event.job_id] = dict(event.fields)
            try:  # a state change (starting, requeued: where the job runs now) is always recorded
                self.store.set_progress(event.job_id, {k: v for k, v in event.fields.items() if k != "state"},
                                        force="state" in event.fields)
            except StorageError as exc:  # a snapshot only: the event still goes out
                self._storage_failed(exc)
        elif event.type in RELIABLE:
            self._last_progress.pop(event.job_id, None)
            end = (event.type, None, None)
            if event.type == "failed":
                end = ("failed", event.fields.get("code", "failed"), event.fields.get("message", ""))
            try:
                self.store.finish(event.job_id, *end)
            except StorageError as exc:
                # Only this job fails, and its subscribers hear why; the store records it once it can.
                self._storage_failed(exc)
                end = ("failed", "storage", f"{exc}; the job could not be recorded as {event.type}")
                self._unrecorded[event.job_id] = end
                msg = protocol.make("failed", job_id=event.job_id, code=end[1], message=end[2])
        self._publish(msg)

    def _resume_or_fail(self, event: WorkerEvent) -> WorkerEvent | None:
        """A job whose worker died: back in the queue to resume from its checkpoint, or failed after max_attempts."""
        job = self.store.get(event.job_id)
        reason = event.fields.get("message", "the worker died")
        if job.terminal:
            return None
        if job.cancel_requested:
            return WorkerEvent(job.id, "cancelled", {})
        if job.attempts >= self.store.max_attempts:
            return WorkerEvent(job.id, "failed", {
                "code": event.fields.get("code", "worker_died"),
                "message": f"{reason} (attempt {job.attempts} of {self.store.max_attempts}; not retried)"})
        try:
            self.store.requeue(job.id)
        except StorageError as exc:
            return WorkerEvent(job.id, "failed", {"code": "storage", "message": f"{reason}; it could not be "
                                                  f"queued again to resume: {exc}"})
        self.stats["resumed"] += 1
        logger.warning("job %s: %s; resuming it from its last checkpoint (attempt %d of %d next)",
                       job.id, reason, job.attempts + 1, self.store.max_attempts)
        return WorkerEvent(job.id, "progress", {
            "stage": "requeued", "state": "queued",
            "message": f"{reason}; resuming from the last checkpoint (attempt {job.attempts + 1} of {self.store.max_attempts})"})

    def _publish(self, msg: Message) -> None:
        """Give a job event to every client subscribed to its job."""
        latest = _coalescable(msg.type)
        for peer in self._peers.values():
            if msg.job_id in peer.subscriptions:
                if not latest:
                    peer.put_reliable(msg)
                else:
                    if (msg.job_id, msg.type) in peer.latest:
                        self.stats["coalesced"] += 1
                    peer.put_latest(msg)
                if msg.type in RELIABLE:
                    peer.subscriptions.discard(msg.job_id)

    # -- sending

    def _reply(self, peer: _Peer, msg: Message) -> None:
        peer.put_reliable(msg)
        if len(peer.reliable) > self.config.max_pending:
            self._drop_peer(peer.identity, f"{len(peer.reliable)} messages unread")

    def _send_now(self, identity: bytes, msg: Message) -> bool:
        """Send one message; False when the client's pipe is full (True when sent, or dropped as unsendable)."""
        try:
            frames = protocol.encode(msg, self.signer)
        except (ValueError, TypeError) as exc:  # UnicodeEncodeError is a ValueError: drop it, never block the queue
            self.stats["unsendable"] += 1
            logger.error("dropped an unencodable %s to client %s: %s", msg.type, identity.hex(), exc)
            return True
        try:
            self._socket.send_multipart([identity, *frames], flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            if identity in self._peers:
                self._drop_peer(identity, "disconnected")
            return False
        self.stats["sent"] += 1
        return True

    def _flush(self) -> None:
        for peer in list(self._peers.values()):
            while peer.reliable:
                if not self._send_now(peer.identity, peer.reliable[0]):
                    break
                peer.reliable.popleft()
            else:
                while peer.latest:
                    key = next(iter(peer.latest))
                    if not self._send_now(peer.identity, peer.latest[key]):
                        break
                    peer.latest.pop(key, None)

    def _drop_peer(self, identity: bytes, reason: str) -> None:
        if self._peers.pop(identity, None) is not None:
            self.stats["dropped_peers"] += 1
            logger.info("forgetting client %s: %s", identity.hex(), reason)

    def _expire_peers(self) -> None:
        horizon = time.monotonic() - self.config.peer_expiry_s
        while self._peers:
            identity, peer = next(iter(self._peers.items()))
            if peer.last_seen >= horizon:
                return
            self._drop_peer(identity, f"silent for {self.config.peer_expiry_s:g} s")


def resolve_data_dir(config: ServerConfig) -> Path:
    """The job store folder a server with this config uses."""
    return Path(config.data_dir).expanduser() if config.data_dir else user_data_dir() / "data"


def serve(config: ServerConfig, executor: Executor | None = None, ready: Callable[[str], None] | None = None,
          *, worker: Any = None, make_executor: Callable[[Path], Executor] | None = None) -> int:
    """Run a server until SIGINT / SIGTERM; ``ready`` is called with the bound endpoint. Returns an exit status.

    ``worker``: a :class:`engine_server.service.worker.WorkerConfig` to run jobs in local child
    processes; ``make_executor``: builds another executor (a cluster's) from the job store
    folder. Either is started once the store is locked and the socket bound; with none of
    them nor ``executor`` the server only accepts and stores jobs (protocol-only).
    """
    server = EngineServer(config, executor=executor)
    try:
        endpoint = server.bind()
        if executor is None and make_executor is not None:
            server.executor = make_executor(server.store.root)
        elif executor is None and worker is not None:
            from engine_server.service.worker import LocalWorker  # its runner needs numpy; protocol-only servers do not

            server.executor = LocalWorker(server.store.root, worker)
        if ready is not None:
            ready(endpoint)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: server.stop())
        server.serve_forever()
    finally:
        server.close()
    return 0
