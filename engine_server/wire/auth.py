"""Per-install message authentication: the key file, HMAC signing, and the replay window.

Every message on the wire is signed with HMAC-SHA256 under a secret shared by the
server and its clients through a key file readable only by its owner (mode 0600), as
jupyter_client does with its connection file. The server creates the file on its first
start; the Blender add-on and scripts find it at the same default path.

The signature covers the header frame and every blob frame, each prefixed with its
length, so bytes cannot be moved across a frame boundary without breaking it. A nonce
and a timestamp in the (signed) header let the receiver refuse a replayed message:
a nonce seen inside the window, or a timestamp outside it, is refused.

No torch, bpy or numpy import: this module is copied into the Blender add-on.
"""
from __future__ import annotations

import hashlib
import heapq
import hmac
import logging
import os
import secrets
import stat
import struct
import sys
import time
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

KEY_FILE_ENV = "ENGINE_SERVER_KEY_FILE"
"""Environment variable naming the key file (overrides the default path)."""
DATA_DIR_ENV = "ENGINE_SERVER_HOME"
"""Environment variable naming the per-user data folder (overrides the platform default)."""
MIN_KEY_CHARS = 32
"""Shortest key accepted from a key file (the generated key has 64 hex characters)."""
SIGNATURE_SCHEME = "hmac-sha256"
"""Name of the signing scheme, announced in the server's welcome."""
_DOMAIN = b"engine-server/v1\x00"
"""Domain-separation prefix mixed into every MAC."""


class KeyFileError(Exception):
    """The key file is missing, unreadable, too open, or holds no usable key."""


def user_data_dir() -> Path:
    """The per-user folder of the engine: key file, default job store.

    ``$ENGINE_SERVER_HOME`` when set; otherwise ``$XDG_DATA_HOME/engine-server``
    (``~/.local/share/engine-server``) on Linux, ``~/Library/Application
    Support/engine-server`` on macOS and ``%LOCALAPPDATA%\\engine-server`` on Windows.
    """
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or os.path.expanduser("~\\AppData\\Local")
        return Path(base) / "engine-server"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "engine-server"
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(base) / "engine-server"


def default_key_path() -> Path:
    """Where the server writes and clients look for the key: ``$ENGINE_SERVER_KEY_FILE`` or ``<data dir>/key``."""
    env = os.environ.get(KEY_FILE_ENV)
    return Path(env).expanduser() if env else user_data_dir() / "key"


def _check_private(path: Path) -> None:
    """Refuse a key file that others can read or write (POSIX only), as ssh does."""
    if os.name != "posix":
        return
    st = path.stat()
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"key file {path} is accessible by other users (mode {stat.S_IMODE(st.st_mode):o}); "
            f"run: chmod 600 {path}"
        )
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise KeyFileError(f"key file {path} belongs to another user (uid {st.st_uid})")


def load_key(path: str | os.PathLike | None = None) -> bytes:
    """The key from an existing key file; raises KeyFileError naming the problem."""
    path = Path(path) if path is not None else default_key_path()
    try:
        _check_private(path)
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise KeyFileError(
            f"no key file at {path}: start the engine once (engine-server serve) to create it, "
            f"or pass the server's --key-file"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc}") from exc
    if len(text) < MIN_KEY_CHARS or not text.isprintable():
        raise KeyFileError(f"key file {path} holds no usable key (need >= {MIN_KEY_CHARS} printable ASCII characters)")
    return text.encode("ascii")


def load_or_create_key(path: str | os.PathLike | None = None) -> bytes:
    """The key from ``path``, creating the file (mode 0600, folder 0700) with a fresh random key if absent."""
    path = Path(path) if path is not None else default_key_path()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        text = secrets.token_hex(32) + "\n"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        try:
            fd = os.open(path, flags, 0o600)
        except FileExistsError:
            pass  # another process created it first: read theirs
        else:
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            logger.info("created key file %s", path)
    return load_key(path)


