"""The server loop on loopback with real clients: requests, auth, subscriptions, coalescing, fuzzing."""
from __future__ import annotations

import json
import random
import time

import numpy as np
import pytest
import zmq

from engine_server.wire import protocol
from engine_server.wire.client import EngineClient, RequestError, ServerBusy
from engine_server.service.jobs import Result
from engine_server.service.server import ConfigError, EngineServer, ServerConfig
from engine_server.wire.protocol import is_loopback

from .conftest import glb_bytes, png_bytes


def drain(client: EngineClient, until, timeout: float = 10.0) -> list[protocol.Message]:
    """Poll events until ``until(events)`` holds; returns them all."""
    events: list[protocol.Message] = []
    deadline = time.monotonic() + timeout
    while not until(events):
        assert time.monotonic() < deadline, f"timed out; got {[(e.type, e.job_id) for e in events]}"
        events += client.poll_events(0.05)
    return events


def test_hello_ping_and_welcome(make_server, make_client):
    server = make_server(models=["bundled"])
    client = make_client(server.endpoint)
    welcome = client.hello()
    assert welcome["versions"] == [1] and welcome["session"] == server.session
    assert welcome["signature"] == "hmac-sha256" and welcome["models"] == ["bundled"]
    assert welcome["limits"]["max_prompt_chars"] == protocol.DEFAULT_LIMITS.max_prompt_chars
    assert "draft" in welcome["presets"] and welcome["heartbeat_s"] == 0.5
    assert 0 < client.ping() < 1.0
    assert client.is_responsive


def test_identical_submits_make_one_job(make_server, make_client):
    server = make_server()
    clients = [make_client(server.endpoint) for _ in range(5)]
    ids = {c.submit("text", "a red cube", request_id="same-request") for c in clients}
    assert len(ids) == 1
    assert server.store.counts()["queued"] == 1
    with pytest.raises(RequestError) as info:  # the same id for a different request is a conflict
        clients[0].submit("text", "a blue cube", request_id="same-request")
    assert (info.value.code, info.value.field) == ("conflict", "request_id")


def test_full_queue_answers_busy_at_once(make_server, make_client):
    server = make_server(max_queued=2)
    client = make_client(server.endpoint)
    client.submit("text", "one")
    client.submit("text", "two")
    start = time.perf_counter()
    with pytest.raises(ServerBusy) as info:
        client.submit("text", "three")
    assert time.perf_counter() - start < 1.0
    assert (info.value.queued, info.value.max_queued) == (2, 2)


def test_bad_requests_get_errors_naming_the_field(make_server, make_client, make_raw):
    server = make_server()
    raw = make_raw(server.endpoint)
    cases = [
        ({"type": "submit", "request_id": "r", "kind": "text", "prompt": "x" * 5000}, "too_large", "prompt"),
        ({"type": "submit", "request_id": "r", "kind": "text", "prompt": "p", "preset": "ultra"}, "invalid", "preset"),
        ({"type": "subscribe", "job_id": "0123456789abcdef"}, "not_found", "job_id"),
        ({"type": "result", "job_id": "zz"}, "not_found", "job_id"),
        ({"type": "cancel"}, "invalid", "job_id"),
        ({"type": "hello", "versions": [7]}, "version", "versions"),
        ({"type": "jobs", "limit": 0}, "invalid", "limit"),
    ]
    for header, code, field in cases:
        sent = raw.send_header(header)
        reply = raw.recv()
        assert reply.type == "error" and reply.parent == sent["id"], header
        assert (reply["code"], reply["field"]) == (code, field), reply.fields
    client = make_client(server.endpoint)
    with pytest.raises(RequestError) as info:  # the client refuses it before sending
        client.submit("text", "x" * 5000)
    assert info.value.field == "prompt"
    job = client.submit("text", "a cube")
    with pytest.raises(RequestError) as info:
        client.result(job)
    assert info.value.code == "not_ready"
    assert client.ping() > 0


