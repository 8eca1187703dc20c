"""A real ``serve --protocol-only`` process under hostile input, with a client written from the protocol's description.

The client here builds frames with zmq, hmac and json directly (not
``engine_server.wire``), so a mistake shared by the server and the project's client
cannot hide: structured fuzzing of every input class that once ended the server,
multi-frame floods (from a peer without the key: refused at the CURVE handshake; unsigned
from one with it) with the server's RSS read from /proc, a replay across a restart, and a
full disk (a small tmpfs in a private mount namespace).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import random
import secrets
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")

DOMAIN = b"engine-server/v1\x00"
"""The MAC's domain prefix (wire/auth.py docstring: HMAC-SHA256 over the length-prefixed frames)."""
MIB = 2**20


# ----------------------------------------------------------------------------- a minimal independent client


def sign(key: bytes, parts) -> bytes:
    mac = hmac.new(key, DOMAIN, hashlib.sha256)
    mac.update(struct.pack(">I", len(parts)))
    for part in parts:
        mac.update(struct.pack(">Q", len(part)))
        mac.update(part)
    return mac.hexdigest().encode()


def curve_keys(key: bytes) -> tuple[bytes, bytes, bytes]:
    """(server public, client public, client secret), Z85, derived as wire/curve.py's docstring describes:
    HMAC-SHA256(key, "engine-server/curve/<role>") is each role's Curve25519 secret key."""
    from zmq.utils import z85

    server_secret = z85.encode(hmac.new(key, b"engine-server/curve/server", hashlib.sha256).digest())
    client_secret = z85.encode(hmac.new(key, b"engine-server/curve/client", hashlib.sha256).digest())
    return zmq.curve_public(server_secret), zmq.curve_public(client_secret), client_secret


def envelope(mtype: str, **fields) -> dict:
    return {"v": 1, "type": mtype, "id": secrets.token_hex(8), "parent": None, "ts": time.time(),
            "nonce": secrets.token_hex(16), **fields}


class Peer:
    """A DEALER sending hand-made frames; replies are checked against the key and parsed as plain JSON."""

    def __init__(self, endpoint: str, key: bytes, curve: bytes | None = None):
        """``curve``: the key the connection's CURVE keys are derived from (default ``key``)."""
        self.key = key
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        server_public, client_public, client_secret = curve_keys(curve or key)
        self.sock.curve_serverkey, self.sock.curve_publickey = server_public, client_public
        self.sock.curve_secretkey = client_secret
        self.sock.connect(endpoint)
        self.events: list[dict] = []  # job events that arrived while a request waited for its reply

    def send(self, head: bytes, blobs=(), signed: bool | bytes = True) -> None:
        """Signed (True), unsigned (False), or signed as if the header were ``signed`` (bytes)."""
        signature = b""
        if signed is not False:
            signature = sign(self.key, [head if signed is True else signed, *blobs])
        self.sock.send_multipart([head, signature, *blobs])

    def request(self, header: dict, blobs=(), timeout: float = 5.0) -> dict:
        """Send and return the reply linked to it (job events meanwhile are kept in ``events``)."""
        self.send(json.dumps(header).encode(), blobs)
        deadline = time.monotonic() + timeout
        while True:
            reply = self.recv(max(0.0, deadline - time.monotonic()))
            assert reply is not None, f"no reply to {header['type']}"
            if reply.get("parent") == header["id"] or (reply["type"] == "error" and reply.get("parent") is None):
                return reply
            self.events.append(reply)

    def recv(self, timeout: float = 5.0) -> dict | None:
        if not self.sock.poll(int(timeout * 1000)):
            return None
        head, sig, *blobs = self.sock.recv_multipart()
        assert hmac.compare_digest(sign(self.key, [head, *blobs]), sig), "reply with a bad signature"
        return json.loads(head.decode("utf-8"))

    def close(self) -> None:
        self.sock.close(linger=0)