class Signer:
    """Signs and verifies frames with HMAC-SHA256; with no key it signs nothing and accepts anything."""

    def __init__(self, key: bytes | None):
        if key is not None and len(key) < MIN_KEY_CHARS:
            raise ValueError(f"key too short: {len(key)} bytes (need >= {MIN_KEY_CHARS})")
        self._key = key

    @property
    def enabled(self) -> bool:
        """Whether messages are signed and checked."""
        return self._key is not None

    def sign(self, parts: Sequence[bytes | memoryview]) -> bytes:
        """The signature frame for ``parts`` (header, then blobs): 64 hex digits, or b"" without a key."""
        if self._key is None:
            return b""
        mac = hmac.new(self._key, _DOMAIN, hashlib.sha256)
        mac.update(struct.pack(">I", len(parts)))
        for part in parts:
            mac.update(struct.pack(">Q", len(part)))
            mac.update(part)
        return mac.hexdigest().encode("ascii")

    def verify(self, parts: Sequence[bytes | memoryview], signature: bytes | memoryview) -> bool:
        """Whether ``signature`` is the signature of ``parts`` (constant-time compare)."""
        if self._key is None:
            return True
        return hmac.compare_digest(self.sign(parts), bytes(signature))


class ReplayGuard:
    """Refuses a message whose nonce was seen inside the window or whose timestamp lies outside it.

    Memory is bounded: past ``max_entries`` remembered nonces the oldest are forgotten
    and every timestamp up to the newest forgotten one is refused from then on, so a
    forgotten nonce can never be replayed (under a flood the window only narrows).

    Restarts: the nonces live in memory only, so a receiver that restarts passes
    ``not_before`` (its start time) and every message stamped earlier is refused: a
    message captured before the restart cannot be replayed after it. This was chosen over
    persisting the nonce window because a persisted window is only safe if every
    accepted nonce is written (and fsynced) before its message is acted on: a disk
    write per message, lost anyway on a kill -9 between accepting and writing, and
    impossible on a full disk. The cost of the floor is small: a request signed
    before the restart and delivered after it is refused with ``replay`` and sent again
    with a fresh timestamp, and a client whose clock lags the server's by d seconds
    is refused for the first d seconds after a restart only.
    """

    def __init__(self, window_s: float = 300.0, max_entries: int = 200_000, clock=time.time,
                 not_before: float | None = None):
        self.window_s = float(window_s)
        self.max_entries = int(max_entries)
        self._clock = clock
        self._seen: set[str] = set()
        self._heap: list[tuple[float, str]] = []
        self._floor = float("-inf")
        self.not_before = not_before
        """Timestamps before this (the receiver's start) are refused; None: no floor."""

    def __len__(self) -> int:
        return len(self._seen)

    def check(self, nonce: str, ts: float) -> tuple[str, str] | None:
        """Record (nonce, ts); None when fresh, else (field, reason) of the refusal."""
        now = self._clock()
        if abs(now - ts) > self.window_s:
            return "ts", f"timestamp is {now - ts:+.1f} s from the receiver's clock (window ±{self.window_s:g} s)"
        if self.not_before is not None and ts < self.not_before:
            return "ts", (f"timestamp is {self.not_before - ts:.3f} s older than the receiver's start "
                          "(a message from before a restart is never accepted; send it again)")
        if ts <= self._floor:
            return "ts", "timestamp is older than the replay memory (too many messages in the window)"
        self._expire(now)
        if nonce in self._seen:
            return "nonce", "nonce already used (replayed message)"
        self._seen.add(nonce)
        heapq.heappush(self._heap, (ts, nonce))
        while len(self._heap) > self.max_entries:
            old_ts, old = heapq.heappop(self._heap)
            self._seen.discard(old)
            self._floor = max(self._floor, old_ts)
        return None

    def _expire(self, now: float) -> None:
        horizon = now - self.window_s
        while self._heap and self._heap[0][0] < horizon:
            _, old = heapq.heappop(self._heap)
            self._seen.discard(old)