def test_unsigned_badly_signed_and_replayed_are_refused(make_server, make_raw, make_client, tmp_path):
    server = make_server()
    raw = make_raw(server.endpoint)
    raw.send_header({"type": "jobs"}, sign=False)
    reply = raw.recv()
    assert (reply.type, reply["code"], reply["field"]) == ("error", "auth", "signature")
    head = json.dumps({"v": 1, "type": "jobs", "id": "x1", "parent": None, "ts": time.time(), "nonce": "ab" * 16}).encode()
    raw.send_frames([head, b"0" * 64])
    assert raw.recv()["code"] == "auth"
    frames = protocol.encode(protocol.make("jobs"), raw.signer)
    raw.send_frames(frames)
    assert raw.recv().type == "job_list"
    raw.send_frames(frames)  # the same bytes again
    reply = raw.recv()
    assert (reply["code"], reply["field"]) == ("replay", "nonce")
    raw.send_header({"type": "jobs", "ts": time.time() - 3600})
    assert (raw.recv()["code"]) == "replay"
    assert server.stats["refused"] >= 4
    # a client holding another key is refused at the CURVE handshake, and told why without waiting for a timeout
    wrong = make_client(server.endpoint, key_file=None, key=b"f" * 64, timeout=5.0, retries=0)
    start = time.monotonic()
    with pytest.raises(RequestError, match="refused this client's key") as refused:
        wrong.jobs()
    assert refused.value.code == "auth" and time.monotonic() - start < 2.0


def test_three_clients_see_only_their_own_events(make_server, make_client):
    server = make_server()
    clients = [make_client(server.endpoint) for _ in range(3)]
    jobs = [c.submit("text", f"object {i}") for i, c in enumerate(clients)]
    for step in range(5):
        for job in jobs:
            server.post(job, "progress", stage="coarse", step=step, total=5)
    for c, job in zip(clients, jobs):
        events = drain(c, lambda ev: any(e.type == "progress" and e["step"] == 4 for e in ev))
        assert {e.job_id for e in events} == {job}
        c.cancel(job)
    for c, job in zip(clients, jobs):
        events = drain(c, lambda ev: any(e.type == "cancelled" for e in ev))
        assert [(e.type, e.job_id) for e in events] == [("cancelled", job)]
        assert c.subscriptions == frozenset()


def test_events_in_order_and_result_after_reconnect(make_server, make_client):
    server = make_server()
    first = make_client(server.endpoint)
    job = first.submit("text", "a red cube")
    assert server.store.claim_next().id == job
    vertices = np.random.default_rng(0).random((50, 3), dtype=np.float32)
    faces = np.arange(60, dtype=np.int32).reshape(20, 3) % 50
    server.post(job, "progress", stage="coarse", step=1, total=3, loss=0.5, eta_s=2.0)
    server.post(job, "preview", stage="coarse", step=1, image=protocol.Image.from_png(png_bytes(32, 32)))
    server.post(job, "mesh", stage="coarse", step=2, vertices=vertices, faces=faces)
    events = drain(first, lambda ev: any(e.type == "mesh" for e in ev))
    assert [e.type for e in events] == ["progress", "preview", "mesh"]
    assert events[0]["loss"] == 0.5 and events[1]["image"].width == 32
    np.testing.assert_array_equal(events[2]["faces"].numpy(), faces)
    joining = make_client(server.endpoint)  # subscribing mid-job catches up with the latest progress
    assert joining.subscribe(job)["state"] == "running"
    caught_up = drain(joining, lambda ev: len(ev) >= 1)
    assert [(e.type, e["step"]) for e in caught_up] == [("progress", 1)]
    assert first.cancel(job) == "running"  # no executor here: flagged for the worker, still running
    assert server.store.get(job).cancel_requested
    first.close()  # the client leaves mid-job

    glb = server.store.job_dir(job) / "work.glb"
    glb.write_bytes(glb_bytes(4096))
    server.store.write_result(job, Result(glb, png_bytes(8, 8), {"vertices": vertices, "faces": faces}, {"steps": 3}))
    server.post(job, "done", summary={"faces": 20})
    deadline = time.monotonic() + 10
    while server.store.get(job).state != "done":
        assert time.monotonic() < deadline
        time.sleep(0.02)

    later = make_client(server.endpoint)  # a new connection, e.g. Blender restarted
    assert later.subscribe(job)["state"] == "done"
    assert [e.type for e in drain(later, lambda ev: len(ev) >= 1)] == ["done"]
    result = later.result(job)
    assert result.glb == glb_bytes(4096) and result.meta == {"steps": 3} and result.texture == png_bytes(8, 8)
    assert later.result(job, glb=False).glb == b""
    np.testing.assert_array_equal(result.arrays["vertices"].numpy(), vertices)
    assert [j["state"] for j in later.jobs()] == ["done"]
    later.delete(job)
    assert later.jobs() == []