def start_server(tmp: Path, *extra: str, bind: str = "tcp://127.0.0.1:*", prefix: tuple[str, ...] = (),
                 data: Path | None = None, worker: bool = False) -> tuple[subprocess.Popen, str, Path]:
    """``engine_server serve`` on loopback, ``--protocol-only`` unless ``worker`` (one CPU worker, one thread);
    its stderr goes to tmp/server.log."""
    log = tmp / "server.log"
    mode = ["--device", "cpu", "--threads", "1"] if worker else ["--protocol-only"]
    with open(log, "ab") as err:
        proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "engine_server", "serve", *mode, "--bind", bind,
             "--data", str(data or tmp / "data"), "--key-file", str(tmp / "key"), "--heartbeat", "0.5", *extra],
            stdout=subprocess.PIPE, stderr=err, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        proc.kill()
        raise AssertionError(f"server did not start: {line!r} {log.read_text()[-3000:]}")
    return proc, line.split()[-1], log


@pytest.fixture
def processes():
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)
        p.stdout.close()


def read_key(tmp: Path) -> bytes:
    return (tmp / "key").read_text().strip().encode()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# ----------------------------------------------------------------------------- structured fuzz cases

_HUGE = ["1" + "0" * 400, "-" + "9" * 30, str(2**64), "1" + "0" * 4000]
"""Integers beyond any float or int64, as JSON text (one past Python's 4300-digit parse limit: 10**4000 is not)."""
_SURROGATES = ["\\udc80", "\\ud800", "a\\udfffb", "\\ud83d"]
"""Lone surrogates as JSON escapes: valid JSON, not valid Unicode."""
_JUNK = ["null", "true", "-1", "1.5", "\"\"", "\"x\"", "[]", "{}", "[1,\"a\"]", "{\"blob\":0}",
         "{\"blob\":3,\"format\":\"png\"}", "{\"a\":{\"b\":[null]}}", "1e308", "-0.0"]
_MATRIX = "[[1,0,0,0],[0,1,0,0],[0,0,1,0],[0,0,0,1]]"


def _env_text(mtype: str, ts: str | None = None) -> str:
    return (f'"v":1,"type":"{mtype}","id":"{secrets.token_hex(8)}","parent":null,'
            f'"ts":{ts or repr(time.time())},"nonce":"{secrets.token_hex(16)}"')


def _submit(rest: str) -> str:
    return "{" + _env_text("submit") + ',"request_id":"r' + secrets.token_hex(4) + '","kind":"text","prompt":"a red cube"' \
        + rest + "}"


def _matrix_with(value: str, rng: random.Random) -> str:
    rows = [[("1" if i == j else "0") for j in range(4)] for i in range(4)]
    rows[rng.randrange(4)][rng.randrange(4)] = value
    return "[" + ",".join("[" + ",".join(r) + "]" for r in rows) + "]"


