"""The engine client used by the Blender add-on and by scripts: one DEALER socket, no threads.

Every call that waits has a timeout; :meth:`EngineClient.poll_events` never blocks
(with ``timeout=0``), so Blender's timer can drain it on the main thread. Heartbeats
ride on those calls: a ``ping`` goes out every ``heartbeat_s`` while the client is
used, and the server counts as unresponsive once nothing came back for ``liveness``
intervals (Paranoid Pirate). A request that times out is retried on a fresh socket
after a growing back-off (Lazy Pirate); ``submit`` keeps its request id across retries,
so a retried submit never makes a second job. After a reconnect or a server restart
(a new ``session`` in ``pong``) the client subscribes again to its unfinished jobs.

Not thread-safe: use one client per thread. No torch, bpy or numpy import (numpy
is used lazily by protocol Arrays when present).
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq

from engine_server.wire import protocol
from engine_server.wire.auth import ReplayGuard, Signer, default_key_path, load_key
from engine_server.wire.curve import HandshakeWatch, derive_keys, secure_client
from engine_server.wire.protocol import DEFAULT_ENDPOINT, Array, Image, Limits, Message, ProtocolError

logger = logging.getLogger(__name__)

"""Where a local engine listens unless told otherwise."""


class EngineError(Exception):
    """Base of the client's errors."""


class RequestError(EngineError):
    """The server refused a request (an ``error`` reply): ``code``, ``message`` and the offending ``field``."""

    def __init__(self, code: str, message: str, field: str | None = None):
        super().__init__(f"{code}: {message}" + (f" (field {field})" if field else ""))
        self.code = code
        self.message = message
        self.field = field


class ServerBusy(EngineError):
    """The server's queue is full; try again after ``retry_after_s``."""

    def __init__(self, queued: int, max_queued: int, retry_after_s: float):
        super().__init__(f"engine busy: {queued} jobs queued (at most {max_queued}); retry in {retry_after_s:g} s")
        self.queued = queued
        self.max_queued = max_queued
        self.retry_after_s = retry_after_s


class EngineTimeout(EngineError, TimeoutError):
    """No reply within the timeout, after every retry."""


@dataclass(frozen=True)
class FetchedResult:
    """A finished job's result as fetched from the server."""

    job_id: str
    """The job."""
    glb: bytes
    """The GLB file (empty when not asked for)."""
    texture: bytes | None
    """The base-colour texture's PNG bytes."""
    arrays: dict[str, Array]
    """Named arrays: vertices, faces, uvs, ... (``.numpy()`` for numpy views)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Facts about the run: ``name`` (the object's), ``placement``, seed, timings, ``material`` (metallic,
    roughness), ``export`` (format, file, files), ..."""
    normal_texture: bytes | None = None
    """The tangent-space normal map's PNG bytes (Non-Color data), or None."""
    files: dict[str, bytes] = field(default_factory=dict)
    """The export format's files by name (``meta["export"]``: model.obj + model.mtl + PNGs, model.usdz ...), fetched
    with the GLB; empty for GLB-only jobs or when the GLB was not asked for."""


def _stamped_before_restart(reply: Message) -> bool:
    """Whether a reply refuses our request for a timestamp from before the server's start (it restarted meanwhile)."""
    return reply.type == "error" and reply.get("code") == "replay" and reply.get("field") == "ts"


def _rows(matrix: Any) -> Any:
    """A 4x4 matrix (numpy array, Blender ``mathutils.Matrix``, nested sequences) as lists of floats, row by row."""
    try:
        return [[float(x) for x in row] for row in matrix]
    except (TypeError, ValueError):
        return matrix  # not a matrix: the field check names the problem