def test_stalled_client_gets_latest_value_and_server_memory_stays_flat(make_server, make_raw):
    server = make_server(sndhwm=4)
    raw = make_raw(server.endpoint)
    raw.socket.setsockopt(zmq.RCVHWM, 4)
    raw.send_header({"type": "submit", "request_id": "r", "kind": "text", "prompt": "a cube"})
    job = raw.recv()["job_id"]
    server.store.claim_next()
    image = protocol.Image.from_png(png_bytes(160, 160, noise=True))  # ~77 kB: a few hundred fill the socket buffers
    n = 3000
    for step in range(n):
        server.post(job, "preview", stage="coarse", step=step, image=image)
        server.post(job, "progress", stage="coarse", step=step, total=n)
        if step % 5 == 0:
            time.sleep(0.001)  # let the loop take them: it then meets the client's full pipe
    glb = server.store.job_dir(job) / "work.glb"
    glb.write_bytes(glb_bytes())
    server.store.write_result(job, Result(glb))
    server.post(job, "done")
    deadline = time.monotonic() + 30
    while server.store.get(job).state != "done":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    peer = next(iter(server._peers.values()))
    assert len(peer.latest) <= 2 and len(peer.reliable) <= 3  # bounded, however slow the client
    # Most of the 2n posts never went on the wire: later values replaced them, in the server's mailbox
    # or in the stalled peer's slots (which of the two depends on thread timing).
    assert server.stats["sent"] < n // 2, server.stats

    received = []
    while (msg := raw.recv(timeout=3.0)) is not None:
        received.append(msg)
        if msg.type == "done":
            break
    assert received[-1].type == "done"
    for kind in ("preview", "progress"):
        steps = [m["step"] for m in received if m.type == kind]
        assert len(steps) < n // 2 and steps[-1] == n - 1  # the newest value arrived, most were coalesced
        assert steps == sorted(steps)


def test_vanished_client_is_forgotten(make_server, make_client):
    server = make_server()
    client = make_client(server.endpoint)
    job = client.submit("text", "a cube")
    client.close()
    deadline = time.monotonic() + 10
    while server.stats["dropped_peers"] == 0:  # ROUTER_MANDATORY reports the vanished peer on send
        server.post(job, "progress", stage="coarse", step=1, total=2)
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert server.client_count == 0


def test_silent_client_expires(make_server, make_client):
    server = make_server(peer_expiry_s=0.5)
    client = make_client(server.endpoint)
    job = client.submit("text", "a cube")
    assert server.client_count == 1
    time.sleep(1.0)  # no polling, so no pings
    assert server.client_count == 0
    # back: its next ping learns the server forgot it, and it subscribes again
    deadline = time.monotonic() + 10
    while not (events := client.poll_events(0.1)):
        assert time.monotonic() < deadline
        server.post(job, "progress", stage="coarse", step=7, total=9)
    assert [(e.type, e.job_id, e["step"]) for e in events] == [("progress", job, 7)]
    assert server.client_count == 1


