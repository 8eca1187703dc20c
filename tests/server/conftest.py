"""Shared fixtures for the server tests: a key file, servers on free loopback ports, raw peers."""
from __future__ import annotations

import io
import json
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from engine_server.wire import protocol
from engine_server.wire.auth import ReplayGuard, Signer, load_or_create_key
from engine_server.wire.curve import derive_keys, secure_client
from engine_server.wire.client import EngineClient
from engine_server.service.server import EngineServer, ServerConfig

HEARTBEAT_S = 0.5


def png_bytes(width: int = 8, height: int = 6, noise: bool = False) -> bytes:
    """A real PNG file: one colour, or random noise (which PNG cannot compress)."""
    from PIL import Image as PILImage

    if noise:
        pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
        image = PILImage.fromarray(pixels)
    else:
        image = PILImage.new("RGB", (width, height), (200, 30, 30))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def glb_bytes(extra: int = 0) -> bytes:
    """A minimal valid binary glTF 2.0 file (JSON chunk only), padded with ``extra`` bytes of BIN chunk."""
    doc = json.dumps({"asset": {"version": "2.0"}}).encode()
    doc += b" " * (-len(doc) % 4)
    body = struct.pack("<I4s", len(doc), b"JSON") + doc
    if extra:
        extra += -extra % 4
        body += struct.pack("<I4s", extra, b"BIN\x00") + bytes(extra)
    return struct.pack("<4sII", b"glTF", 2, 12 + len(body)) + body


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "key"
    load_or_create_key(path)
    return path


@pytest.fixture
def key(key_file: Path) -> bytes:
    return key_file.read_text().strip().encode()


@pytest.fixture
def make_server(tmp_path: Path, key_file: Path):
    """Start an EngineServer in a thread on a free loopback port: make_server(**config overrides)."""
    started: list[tuple[EngineServer, threading.Thread]] = []

    def factory(**overrides) -> EngineServer:
        cfg = dict(bind="tcp://127.0.0.1:*", data_dir=tmp_path / "data", key_file=key_file, heartbeat_s=HEARTBEAT_S)
        cfg.update(overrides)
        server = EngineServer(ServerConfig(**cfg))
        server.bind()
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        started.append((server, thread))
        return server

    yield factory
    for server, thread in started:
        server.stop()
        thread.join(10)
        server.close()


@pytest.fixture
def make_client(key_file: Path):
    """EngineClient factory (closed at the end)."""
    clients: list[EngineClient] = []

    def factory(endpoint: str, **kw) -> EngineClient:
        kw.setdefault("key_file", key_file)
        kw.setdefault("timeout", 5.0)
        kw.setdefault("heartbeat_s", HEARTBEAT_S)
        c = EngineClient(endpoint, **kw)
        clients.append(c)
        return c

    yield factory
    for c in clients:
        c.close()


class RawPeer:
    """A bare DEALER that sends whatever frames a test wants and decodes what comes back."""

    def __init__(self, endpoint: str, key: bytes | None):
        self.signer = Signer(key)
        self.guard = ReplayGuard()
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        if key is not None:
            secure_client(self.socket, derive_keys(key))
        self.socket.connect(endpoint)

    def send_frames(self, frames) -> None:
        self.socket.send_multipart(frames)

    def send_header(self, header: dict, blobs=(), *, sign: bool = True) -> dict:
        """Send a header dict (envelope filled in unless given) with blobs; returns the full header."""
        full = {"v": 1, "type": "ping", "id": protocol.new_id(), "parent": None, "ts": time.time(),
                "nonce": protocol.new_id()}
        full.update(header)
        head = json.dumps(full).encode()
        sig = self.signer.sign([head, *blobs]) if sign else b""
        self.send_frames([head, sig, *blobs])
        return full

    def recv(self, timeout: float = 5.0) -> protocol.Message | None:
        if not self.socket.poll(int(timeout * 1000)):
            return None
        frames = self.socket.recv_multipart()
        return protocol.decode(frames, self.signer, self.guard, protocol.RECEIVE_LIMITS, from_client=False)

    def close(self) -> None:
        self.socket.close(linger=0)


@pytest.fixture
def make_raw(key: bytes):
    peers: list[RawPeer] = []

    def factory(endpoint: str, key_override: bytes | None | str = "same") -> RawPeer:
        p = RawPeer(endpoint, key if key_override == "same" else key_override)
        peers.append(p)
        return p

    yield factory
    for p in peers:
        p.close()