def fuzz_case(rng: random.Random, kind: str) -> tuple[bytes, list[bytes], bool | bytes]:
    """(header, blobs, how to sign) of one hostile message of class ``kind``: signed or not, or the header signed."""
    blobs: list[bytes] = []
    if kind == "huge_int":
        value = rng.choice(_HUGE)
        where = rng.choice(["ts", "placement", "fov", "matrix", "seed", "option", "limit", "width", "shape"])
        if where == "ts":
            head = "{" + _env_text("ping", ts=value) + "}"
        elif where == "placement":
            head = _submit(',"placement":' + _matrix_with(value, rng))
        elif where == "fov":
            head = _submit(',"rig":[{"matrix_world":' + _MATRIX + ',"fov_y_deg":' + value + ',"width":8,"height":8}]')
        elif where == "matrix":
            head = _submit(',"rig":[{"matrix_world":' + _matrix_with(value, rng) + ',"fov_y_deg":40,"width":8,"height":8}]')
        elif where == "seed":
            head = _submit(',"seed":' + value)
        elif where == "option":
            head = _submit(',"options":{"coarse_steps":' + value + "}")
        elif where == "limit":
            head = "{" + _env_text("jobs") + ',"limit":' + value + "}"
        elif where == "width":
            head = _submit(',"rig":[{"matrix_world":' + _MATRIX + ',"fov_y_deg":40,"width":' + value + ',"height":8}]')
        else:
            blobs = [bytes(12)]
            head = "{" + _env_text("submit") + ',"request_id":"r1","kind":"refine","prompt":"a red cube","mesh":' \
                '{"vertices":{"blob":0,"dtype":"float32","shape":[' + value + ',3]},"faces":[]}}'
    elif kind == "surrogate":
        s = rng.choice(_SURROGATES)
        head = rng.choice([
            "{" + _env_text("ping") + ',"' + s + '":1}',
            _submit(',"negative_prompt":"' + s + '"').replace('"a red cube"', '"a red ' + s + ' cube"'),
            "{" + _env_text("hello") + ',"client":"' + s + '"}',
            "{" + _env_text("subscribe") + ',"job_id":"' + s + '"}',
            _submit(',"options":{"' + s + '":1}'),
            _submit(',"options":{"x":"' + s + '"}'),
            "{" + _env_text("ping") + ',"ts2":{"' + s + '":["' + s + '"]}}',
            '{"v":1,"type":"ping","id":"' + s + '","parent":null,"ts":' + repr(time.time()) + ',"nonce":"' + s + '"}',
        ])
    elif kind == "deep":
        depth = rng.choice([33, 64, 600, 999, 5000, 50_000])
        opener, closer = rng.choice([("[", "]"), ('{"a":', "}")])
        field = rng.choice(["x", "options", "placement", "rig", "mesh"])
        head = "{" + _env_text(rng.choice(["ping", "submit"])) + ',"' + field + '":' + opener * depth + "1" + closer * depth + "}"
    elif kind == "wrong_type":
        junk = rng.choice(_JUNK)
        head = rng.choice([
            _submit(',"' + rng.choice(["seed", "preset", "mode", "image", "placement", "rig", "mesh", "options",
                                      "subscribe", "negative_prompt"]) + '":' + junk),
            "{" + _env_text("submit") + ',"request_id":' + junk + ',"kind":"text","prompt":"a"}',
            "{" + _env_text("submit") + ',"request_id":"r","kind":' + junk + ',"prompt":"a"}',
            "{" + _env_text(rng.choice(["subscribe", "cancel", "result", "delete"])) + ',"job_id":' + junk + "}",
            "{" + _env_text("jobs") + ',"' + rng.choice(["state", "limit"]) + '":' + junk + "}",
            "{" + _env_text("hello") + ',"versions":' + junk + "}",
            '{"v":' + junk + ',"type":"ping","id":"a","parent":null,"ts":1,"nonce":"' + secrets.token_hex(16) + '"}',
            "{" + _env_text("ping").replace('"parent":null', '"parent":' + junk) + "}",
            _submit(',"rig":[{"matrix_world":' + junk + ',"fov_y_deg":40,"width":8,"height":8}]'),
            _submit(',"options":{"a":' + junk + "}"),
        ])
    elif kind == "blob":
        n = rng.randint(0, 3)
        blobs = [rng.randbytes(rng.choice([0, 3, 12, 36, 100])) for _ in range(n)]
        dtype = rng.choice(["float32", "int32", "float64", "complex64", "uint8", "x"])
        shape = rng.choice(["[3,3]", "[1,3]", "[-1,3]", "[0]", "[2,2,2,2,2]", "\"3\"", "[1.5,3]", "[]"])
        ref = '{"blob":' + str(rng.randint(-1, 4)) + ',"dtype":"' + dtype + '","shape":' + shape + "}"
        head = rng.choice([
            "{" + _env_text("submit") + ',"request_id":"r","kind":"refine","prompt":"a red cube","mesh":{"vertices":'
            + ref + ',"faces":' + ref.replace('"blob":', '"blob":1,"x":') + "}}",
            "{" + _env_text("submit") + ',"request_id":"r","kind":"refine","prompt":"a red cube","mesh":{"vertices":'
            + ref + ',"faces":{"blob":1,"dtype":"int32","shape":[1,3]}}}',
            _submit(',"image":{"blob":' + str(rng.randint(-1, 3)) + ',"format":"' + rng.choice(["png", "glb", "tiff"]) + '"}')
            .replace('"kind":"text"', '"kind":"image"'),
            "{" + _env_text("ping") + "}",  # blobs nobody references
        ])
        if head.endswith('"}') and '"type":"ping"' in head and not blobs:
            blobs = [b"unreferenced"]
        if rng.random() < 0.3:
            blobs = [b"\x89PNG\r\n\x1a\n" + rng.randbytes(40)] + blobs
    elif kind == "oversize":  # over the message limit in sum or count, each frame under the socket's
        choice = rng.randrange(3)
        if choice == 0:
            blobs = [bytes(rng.randint(600, 1000) * 1024) for _ in range(rng.randint(2, 4))]  # > 1 MiB in all
        elif choice == 1:
            blobs = [b"x"] * rng.randint(9, 40)  # more blobs than max_blobs
        else:
            head = "{" + _env_text("ping") + ',"pad":"' + "p" * (300 * 1024) + '"}'  # header over its limit
            return head.encode(), blobs, True
        head = "{" + _env_text("ping") + "}"
    elif kind == "garbage":
        choice = rng.randrange(4)
        if choice == 0:
            return rng.randbytes(rng.randint(0, 200)), [rng.randbytes(9) for _ in range(rng.randint(0, 2))], rng.random() < 0.5
        if choice == 1:
            return json.dumps(envelope("ping")).encode(), [], False  # unsigned
        if choice == 2:  # one bit flipped after signing
            head = json.dumps(envelope("jobs")).encode()
            flipped = bytearray(head)
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            return bytes(flipped), [], head
        return b"\xff\xfe" + rng.randbytes(20), [], True
    else:
        raise ValueError(kind)
    return head.encode("utf-8"), blobs, True


