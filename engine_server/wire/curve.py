"""Connection-level authentication and encryption: ZMTP CURVE keys derived from the shared key.

HMAC signing (:mod:`engine_server.wire.auth`) authenticates each message, but only once libzmq
has handed the whole message over: libzmq assembles every frame of a multipart message
before the first one can be read, and bounds each frame (``MAXMSGSIZE``), not their number.
An unauthenticated peer could therefore make the server hold many frames' worth of memory.
With CURVE the handshake happens when a peer connects, before libzmq accepts a single
message from it: a peer without the key never gets a message buffered, and every byte on
the wire is encrypted (a non-loopback bind is no longer plain text).

Both ends derive the same two key pairs from the key file's secret, so nothing new has to
be distributed: the server's pair (``HMAC-SHA256(key, "engine-server/curve/server")`` as
the Curve25519 secret key) and the clients' pair (the same with ``"client"``). The server
accepts only connections whose client public key is the derived one (a ZAP handler); a
client dialling with other keys fails the handshake, which :class:`HandshakeWatch` reports
so the client can say "wrong key" instead of waiting for a reply that never comes.

No torch, bpy or numpy import: this module is copied into the Blender add-on.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
from typing import NamedTuple

import zmq
from zmq.utils import z85

logger = logging.getLogger(__name__)

_LABEL = b"engine-server/curve/"
ZAP_DOMAIN = "engine-server"
"""The ZAP domain of the server's socket."""


class CurveKeys(NamedTuple):
    """The derived key pairs, Z85-encoded as libzmq takes them."""

    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes


def curve_available() -> bool:
    """Whether this libzmq was built with CURVE (pyzmq's wheels are)."""
    return bool(zmq.has("curve"))


def derive_keys(key: bytes) -> CurveKeys:
    """The server's and the clients' CURVE key pairs from the shared secret ``key``."""
    if not curve_available():
        raise RuntimeError("this libzmq has no CURVE support; install pyzmq from its wheels")

    def pair(role: bytes) -> tuple[bytes, bytes]:
        secret = z85.encode(hmac.new(key, _LABEL + role, hashlib.sha256).digest())
        return zmq.curve_public(secret), secret

    server_public, server_secret = pair(b"server")
    client_public, client_secret = pair(b"client")
    return CurveKeys(server_public, server_secret, client_public, client_secret)


class _OnlyOurClients:
    """ZAP credentials provider: the derived client public key and nothing else."""

    def __init__(self, client_public: bytes) -> None:
        self.client_public = client_public
        self.refused = 0
        """Handshakes refused (a peer with another key)."""

    def callback(self, domain: str, key: bytes) -> bool:
        ok = hmac.compare_digest(key, self.client_public)
        if not ok:
            self.refused += 1
            logger.warning("refused a connection whose CURVE key is not derived from this server's key file")
        return ok


class CurveServer:
    """The server side: the ZAP handler thread and the socket options of a CURVE server."""

    def __init__(self, context: zmq.Context, keys: CurveKeys) -> None:
        import zmq.auth.thread  # the server's side only; clients (the add-on) never start a ZAP handler

        self.keys = keys
        self.provider = _OnlyOurClients(keys.client_public)
        self._auth = zmq.auth.thread.ThreadAuthenticator(context, log=logging.getLogger(__name__ + ".zap"))
        self._auth.start()
        self._auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=self.provider)

    def secure(self, sock: zmq.Socket) -> None:
        """Make ``sock`` (before bind) a CURVE server that checks clients through the ZAP handler."""
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.keys.server_secret)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.keys.server_public)
        sock.setsockopt_string(zmq.ZAP_DOMAIN, ZAP_DOMAIN)

    def close(self) -> None:
        self._auth.stop()


def secure_client(sock: zmq.Socket, keys: CurveKeys) -> None:
    """Make ``sock`` (before connect) a CURVE client of the server these keys belong to."""
    sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server_public)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.client_public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.client_secret)


class HandshakeWatch:
    """Watches a client socket's monitor for a refused handshake (the server holds another key)."""

    _FAILED = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    _EVENTS = _FAILED | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED
    REFUSED = ("the server refused this client's key: the key file here is not the server's "
               "(or the server runs without authentication)")

    def __init__(self, sock: zmq.Socket) -> None:
        self._monitor = sock.get_monitor_socket(self._EVENTS)
        self._shaking = False
        self.failed: str | None = None
        """Why the last handshake failed, until one succeeds; None while none has failed."""

    def poll(self) -> str | None:
        """Read pending monitor events without blocking; returns :attr:`failed`."""
        from zmq.utils.monitor import recv_monitor_message

        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.failed, self._shaking = None, False
            elif event == zmq.EVENT_CONNECTED:
                self._shaking = True
            # A server holding another key cannot read our hello and hangs up mid-handshake.
            elif event & self._FAILED or (event == zmq.EVENT_DISCONNECTED and self._shaking):
                self.failed, self._shaking = self.REFUSED, False
        return self.failed

    def close(self) -> None:
        self._monitor.close(linger=0)