class EngineClient:
    """A connection to one engine server.

    ``key_file``: the server's key file (default: the per-user default path); ``key``
    gives the key bytes directly; ``auth=False`` talks to a server started without
    authentication (loopback only).
    """

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, key_file: str | os.PathLike | None = None, *,
                 key: bytes | None = None, auth: bool = True, timeout: float = 10.0, retries: int = 2,
                 heartbeat_s: float = 1.0, liveness: int = 3, backoff_s: tuple[float, float] = (0.25, 8.0),
                 limits: Limits = protocol.DEFAULT_LIMITS, client_name: str = "engine-client",
                 context: zmq.Context | None = None):
        self._key_source = "given as bytes" if key is not None else str(key_file or default_key_path())
        if auth and key is None:
            key = load_key(key_file if key_file is not None else default_key_path())
        self.endpoint = endpoint
        self.timeout = float(timeout)
        """Seconds to wait for one reply before retrying."""
        self.retries = int(retries)
        """Re-sends (on a fresh socket) after a timeout before giving up."""
        self.heartbeat_s = float(heartbeat_s)
        """Seconds between pings while the client is in use."""
        self.liveness = int(liveness)
        """Heartbeat intervals without any message before the server counts as unresponsive."""
        self.backoff_s = backoff_s
        """(first, largest) delay between reconnects; doubles each time."""
        self.limits = limits
        """Bounds checked before sending (narrowed to the server's in ``hello``)."""
        self.client_name = client_name
        self.server_session: str | None = None
        """The server instance's session id (changes when the server restarts)."""
        self.welcome: dict[str, Any] | None = None
        """Fields of the last ``welcome``."""
        self._signer = Signer(key if auth else None)
        self._curve_keys = derive_keys(key) if auth else None
        self._handshake: HandshakeWatch | None = None
        self._guard = ReplayGuard()
        self._ctx = context or zmq.Context.instance()
        self._socket: zmq.Socket | None = None
        self._poller = zmq.Poller()
        self._events: list[Message] = []
        self._replies: dict[str, Message] = {}
        self._waiting: set[str] = set()  # ids of requests whose replies someone waits for
        self._resubscribing: dict[str, str] = {}  # message id -> job id
        self._subscriptions: set[str] = set()
        self._refusal: str | None = None  # why the last bad message from the server was dropped
        self._last_recv = time.monotonic()
        self._unanswered_since: float | None = None
        self._last_ping = -1e18
        self._backoff = backoff_s[0]
        self._next_reconnect = 0.0
        self.reconnects = 0
        """How many times the socket was re-created."""
        self._open()

    # -- socket

    def _open(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self._curve_keys is not None:  # the server admits only peers holding its key (wire.curve)
            secure_client(sock, self._curve_keys)
            self._handshake = HandshakeWatch(sock)
        sock.setsockopt(zmq.SNDHWM, 1000)
        sock.setsockopt(zmq.RCVHWM, 10000)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, int(self.backoff_s[1] * 1000))
        sock.connect(self.endpoint)
        self._socket = sock
        self._poller.register(sock, zmq.POLLIN)
        self._last_ping = -1e18  # probe the new connection at once

    def _reconnect(self) -> None:
        """Drop the socket (and whatever it queued) and open a fresh one; subscriptions are sent again."""
        logger.info("reconnecting to %s", self.endpoint)
        self._close_socket()
        self._open()
        self.reconnects += 1
        self._resubscribe()

    def _close_socket(self) -> None:
        if self._handshake is not None:
            self._handshake.close()
            self._handshake = None
        if self._socket is not None:
            self._poller.unregister(self._socket)
            self._socket.close(linger=0)
            self._socket = None

    def close(self) -> None:
        """Close the socket at once (nothing waits to be sent)."""
        self._close_socket()

    def __enter__(self) -> EngineClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- sending and receiving

    def _send(self, msg: Message) -> bool:
        """Check, sign and send without blocking; False when the socket cannot take it now."""
        if self._socket is None:
            raise EngineError("client is closed")
        frames = protocol.encode(msg, self._signer)
        total = sum(len(f) for f in frames)
        if total > self.limits.max_message_bytes:
            raise RequestError("too_large", f"message of {total} bytes, at most {self.limits.max_message_bytes}", "frames")
        try:
            self._socket.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        return True

    def _receive(self, timeout: float, max_messages: int = 2000) -> None:
        """Take the messages waiting (up to ``timeout`` s for the first, at most ``max_messages``); sort them."""
        if self._socket is None:
            raise EngineError("client is closed")
        wait_ms = max(0, int(timeout * 1000))
        for _ in range(max_messages):
            if self._socket is None or not self._poller.poll(wait_ms):
                return
            wait_ms = 0
            frames = self._socket.recv_multipart(copy=True)
            try:
                msg = protocol.decode(frames, self._signer, self._guard, protocol.RECEIVE_LIMITS,
                                      from_client=False)
            except ProtocolError as exc:
                self._refusal = str(exc)
                logger.warning("dropped a bad message from the server: %s", exc)
                continue
            self._last_recv = time.monotonic()
            self._unanswered_since = None
            self._accept(msg)

    def _accept(self, msg: Message) -> None:
        if msg.type == "pong":
            if msg.get("session"):
                self._note_session(msg["session"])
            if msg.get("new_client") and self._subscriptions:  # the server forgot us (or never knew us)
                self._resubscribe()
        if msg.parent is not None:
            job_id = self._resubscribing.pop(msg.parent, None)
            if job_id is not None and msg.type == "error":  # e.g. the job was deleted meanwhile
                self._subscriptions.discard(job_id)
            elif msg.parent in self._waiting:
                self._replies[msg.parent] = msg
            return  # else a late reply to a request that timed out
        if msg.type in protocol.EVENT_TYPES:
            if msg.type in protocol.TERMINAL_STATES:
                self._subscriptions.discard(msg.job_id)
            if msg.type in ("progress", "preview"):  # latest value wins here too
                self._events = [e for e in self._events if not (e.type == msg.type and e.job_id == msg.job_id)]
            self._events.append(msg)
        elif msg.type == "error":
            if self._waiting:  # refused before the server could read our id (e.g. bad signature)
                self._replies["*"] = msg
            else:
                logger.warning("engine refused a message: %s: %s", msg.get("code"), msg.get("message"))
        else:
            logger.debug("ignoring unsolicited %s", msg.type)

    def _note_session(self, session: str) -> None:
        if self.server_session is not None and session != self.server_session:
            logger.info("engine restarted (session %s -> %s); subscribing again", self.server_session, session)
            self._resubscribe()
        self.server_session = session

    def _resubscribe(self) -> None:
        """Send subscribe again for every unfinished job (replies are ignored; events follow)."""
        if len(self._resubscribing) > 10000:
            self._resubscribing.clear()
        for job_id in sorted(self._subscriptions):
            msg = protocol.make("subscribe", job_id=job_id)
            self._resubscribing[msg.id] = job_id
            self._send(msg)

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if now - self._last_ping >= self.heartbeat_s:
            self._last_ping = now
            if self._send(protocol.make("ping")) and self._unanswered_since is None:
                self._unanswered_since = now
        if not self._responsive(now) and now >= self._next_reconnect:
            self._reconnect()
            self._next_reconnect = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, self.backoff_s[1])
        elif self._responsive(now):
            self._backoff = self.backoff_s[0]

    def _responsive(self, now: float) -> bool:
        """False once the server was silent for ``liveness`` intervals and a ping went unanswered for ``liveness - 1``.

        The second condition keeps a client that was not polled for a while (so sent no
        pings) from blaming the server for the silence.
        """
        if now - self._last_recv <= self.liveness * self.heartbeat_s or self._unanswered_since is None:
            return True
        return now - self._unanswered_since <= (self.liveness - 1) * self.heartbeat_s

    @property
    def is_responsive(self) -> bool:
        """False once the server has been silent for ``liveness`` heartbeat intervals while we pinged it."""
        return self._responsive(time.monotonic())

    def _request(self, msg_type: str, timeout: float | None = None, retries: int | None = None, **fields: Any) -> Message:
        """Send a request and wait for the reply linked to it; error replies raise RequestError."""
        fields = {k: v for k, v in fields.items() if v is not None}
        try:
            protocol.check_fields(msg_type, fields, self.limits)  # refuse here what the server would refuse
        except ProtocolError as exc:
            raise RequestError(exc.code, exc.message, exc.field) from None
        timeout = self.timeout if timeout is None else float(timeout)
        retries = self.retries if retries is None else int(retries)
        self._refusal = None
        try:
            return self._exchange(msg_type, fields, timeout, retries)
        finally:
            self._waiting.clear()
            self._replies.clear()

    def _exchange(self, msg_type: str, fields: dict[str, Any], timeout: float, retries: int) -> Message:
        restamped = False
        for attempt in range(retries + 1):
            msg = protocol.make(msg_type, **fields)
            self._waiting.add(msg.id)
            deadline = time.monotonic() + timeout
            sent = self._send(msg)
            while True:
                if self._replies:  # to this attempt or an earlier one: the request is idempotent
                    reply = self._replies.pop(msg.id, None) or self._replies.popitem()[1]
                    if _stamped_before_restart(reply) and not restamped:
                        # Signed before the server restarted and delivered after: the same request, stamped now.
                        restamped = True
                        msg = protocol.make(msg_type, **fields)
                        self._waiting.add(msg.id)
                        sent = self._send(msg)
                        continue
                    return self._check_reply(reply)
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if not sent:
                    sent = self._send(msg)
                reconnects = self.reconnects
                self._receive(min(left, self.heartbeat_s) if sent else min(left, 0.05))
                self.check_handshake()
                self._heartbeat()
                if self.reconnects != reconnects:  # the socket was replaced: what it held is gone
                    msg = protocol.make(msg_type, **fields)
                    self._waiting.add(msg.id)
                    sent = self._send(msg)
            if attempt < retries:
                logger.info("no reply to %s within %.1f s; retrying on a fresh socket", msg_type, timeout)
                time.sleep(min(self._backoff, max(0.0, timeout)))
                self._backoff = min(self._backoff * 2, self.backoff_s[1])
                self._reconnect()
        hint = ""
        if self._refusal:
            hint = (f" (replies from the server were refused: {self._refusal}; "
                    "does this client use the server's key file, does the server sign, are the clocks right?)")
        raise EngineTimeout(f"no reply to {msg_type} from {self.endpoint} after {retries + 1} tries of {timeout:g} s{hint}")

    def check_handshake(self) -> None:
        """Raise RequestError ``auth`` once the server has refused this client's key at the handshake."""
        failed = self._handshake.poll() if self._handshake is not None else None
        if failed:
            raise RequestError("auth", f"{failed}; key file {self._key_source}", None)

    @staticmethod
    def _check_reply(reply: Message) -> Message:
        if reply.type == "error":
            raise RequestError(reply["code"], reply.get("message", ""), reply.get("field"))
        if reply.type == "busy":
            raise ServerBusy(reply["queued"], reply["max_queued"], reply.get("retry_after_s", 5.0))
        return reply

    # -- the API

    def hello(self, timeout: float | None = None) -> dict[str, Any]:
        """Introduce ourselves; returns the ``welcome`` fields (versions, models, device, limits, session)."""
        reply = self._request("hello", timeout, client=self.client_name, versions=list(protocol.SUPPORTED_VERSIONS))
        self.welcome = dict(reply.fields)
        server_limits = Limits.from_dict(reply.get("limits") or {})
        self.limits = Limits(**{k: min(v, getattr(server_limits, k)) for k, v in self.limits.to_dict().items()})
        if reply.get("session"):
            self._note_session(reply["session"])
        return self.welcome

    def ping(self, timeout: float | None = None) -> float:
        """One round trip; returns its duration in seconds."""
        start = time.perf_counter()
        self._request("ping", timeout, retries=0)
        return time.perf_counter() - start

    def submit(self, kind: str, prompt: str = "", *, negative_prompt: str | None = None, seed: int | None = None,
               preset: str | None = None, image: bytes | Image | None = None, rig: Sequence[Mapping] | None = None,
               mesh: Mapping[str, Any] | None = None, mode: str | None = None, placement: Sequence | None = None,
               options: Mapping[str, Any] | None = None, request_id: str | None = None, subscribe: bool = True,
               timeout: float | None = None) -> str:
        """Queue a job; returns its id. Raises ServerBusy, RequestError (naming the bad field), EngineTimeout.

        The fields are the ``submit`` message's (its schema in :mod:`protocol` is the contract; which
        of them a kind reads, the server's kind table decides). Conveniences here: ``image`` may be
        PNG bytes, arrays numpy arrays, matrices numpy arrays or ``mathutils.Matrix``. Retries reuse
        ``request_id`` (a fresh one by default), so the server makes one job however many times the
        request arrives.
        """
        if isinstance(image, (bytes, bytearray, memoryview)):
            try:
                image = Image.from_png(image)
            except ValueError as exc:
                raise RequestError("invalid", str(exc), "image") from None
        if rig:
            rig = [{**cam, "matrix_world": _rows(cam["matrix_world"])} if "matrix_world" in cam else dict(cam)
                   for cam in rig]
        if mesh is not None:
            mesh = dict(mesh)
            if mesh.get("matrix_world") is not None:
                mesh["matrix_world"] = _rows(mesh["matrix_world"])
        reply = self._request(
            "submit", timeout, request_id=request_id or protocol.new_id(), kind=kind, prompt=prompt,
            negative_prompt=negative_prompt, seed=seed, preset=preset, image=image, rig=rig or None, mesh=mesh,
            mode=mode, placement=_rows(placement) if placement is not None else None,
            options=dict(options) if options else None, subscribe=subscribe)
        job_id = reply["job_id"]
        if subscribe and reply["state"] not in protocol.TERMINAL_STATES:
            self._subscriptions.add(job_id)
        return job_id

    def subscribe(self, job_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Receive this job's events from now on (an ended job sends its last event again); returns the job summary."""
        self._subscriptions.add(job_id)
        try:
            reply = self._request("subscribe", timeout, job_id=job_id)
        except RequestError:
            self._subscriptions.discard(job_id)
            raise
        job = reply.get("job") or {}
        if job.get("state") in protocol.TERMINAL_STATES:
            self._subscriptions.discard(job_id)
        return job

    def unsubscribe(self, job_id: str, timeout: float | None = None) -> None:
        """Stop receiving this job's events."""
        self._subscriptions.discard(job_id)
        self._request("unsubscribe", timeout, job_id=job_id)

    def cancel(self, job_id: str, timeout: float | None = None) -> str:
        """Ask the server to cancel; returns the job's state now (the ``cancelled`` event follows for a running job)."""
        return self._request("cancel", timeout, job_id=job_id).get("state", "")

    def result(self, job_id: str, timeout: float | None = 60.0, *, glb: bool = True) -> FetchedResult:
        """The finished job's arrays, textures and meta, and its GLB and export files unless ``glb`` is False (an
        importer builds the object from the arrays); RequestError ``not_ready`` when it has not finished as done."""
        reply = self._request("result", timeout, job_id=job_id, glb=glb)
        blob, texture, normal = reply.get("glb"), reply.get("texture"), reply.get("normal_texture")
        return FetchedResult(job_id, bytes(blob.data) if blob is not None else b"",
                             bytes(texture.data) if texture is not None else None, dict(reply.get("arrays") or {}),
                             dict(reply.get("meta") or {}), bytes(normal.data) if normal is not None else None,
                             {name: bytes(b.data) for name, b in (reply.get("files") or {}).items()})

    def jobs(self, state: str | None = None, limit: int = 100, timeout: float | None = None) -> list[dict[str, Any]]:
        """The server's jobs, newest first (summaries: job_id, state, kind, label, progress, error)."""
        return list(self._request("jobs", timeout, state=state, limit=limit)["jobs"])

    def delete(self, job_id: str, timeout: float | None = None) -> None:
        """Delete a job that is not running, with its result."""
        self._subscriptions.discard(job_id)
        self._request("delete", timeout, job_id=job_id, retries=0)

    def poll_events(self, timeout: float = 0.0) -> list[Message]:
        """Job events received so far (progress, preview, mesh, done, failed, cancelled), oldest first.

        Waits at most ``timeout`` seconds for the first one (0: never blocks). Older
        progress and previews of a job are replaced by newer ones not yet taken.
        """
        if not self._events:
            self._receive(timeout)
        else:
            self._receive(0.0)
        self._heartbeat()
        events, self._events = self._events, []
        return events

    def wait(self, job_id: str, timeout: float) -> Message:
        """Poll until the job's terminal event (done, failed, cancelled) and return it; EngineTimeout otherwise.

        Other events received meanwhile stay queued for ``poll_events``.
        """
        deadline = time.monotonic() + timeout
        kept: list[Message] = []
        try:
            while True:
                for event in self.poll_events(min(self.heartbeat_s, max(0.0, deadline - time.monotonic()))):
                    if event.job_id == job_id and event.type in protocol.TERMINAL_STATES:
                        return event
                    kept.append(event)
                if time.monotonic() >= deadline:
                    raise EngineTimeout(f"job {job_id} did not end within {timeout:g} s")
        finally:
            self._events = kept + self._events

    @property
    def subscriptions(self) -> frozenset[str]:
        """Jobs whose events this client receives."""
        return frozenset(self._subscriptions)