def _fuzz_messages(rng: random.Random, signer, n: int):
    """(frames, parent the error reply must carry or None) for n malformed messages of every kind."""
    base = [
        {"type": "submit", "request_id": "r", "kind": "text", "prompt": "a cube"},
        {"type": "submit", "request_id": "r", "kind": "refine", "prompt": "p",
         "mesh": {"vertices": {"blob": 0, "dtype": "float32", "shape": [3, 3]},
                  "faces": {"blob": 1, "dtype": "int32", "shape": [1, 3]}}},
        {"type": "subscribe", "job_id": "0123456789abcdef"}, {"type": "ping"}, {"type": "jobs"},
        {"type": "hello", "client": "fuzz"},
    ]
    junk = [None, True, -1, 2**40, 1.5, "", "x" * 50, [], [1, "a"], {}, {"blob": 0}, {"blob": 9, "format": "png"},
            {"a": {"b": [None]}}, [[0] * 4] * 4]

    def rand_json(depth=0):
        if depth > 2 or rng.random() < 0.5:
            return rng.choice(junk)
        return rng.choice([[rand_json(depth + 1) for _ in range(rng.randint(0, 3))],
                           {rng.choice(["blob", "dtype", "shape", "k", "v"]): rand_json(depth + 1)}])

    for i in range(n):
        kind = i % 5
        env = {"v": 1, "id": f"f{i}", "parent": None, "ts": time.time(), "nonce": f"{i:032x}"}
        if kind == 0:  # raw random bytes
            frames = [rng.randbytes(rng.randint(0, 300)) for _ in range(rng.randint(1, 4))]
            yield frames, None
            continue
        header = dict(env, **rng.choice(base))
        blobs = [np.zeros((3, 3), np.float32).tobytes(), np.array([[0, 1, 2]], np.int32).tobytes()] \
            if "mesh" in header else []
        if kind == 1:  # a valid message with one bit flipped anywhere
            head = json.dumps(header).encode()
            frames = [head, signer.sign([head, *blobs]), *blobs]
            f = rng.randrange(len(frames))
            if not frames[f]:
                frames[f] = b"\x00"
            buf = bytearray(frames[f])
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
            frames[f] = bytes(buf)
            yield frames, None
            continue
        if kind == 2:  # signed, fields replaced by junk, and always one unknown field
            for key in rng.sample(sorted(k for k in header if k not in env), k=1):
                header[key] = rand_json()
            header[f"unknown_{rng.randint(0, 99)}"] = rand_json()
        elif kind == 3:  # signed, envelope damaged
            key = rng.choice(["v", "id", "ts", "nonce", "type", "parent"])
            bad = [v for v in junk if not isinstance(v, str) and v is not None] + ["", "bad id!", "é" * 3]
            header[key] = rng.choice(bad)
        else:  # signed, blob frames that do not match the references
            blobs = [rng.randbytes(rng.randint(0, 40)) for _ in range(rng.randint(0, 3))]
            if "mesh" not in header:
                header["image"] = {"blob": rng.randint(0, 3), "format": rng.choice(["png", "glb", "tiff"])}
            if blobs == [] and "mesh" not in header and rng.random() < 0.5:
                blobs = [b"\x89PNG\r\n\x1a\n" + rng.randbytes(30)]
        head = json.dumps(header).encode()
        yield [head, signer.sign([head, *blobs]), *blobs], f"f{i}" if header["id"] == f"f{i}" else None


@pytest.mark.slow  # ~3.5 s
def test_fuzz_10000_malformed_messages_each_get_an_error(make_server, make_raw, make_client):
    server = make_server(limits=protocol.Limits(max_message_bytes=2**20))
    raw = make_raw(server.endpoint)
    rng = random.Random(1234)
    messages = list(_fuzz_messages(rng, raw.signer, 10_000))
    batch = 200
    codes: dict[str, int] = {}
    for start in range(0, len(messages), batch):
        chunk = messages[start:start + batch]
        for frames, _ in chunk:
            raw.send_frames(frames)
        for frames, parent in chunk:
            reply = raw.recv(timeout=10.0)
            assert reply is not None, f"no reply to fuzz message near #{start}"
            assert reply.type == "error", (reply.type, reply.fields, frames[0][:300])
            if parent is not None:
                assert reply.parent == parent, (reply.fields, frames[0][:300])
            codes[reply["code"]] = codes.get(reply["code"], 0) + 1
    assert {"auth", "malformed", "invalid", "version", "unknown_type"} <= set(codes), codes
    # a frame over the socket's limit is dropped with the connection; the server keeps serving
    raw.send_frames([b"{}", b"", b"x" * (2**20 + 10)])
    assert raw.recv(timeout=1.0) is None
    assert make_client(server.endpoint).ping() > 0
    assert server.stats["refused"] >= 10_000


