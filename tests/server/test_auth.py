"""Key file handling, HMAC signing and the replay window."""
from __future__ import annotations

import os
import stat

import pytest

from engine_server.wire.auth import (
    KeyFileError, ReplayGuard, Signer, default_key_path, load_key, load_or_create_key, user_data_dir,
)


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_key_file_created_private(tmp_path):
    path = tmp_path / "sub" / "key"
    key = load_or_create_key(path)
    assert len(key) == 64 and all(c in b"0123456789abcdef" for c in key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert load_or_create_key(path) == key  # second start reads the same key
    assert load_key(path) == key
    other = load_or_create_key(tmp_path / "other")
    assert other != key


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_open_key_file_refused(tmp_path):
    path = tmp_path / "key"
    load_or_create_key(path)
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_key(path)


def test_missing_or_short_key(tmp_path):
    with pytest.raises(KeyFileError, match="engine-server serve"):
        load_key(tmp_path / "nope")
    path = tmp_path / "short"
    path.write_text("abc")
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileError, match="no usable key"):
        load_key(path)


def test_default_paths_follow_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("ENGINE_SERVER_KEY_FILE", raising=False)
    monkeypatch.setenv("ENGINE_SERVER_HOME", str(tmp_path / "home"))
    assert user_data_dir() == tmp_path / "home"
    assert default_key_path() == tmp_path / "home" / "key"
    monkeypatch.setenv("ENGINE_SERVER_KEY_FILE", str(tmp_path / "k"))
    assert default_key_path() == tmp_path / "k"


def test_signature_covers_every_frame_and_boundary():
    s = Signer(b"k" * 40)
    parts = [b'{"a":1}', b"blob-one", b"blob-two"]
    sig = s.sign(parts)
    assert len(sig) == 64 and s.verify(parts, sig)
    assert not s.verify([b'{"a":2}', b"blob-one", b"blob-two"], sig)
    assert not s.verify([b'{"a":1}', b"blob-on", b"eblob-two"], sig)  # bytes moved across a boundary
    assert not s.verify([b'{"a":1}', b"blob-oneblob-two"], sig)  # frames merged
    assert not s.verify(parts + [b""], sig)  # an empty frame appended
    assert not Signer(b"j" * 40).verify(parts, sig)  # another key
    assert not s.verify(parts, sig[:-1] + b"0" if sig[-1:] != b"0" else sig[:-1] + b"1")
    assert Signer(None).sign(parts) == b"" and Signer(None).verify(parts, b"anything")
    with pytest.raises(ValueError):
        Signer(b"short")


def test_replay_guard_nonce_and_window():
    now = [1000.0]
    g = ReplayGuard(window_s=10, clock=lambda: now[0])
    assert g.check("a" * 32, 1000.0) is None
    assert g.check("a" * 32, 1000.0)[0] == "nonce"
    assert g.check("b" * 32, 1011.0)[0] == "ts"  # from the future
    assert g.check("c" * 32, 989.0)[0] == "ts"  # too old
    now[0] = 1020.0  # the first nonce expires from memory, but its timestamp is now outside the window
    assert g.check("a" * 32, 1000.0)[0] == "ts"
    assert g.check("d" * 32, 1020.0) is None
    assert len(g) == 1  # the expired nonce was forgotten


def test_replay_guard_memory_bounded_without_reopening_replays():
    now = [0.0]
    g = ReplayGuard(window_s=100, max_entries=5, clock=lambda: now[0])
    for i in range(20):
        assert g.check(f"{i:032x}", float(i) / 10) is None
    assert len(g) == 5
    # a forgotten nonce cannot come back: its timestamp is at or below the floor
    assert g.check(f"{3:032x}", 0.3) is not None
    assert g.check(f"{19:032x}", 1.9)[0] == "nonce"
    assert g.check("f" * 32, 5.0) is None


def test_replay_guard_refuses_messages_stamped_before_the_receivers_start():
    now = [1000.0]
    guard = ReplayGuard(window_s=300, clock=lambda: now[0], not_before=1000.0)
    field, reason = guard.check("ab" * 16, 999.5)  # inside the window, but from before the restart
    assert field == "ts" and "restart" in reason
    assert guard.check("cd" * 16, 1000.0) is None
