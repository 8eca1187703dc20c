"""The durable job store: idempotent submit, bounded queue, states, artifacts, crash recovery."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from engine_server.service.jobs import (
    Busy, JobConflict, JobNotFound, JobStore, Result, StoreLocked, atomic_write, checkpoint_dir, request_hash,
)
from engine_server.wire.protocol import Array, Image

from .conftest import glb_bytes, png_bytes


def text_request(prompt="a red cube", **extra):
    return {"request_id": "unused", "kind": "text", "prompt": prompt, "negative_prompt": "", "seed": None,
            "preset": "draft", "mode": "full", "options": {}, **extra}


@pytest.fixture
def store(tmp_path):
    s = JobStore(tmp_path / "data", max_queued=3)
    yield s
    s.close()


def test_submit_is_durable_and_idempotent(store, tmp_path):
    mesh = {"vertices": np.zeros((3, 3), np.float32), "faces": np.array([[0, 1, 2]], np.int32)}
    req = text_request(kind="refine", image=Image.from_png(png_bytes()), mesh=mesh)
    job, dup = store.submit("req-a", req, label="a red cube")
    assert not dup and job.state == "queued" and job.kind == "refine" and job.label == "a red cube"
    again, dup = store.submit("req-a", dict(req, subscribe=False))  # subscribe does not change the job
    assert dup and again.id == job.id
    with pytest.raises(JobConflict, match="different request"):
        store.submit("req-a", text_request("a blue cube"))
    loaded = store.load_request(job.id)
    assert loaded["prompt"] == "a red cube" and isinstance(loaded["image"], Image)
    np.testing.assert_array_equal(loaded["mesh"]["faces"].numpy(), mesh["faces"])
    # on disk before returning: a second connection (another process's view) sees the row and files
    db = sqlite3.connect(tmp_path / "data" / "jobs.sqlite3")
    assert db.execute("SELECT state, request_id FROM jobs WHERE id = ?", (job.id,)).fetchone() == ("queued", "req-a")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    assert (store.job_dir(job.id) / "request.json").is_file()


def test_request_hash_sees_blobs_and_fields():
    a = text_request(image=Image.from_png(png_bytes(8, 6)))
    assert request_hash(a) == request_hash(dict(a, subscribe=True))
    assert request_hash(a) != request_hash(dict(a, image=Image.from_png(png_bytes(8, 7))))
    assert request_hash(a) != request_hash(dict(a, seed=1))


def test_bounded_queue_says_busy_but_keeps_duplicates(store):
    ids = [store.submit(f"r{i}", text_request(f"p{i}"))[0].id for i in range(3)]
    with pytest.raises(Busy) as info:
        store.submit("r3", text_request("p3"))
    assert (info.value.queued, info.value.max_queued) == (3, 3)
    assert store.submit("r1", text_request("p1")) == (store.get(ids[1]), True)  # a retry is not refused
    assert [store.queue_position(i) for i in ids] == [0, 1, 2]
    store.claim_next()  # running jobs do not count against the queue
    store.submit("r3", text_request("p3"))
    assert store.counts() == {"queued": 3, "running": 1, "done": 0, "failed": 0, "cancelled": 0}
    assert not any(p.name.startswith(".tmp-") for p in store.jobs_dir.iterdir())


def test_lifecycle_fifo_cancel_finish_delete(store):
    a = store.submit("a", text_request("a"))[0]
    time.sleep(0.002)
    b = store.submit("b", text_request("b"))[0]
    first = store.claim_next()
    assert first.id == a.id and first.state == "running" and first.attempts == 1
    assert store.request_cancel(b.id).state == "cancelled"  # queued: ends at once
    flagged = store.request_cancel(a.id)  # running: flagged for the worker
    assert flagged.state == "running" and flagged.cancel_requested
    assert store.claim_next() is None
    with pytest.raises(JobConflict, match="running"):
        store.delete(a.id)
    with pytest.raises(JobConflict, match="no stored result"):
        store.finish(a.id, "done")
    store.finish(a.id, "failed", "non_finite", "loss became NaN")
    failed = store.get(a.id)
    assert (failed.state, failed.error_code) == ("failed", "non_finite") and failed.finished is not None
    assert failed.summary()["error_code"] == "non_finite"
    with pytest.raises(JobConflict, match="already ended"):
        store.finish(a.id, "cancelled")
    with pytest.raises(JobConflict, match="a result exists only when done"):
        store.read_result(a.id)
    store.delete(a.id)
    with pytest.raises(JobNotFound):
        store.get(a.id)
    assert not store.job_dir(a.id).exists()
    assert [j.id for j in store.list()] == [b.id]
    with pytest.raises(JobNotFound):
        store.job_dir("../../etc")


def test_result_is_moved_into_place_and_the_reply_carries_texture_and_arrays_once(store):
    job = store.submit("a", text_request())[0]
    store.claim_next()
    arrays = {"vertices": np.random.default_rng(0).random((100, 3), dtype=np.float32),
              "faces": np.arange(30, dtype=np.int32).reshape(10, 3)}
    work = store.job_dir(job.id) / "work"
    work.mkdir()
    (work / "model.glb").write_bytes(glb_bytes(100))  # where the pipeline writes it
    inode = (work / "model.glb").stat().st_ino
    store.write_result(job.id, Result(work / "model.glb", png_bytes(16, 16), arrays, {"steps": 5, "name": "red_cube"}))
    assert not (work / "model.glb").exists()  # moved, not copied: the GLB is written once
    done = store.finish(job.id, "done")
    assert done.state == "done"
    res = store.read_result(job.id)
    assert res.glb_path.read_bytes() == glb_bytes(100) and res.glb_path.stat().st_ino == inode
    assert res.meta == {"steps": 5, "name": "red_cube"} and res.texture_png == png_bytes(16, 16)
    np.testing.assert_array_equal(res.arrays["vertices"].numpy(), arrays["vertices"])
    fields = store.result_message_fields(job.id)
    assert bytes(fields["glb"].data) == glb_bytes(100) and isinstance(fields["arrays"]["faces"], Array)
    assert bytes(fields["texture"].data) == png_bytes(16, 16) and set(fields["arrays"]) == {"vertices", "faces"}
    assert "glb" not in store.result_message_fields(job.id, glb=False)  # an importer needs no GLB
    (work / "bad.glb").write_bytes(b"not a glb")
    with pytest.raises(ValueError, match="glTF"):
        store.write_result(job.id, Result(work / "bad.glb"))


def test_progress_snapshot_is_throttled(store):
    job = store.submit("a", text_request())[0]
    assert store.set_progress(job.id, {"stage": "coarse", "step": 1, "loss": float("nan")})
    assert not store.set_progress(job.id, {"stage": "coarse", "step": 2})
    assert store.get(job.id).progress == {"stage": "coarse", "step": 1, "loss": None}
    assert store.set_progress(job.id, {"stage": "coarse", "step": 3}, force=True)
    assert store.get(job.id).progress["step"] == 3


def test_recover_requeues_interrupted_and_stops_crash_loops(tmp_path):
    root = tmp_path / "data"
    s = JobStore(root, max_attempts=2)
    a = s.submit("a", text_request("a"))[0]
    b = s.submit("b", text_request("b"))[0]
    c = s.submit("c", text_request("c"))[0]
    s.claim_next(), s.claim_next(), s.claim_next()
    s.request_cancel(c.id)
    s.close()  # the server dies with three jobs running

    s = JobStore(root, max_attempts=2)
    requeued = s.recover()
    assert [j.id for j in requeued] == [a.id, b.id]
    assert s.get(c.id).state == "cancelled"  # a cancel asked before the crash is honoured
    assert s.claim_next().id == a.id  # resumed jobs keep their place in the queue
    s.close()

    s = JobStore(root, max_attempts=2)  # a died again: out of attempts
    assert s.recover() == []
    assert (s.get(a.id).state, s.get(a.id).error_code) == ("failed", "crash_loop")
    assert s.get(b.id).state == "queued"
    s.close()


def test_one_owner_per_data_folder(tmp_path):
    s = JobStore(tmp_path / "d")
    with pytest.raises(StoreLocked, match="another engine server"):
        JobStore(tmp_path / "d")
    reader = JobStore(tmp_path / "d", owner=False)  # the CLI can still read while the server runs
    job = s.submit("a", text_request())[0]
    assert reader.get(job.id).state == "queued"
    reader.close()
    s.close()
    JobStore(tmp_path / "d").close()  # free again once closed


def test_leftovers_of_a_crash_are_cleaned(tmp_path):
    s = JobStore(tmp_path / "d")
    job = s.submit("a", text_request())[0]
    s.close()
    jobs = tmp_path / "d" / "jobs"
    (jobs / ".tmp-0011223344556677" / "request").mkdir(parents=True)
    (jobs / "8899aabbccddeeff").mkdir()  # renamed into place, row never committed
    (jobs / ".trash-x").mkdir()
    s = JobStore(tmp_path / "d")
    assert sorted(p.name for p in jobs.iterdir()) == [job.id]
    s.close()


def test_atomic_write_replaces_whole_file(tmp_path):
    p = tmp_path / "f.bin"
    atomic_write(p, b"old")
    atomic_write(p, b"new contents")
    assert p.read_bytes() == b"new contents" and [x.name for x in tmp_path.iterdir()] == ["f.bin"]


def _spawn(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True)


def test_kill_9_during_submits_and_checkpoints_loses_nothing_returned(tmp_path):
    """Every job id a killed process was handed exists afterwards; its checkpoint file is whole (the last one written)."""
    proc = _spawn(f"""
        from engine_server.service.jobs import JobStore, checkpoint_dir
        from engine_server.wire.files import atomic_write
        s = JobStore({str(tmp_path / 'd')!r}, max_queued=10**6)
        i = 0
        while True:
            job, _ = s.submit(f"r{{i}}", {{"kind": "text", "prompt": f"p{{i}}", "n": "x" * 5000}})
            folder = checkpoint_dir(s.job_dir(job.id))
            folder.mkdir()
            atomic_write(folder / "coarse.pt", bytes([i % 256]) * 20000)  # as pipelines.checkpoint writes them
            atomic_write(folder / "coarse.pt", bytes([(i + 1) % 256]) * 20000)
            print(job.id, i, flush=True)
            i += 1
    """)
    lines = []
    deadline = time.monotonic() + 60
    while len(lines) < 15 and time.monotonic() < deadline:
        lines.append(proc.stdout.readline().split())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    lines += [ln.split() for ln in proc.stdout.read().splitlines()]
    assert len(lines) >= 15
    s = JobStore(tmp_path / "d", max_queued=10**6)
    for job_id, i in lines:
        assert s.load_request(job_id)["prompt"] == f"p{i}"
        assert (checkpoint_dir(s.job_dir(job_id)) / "coarse.pt").read_bytes() == bytes([(int(i) + 1) % 256]) * 20000
    assert not any(p.name.startswith(".tmp-") for p in s.jobs_dir.iterdir())
    for job in s.list(limit=10**6):  # the job being checkpointed when killed: a whole file or none (a temp file may remain)
        final = checkpoint_dir(s.job_dir(job.id)) / "coarse.pt"
        if final.exists():
            data = final.read_bytes()
            assert len(data) == 20000 and len(set(data)) == 1
    s.close()


def test_result_keeps_the_normal_map_and_moves_the_export_files_into_place(store):
    job = store.submit("fmt", text_request())[0]
    store.claim_next()
    work = store.job_dir(job.id) / "work"
    (work / "export").mkdir(parents=True)
    (work / "model.glb").write_bytes(glb_bytes(10))
    files = [work / "export" / "model.obj", work / "export" / "model.mtl"]
    for i, path in enumerate(files):
        path.write_bytes(b"x" * (i + 1))
    store.write_result(job.id, Result(work / "model.glb", png_bytes(8, 8), {}, {"name": "x"},
                                      normal_png=png_bytes(4, 4), files=files))
    assert not any(p.exists() for p in files)  # moved, not copied
    store.finish(job.id, "done")
    res = store.read_result(job.id)
    assert res.normal_png == png_bytes(4, 4) and sorted(res.files) == ["model.mtl", "model.obj"]
    fields = store.result_message_fields(job.id)
    assert bytes(fields["normal_texture"].data) == png_bytes(4, 4)
    assert {k: bytes(v.data) for k, v in fields["files"].items()} == {"model.obj": b"x", "model.mtl": b"xx"}
    slim = store.result_message_fields(job.id, glb=False)
    assert "files" not in slim and "glb" not in slim and "normal_texture" in slim