def test_public_bind_without_auth_refuses_to_start(tmp_path, key_file):
    for bind in ("tcp://0.0.0.0:0", "tcp://*:5557", "tcp://192.168.1.5:5557", "tcp://eth0:5557"):
        with pytest.raises(ConfigError, match="without authentication"):
            EngineServer(ServerConfig(bind=bind, auth=False, data_dir=tmp_path / "d", key_file=key_file))
    assert is_loopback("tcp://127.0.0.1:5557") and is_loopback("tcp://[::1]:5557")
    assert is_loopback("tcp://localhost:1") and is_loopback("ipc:///tmp/x")
    assert not is_loopback("tcp://10.0.0.1:1") and not is_loopback("pgm://x")


def test_no_auth_mode_on_loopback(make_server, make_client):
    server = make_server(auth=False)
    client = make_client(server.endpoint, auth=False)
    assert client.hello()["signature"] == "none"
    signed = make_client(server.endpoint, timeout=5.0, retries=0)  # a keyed client finds no CURVE server there
    with pytest.raises(RequestError, match="server runs without authentication"):
        signed.ping()


def test_bench_runs_small():
    import argparse

    from engine_server.service.bench import run as bench

    result = bench(argparse.Namespace(repeat=1, json=None, pings=20, seconds=0.2, faces=2000, texture=64))
    rows = {" ".join(r["measure"].split()[:3]): r for r in result["rows"]}
    assert rows["ping round trip"]["median_ms"] > 0
    posted, delivered = rows["progress events posted"], rows["progress events delivered"]
    assert 0 < delivered["n"] <= posted["n"]
    assert rows["mesh 2000 faces"]["median_ms"] > 0


def test_refine_submit_stores_mesh_and_placement_and_a_text_submit_its_rig(make_server, make_client):
    server = make_server()
    client = make_client(server.endpoint)
    vertices = np.random.default_rng(0).uniform(-1, 1, (30, 3)).astype(np.float32)
    faces = np.random.default_rng(1).integers(0, 30, (40, 3)).astype(np.int32)
    c2w = np.eye(4)
    c2w[:3, 3] = (0.0, -3.0, 1.0)
    job = client.submit("refine", "make it wooden", mode="texture", placement=c2w,
                        mesh={"vertices": vertices, "faces": faces, "matrix_world": np.eye(4) * 2})
    request = server.store.load_request(job)
    assert request["kind"] == "refine" and request["mode"] == "texture" and request["placement"][1][3] == -3.0
    assert request["mesh"]["matrix_world"][0][0] == 2.0
    text = client.submit("text", "a red cube", image=None, placement=np.eye(4),
                         rig=[{"matrix_world": c2w, "fov_y_deg": 40.0, "width": 64, "height": 48}])
    assert server.store.load_request(text)["rig"][0]["matrix_world"][1][3] == -3.0
    np.testing.assert_array_equal(request["mesh"]["vertices"].numpy(), vertices)
    np.testing.assert_array_equal(request["mesh"]["faces"].numpy(), faces)
    with pytest.raises(RequestError) as info:
        client.submit("refine", "x", mesh={"vertices": vertices, "faces": faces + 30})
    assert info.value.field == "mesh.faces"


def test_events_that_cannot_be_handled_or_sent_are_dropped_counted_and_the_loop_goes_on(make_server, make_client):
    server = make_server()
    client = make_client(server.endpoint)
    job = client.submit("text", "a cube")
    server.post("0123456789abcdef", "done")  # no such job: the store refuses to end it
    server.post(job, "progress", stage="\udc80", step=1, total=2)  # no UTF-8 reply can carry it
    deadline = time.monotonic() + 10
    while server.stats["dropped_events"] < 1 or server.stats["unsendable"] < 1:
        assert time.monotonic() < deadline, server.stats
        client.poll_events(0.05)
    server.post(job, "progress", stage="coarse", step=2, total=2)
    events = drain(client, lambda ev: any(e.type == "progress" for e in ev))
    assert [(e["stage"], e["step"]) for e in events if e.type == "progress"] == [("coarse", 2)]
    assert client.ping() < 1.0 and server.stats["loop_errors"] == 0