FUZZ_KINDS = ("huge_int", "surrogate", "deep", "wrong_type", "blob", "oversize", "garbage")


@pytest.mark.slow  # 10,000 messages through a real process: ~10 s on 2 busy cores
def test_fuzz_10000_hostile_messages_each_refused_and_the_server_still_takes_a_job(tmp_path, processes):
    proc, endpoint, log = start_server(tmp_path, "--max-message-mb", "1", "--max-queued", "100000")
    processes.append(proc)
    peer = Peer(endpoint, read_key(tmp_path))
    try:
        rng = random.Random(18)
        cases = [(kind, *fuzz_case(rng, kind)) for kind in (FUZZ_KINDS[i % len(FUZZ_KINDS)] for i in range(10_000))]
        codes: dict[str, dict[str, int]] = {k: {} for k in FUZZ_KINDS}
        batch = 100
        for start in range(0, len(cases), batch):
            chunk = cases[start:start + batch]
            for _, head, blobs, signed in chunk:
                peer.send(head, blobs, signed)
            for kind, head, _, _ in chunk:
                reply = peer.recv(timeout=15.0)
                assert reply is not None, f"no reply to a {kind} case near #{start}: {head[:200]!r}"
                # A wrong type may happen to be valid (null for an optional field): then any reply but internal.
                assert reply["type"] == "error" or kind == "wrong_type", (kind, reply, head[:200])
                assert reply.get("code") != "internal", (kind, reply, head[:300])
                code = reply.get("code", reply["type"])
                codes[kind][code] = codes[kind].get(code, 0) + 1
            assert proc.poll() is None, f"the server exited near case #{start}"
        print("fuzz replies by class and code:", json.dumps(codes))
        for kind in ("huge_int", "surrogate", "deep"):  # the classes that once ended the process
            assert set(codes[kind]) <= {"invalid", "malformed", "too_large"}, (kind, codes[kind])
        assert set(codes["oversize"]) == {"too_large"}, codes["oversize"]
        # A frame over the socket's own per-frame limit makes libzmq drop the connection: no reply, no harm.
        peer.send(json.dumps(envelope("ping")).encode(), [bytes(MIB + 100)])
        assert peer.recv(timeout=1.0) is None
        peer.close()
        peer = Peer(endpoint, read_key(tmp_path))
        # Still serving: a valid job is accepted and listed.
        accepted = peer.request(envelope("submit", request_id="after-fuzz", kind="text", prompt="a red cube"))
        assert accepted["type"] == "accepted" and accepted["state"] == "queued", accepted
        listing = peer.request(envelope("jobs"))
        assert accepted["job_id"] in [j["job_id"] for j in listing["jobs"]]
        assert proc.poll() is None
        assert "Traceback" not in log.read_text()
    finally:
        peer.close()


# ----------------------------------------------------------------------------- memory before authentication


class RssPeak:
    """The peak RSS of a process, sampled every 5 ms while the block runs."""

    def __init__(self, pid: int):
        self.pid, self.baseline = pid, rss_bytes(pid)
        self.peak, self._done = self.baseline, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            time.sleep(0.005)

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


@pytest.mark.slow  # ~5 s: 1.5 GB through loopback
def test_an_unsigned_multi_frame_flood_from_a_peer_with_the_key_is_refused_without_a_copy(tmp_path, processes):
    """A peer past the handshake sends unsigned 30 MiB messages in 10 MiB frames: the server holds no copy
    of a refused message on top of libzmq's, keeps none of it, and answers too_large."""
    limit_mb = 16
    proc, endpoint, _ = start_server(tmp_path, "--max-message-mb", str(limit_mb))
    processes.append(proc)
    peer = Peer(endpoint, read_key(tmp_path))
    try:
        assert peer.request(envelope("ping"))["type"] == "pong"
        frame, head = bytes(10 * MIB), json.dumps(envelope("ping")).encode()
        with RssPeak(proc.pid) as rss:
            for _ in range(50):
                peer.sock.send_multipart([head, b"", frame, frame, frame], copy=False)
                reply = peer.recv(timeout=10.0)
                assert reply is not None and reply["code"] == "too_large", reply
        print(f"keyed unsigned flood: RSS baseline {rss.baseline / MIB:.1f} MiB, growth {rss.growth / MIB:.1f} MiB")
        assert rss.growth < 2 * limit_mb * MIB, f"RSS grew {rss.growth / MIB:.1f} MiB (limit {limit_mb} MiB)"
        assert peer.request(envelope("ping"))["type"] == "pong"
    finally:
        peer.close()


@pytest.mark.slow  # ~5 s
@pytest.mark.parametrize("stranger", ["another key file", "no CURVE"])
def test_a_peer_without_the_key_gets_nothing_buffered_however_many_frames_it_sends(tmp_path, processes, stranger):
    """80 MiB messages in 10 MiB frames (over any message limit, each frame under the per-frame one) from a
    peer that cannot pass the CURVE handshake: libzmq takes none of them, the server's RSS stays flat and
    it keeps answering the peer that holds the key."""
    limit_mb = 16
    proc, endpoint, _ = start_server(tmp_path, "--max-message-mb", str(limit_mb))
    processes.append(proc)
    key = read_key(tmp_path)
    friend = Peer(endpoint, key)
    if stranger == "no CURVE":
        flooder = zmq.Context.instance().socket(zmq.DEALER)
        flooder.setsockopt(zmq.LINGER, 0)
        flooder.connect(endpoint)
    else:
        flooder = Peer(endpoint, key, curve=secrets.token_bytes(32)).sock  # signs right, wrong connection key
    flooder.setsockopt(zmq.SNDTIMEO, 200)
    try:
        assert friend.request(envelope("ping"))["type"] == "pong"
        frame = bytes(10 * MIB)
        head = json.dumps(envelope("ping")).encode()
        signature = sign(key, [head, *[frame] * 8])
        with RssPeak(proc.pid) as rss:
            for _ in range(10):
                try:
                    flooder.send_multipart([head, signature, *[frame] * 8], copy=False)
                except zmq.Again:  # nothing takes its messages: its own queue fills and stops it
                    break
            time.sleep(1.0)
            assert friend.request(envelope("ping"))["type"] == "pong"
        assert not flooder.poll(200), "the server answered a peer without the key"
        print(f"{stranger} flood: RSS baseline {rss.baseline / MIB:.1f} MiB, growth {rss.growth / MIB:.1f} MiB")
        assert rss.growth < 2 * limit_mb * MIB, f"RSS grew {rss.growth / MIB:.1f} MiB (limit {limit_mb} MiB)"
    finally:
        flooder.close(linger=0)
        friend.close()


# ----------------------------------------------------------------------------- replay after a restart


def test_a_message_captured_before_a_restart_is_refused_after_it(tmp_path, processes):
    proc, endpoint, _ = start_server(tmp_path)
    processes.append(proc)
    key = read_key(tmp_path)
    peer = Peer(endpoint, key)
    try:
        captured = json.dumps(envelope("submit", request_id="replayed", kind="text", prompt="a red cube")).encode()
        peer.send(captured)
        first = peer.recv()
        assert first["type"] == "accepted", first
        peer.send(captured)  # the same frames again, same server: the nonce is remembered
        assert (peer.recv()["code"]) == "replay"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        proc, again, _ = start_server(tmp_path, bind=endpoint)
        processes.append(proc)
        assert again == endpoint
        peer.close()
        peer = Peer(endpoint, key)
        peer.send(captured)  # well inside the 300 s window, but from before the restart
        reply = peer.recv()
        assert (reply["type"], reply["code"], reply["field"]) == ("error", "replay", "ts"), reply
        assert "restart" in reply["message"]
        assert peer.request(envelope("ping"))["type"] == "pong"  # fresh messages are fine
    finally:
        peer.close()


# ----------------------------------------------------------------------------- a full disk


def _private_tmpfs_refusal() -> str | None:
    """Why a tmpfs cannot be mounted in a private mount namespace here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root to mount a tmpfs in a private mount namespace (unshare -m)"
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs $d && umount $d && rmdir $d"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return f"the kernel refused a tmpfs in a private mount namespace: {probe.stderr.strip()[:200]}"
    return None


def fill(path: Path) -> int:
    """Write zeros to ``path`` until the disk is full; returns the bytes written."""
    written = 0
    with open(path, "wb", buffering=0) as f:
        chunk = bytes(MIB)
        while True:
            try:
                written += f.write(chunk)
            except OSError:
                break
        while True:  # the last partial megabyte
            try:
                written += f.write(b"\0" * 4096)
            except OSError:
                return written


def _server_on_tmpfs(tmp_path: Path, processes: list, size_mb: int, *extra: str, worker: bool = False):
    """A server whose data folder is a private ``size_mb`` tmpfs, seen only by it (and through /proc/PID/root)
    -> (process, endpoint, log, the data folder as the server sees it); skips where the kernel refuses."""
    reason = _private_tmpfs_refusal()
    if reason:
        pytest.skip(reason)
    data = tmp_path / "data"
    data.mkdir()
    prefix = ("unshare", "-m", "--propagation", "private", "sh", "-c",
              f"mount -t tmpfs -o size={size_mb}m tmpfs {data} && exec \"$0\" \"$@\"")
    proc, endpoint, log = start_server(tmp_path, *extra, prefix=prefix, data=data, worker=worker)
    processes.append(proc)
    return proc, endpoint, log, Path(f"/proc/{proc.pid}/root") / str(data).lstrip("/")


def test_a_full_disk_refuses_a_submit_with_storage_and_the_server_serves_on(tmp_path, processes):
    proc, endpoint, log, inside = _server_on_tmpfs(tmp_path, processes, 16)
    assert (inside / "jobs.sqlite3").exists() and not (tmp_path / "data" / "jobs.sqlite3").exists()  # the private tmpfs
    peer = Peer(endpoint, read_key(tmp_path))
    try:
        first = peer.request(envelope("submit", request_id="before", kind="text", prompt="a red cube"))
        assert first["type"] == "accepted", first
        filled = fill(inside / "filler")
        assert filled > 8 * MIB
        image_blob = bytes(64 * 1024)
        refused = peer.request(envelope("submit", request_id="while-full", kind="refine", prompt="a red cube",
                                        mesh={"vertices": {"blob": 0, "dtype": "float32", "shape": [4096, 3]},
                                              "faces": {"blob": 1, "dtype": "int32", "shape": [1, 3]}}),
                               [image_blob[:4096 * 12], struct.pack("<3i", 0, 1, 2)])
        assert (refused["type"], refused["code"]) == ("error", "storage"), refused
        assert "disk full" in refused["message"]
        assert peer.request(envelope("ping"))["type"] == "pong"
        listing = peer.request(envelope("jobs"))
        assert [j["request_id"] for j in listing["jobs"]] == ["before"]
        (inside / "filler").unlink()
        again = peer.request(envelope("submit", request_id="while-full", kind="refine", prompt="a red cube",
                                      mesh={"vertices": {"blob": 0, "dtype": "float32", "shape": [4096, 3]},
                                            "faces": {"blob": 1, "dtype": "int32", "shape": [1, 3]}}),
                             [image_blob[:4096 * 12], struct.pack("<3i", 0, 1, 2)])
        assert again["type"] == "accepted", again
        assert proc.poll() is None and "Traceback" not in log.read_text()
    finally:
        peer.close()


def _events_until(peer: Peer, job_id: str, done, timeout: float) -> list[dict]:
    """The job's events (progress, failed, ...) until ``done(event)`` holds."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        msg = peer.events.pop(0) if peer.events else peer.recv(timeout=0.2)
        if msg is None or msg.get("job_id") != job_id:
            continue
        seen.append(msg)
        if done(msg):
            return seen
    raise AssertionError(f"job {job_id}: condition not reached in {timeout} s; saw {[m['type'] for m in seen][-20:]}")


@pytest.mark.slow  # a real worker (torch import, bundled prior) and two jobs: ~60 s on 2 busy cores
def test_a_full_disk_fails_the_running_job_with_storage_and_the_queued_one_runs_once_space_is_back(tmp_path, processes):
    proc, endpoint, log, inside = _server_on_tmpfs(tmp_path, processes, 96, "--min-free-mb", "16", worker=True)
    peer = Peer(endpoint, read_key(tmp_path))
    try:
        running = peer.request(envelope("submit", request_id="running", kind="text", prompt="a red cube", options={
            "coarse_steps": 400, "tet_resolution": 24, "texture_size": 64, "checkpoint_every": 1, "preview_every": 1}))
        queued = peer.request(envelope("submit", request_id="queued", kind="text", prompt="a blue sphere", options={
            "coarse_steps": 4, "tet_resolution": 24, "texture_size": 64}))
        assert (running["type"], queued["type"], queued["state"]) == ("accepted", "accepted", "queued")
        _events_until(peer, running["job_id"], lambda m: m["type"] == "progress" and m.get("stage") == "coarse", 120)
        fill(inside / "filler")
        end = _events_until(peer, running["job_id"], lambda m: m["type"] in ("done", "failed", "cancelled"), 60)[-1]
        assert (end["type"], end.get("code")) == ("failed", "storage"), end
        assert "disk full" in end["message"] or "No space left" in end["message"], end
        time.sleep(2.0)  # the queued job must not start on a full disk
        assert peer.request(envelope("ping"))["type"] == "pong"
        states = {j["request_id"]: j["state"] for j in peer.request(envelope("jobs"))["jobs"]}
        assert states["queued"] == "queued", states
        (inside / "filler").unlink()
        end = _events_until(peer, queued["job_id"], lambda m: m["type"] in ("done", "failed", "cancelled"), 120)[-1]
        assert end["type"] == "done", end
        jobs = {j["request_id"]: j for j in peer.request(envelope("jobs"))["jobs"]}
        assert (jobs["running"]["state"], jobs["running"].get("error_code")) == ("failed", "storage"), jobs["running"]
        assert proc.poll() is None
    finally:
        peer.close()


@pytest.mark.slow  # a real worker: torch import and the bundled prior, ~20 s on 2 busy cores
def test_a_job_whose_worker_dies_on_its_last_attempt_fails_with_the_reason(tmp_path, processes):
    proc, endpoint, log = start_server(tmp_path, "--max-attempts", "1", worker=True)
    processes.append(proc)
    peer = Peer(endpoint, read_key(tmp_path))
    try:
        job = peer.request(envelope("submit", request_id="doomed", kind="text", prompt="a green cone", options={
            "coarse_steps": 400, "tet_resolution": 24, "texture_size": 64}))["job_id"]
        _events_until(peer, job, lambda m: m["type"] == "progress" and m.get("stage") == "coarse", 120)
        workers = [int(p) for task in Path(f"/proc/{proc.pid}/task").iterdir()
                   for p in (task / "children").read_text().split()]
        assert len(workers) == 1, workers
        os.kill(workers[0], signal.SIGKILL)
        end = _events_until(peer, job, lambda m: m["type"] in ("done", "failed", "cancelled"), 30)[-1]
        assert (end["type"], end["code"]) == ("failed", "worker_died"), end
        assert "signal 9" in end["message"] and "attempt 1 of 1; not retried" in end["message"], end
        summary = {j["job_id"]: j for j in peer.request(envelope("jobs"))["jobs"]}[job]
        assert (summary["state"], summary["attempts"], summary["error_code"]) == ("failed", 1, "worker_died")
    finally:
        peer.close()
