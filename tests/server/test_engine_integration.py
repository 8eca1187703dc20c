"""The real engine behind a real server process on loopback: bundled prior, tiny step counts.

One server (module fixture) serves every test, in file order; the last one kills it with
SIGKILL and restarts it on the same port and data. The worker child takes ~10 s to import torch and load the prior on a loaded 2-core box,
so every test that replaces the child (cancel by kill, kill -9) pays that once.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engine_server.wire.client import EngineClient, RequestError
from engine_server.export import glb_facts, load_glb, object_name

from .conftest import HEARTBEAT_S

pytestmark = [pytest.mark.slow,  # a real worker runs real jobs: ~60 s for the module on 2 cores
              pytest.mark.skipif(os.name != "posix", reason="POSIX signals and /proc")]

TINY = {"coarse_steps": 4, "tet_resolution": 24, "texture_size": 64, "preview_every": 2}
"""A job that runs in a few seconds on a CPU."""
SLOW = {"coarse_steps": 400, "tet_resolution": 24, "texture_size": 64, "preview_every": 1000}
"""A job that is still in its coarse stage when the test acts on it."""
SLOW_SHORT_STEPS = {**SLOW, "views_per_step": 1, "samples_per_ray": 32}
"""Like SLOW with quick steps, so a cancel is seen between two steps (no need to kill the worker)."""
JOB_TIMEOUT = 90.0


def start_engine(data: Path, key_file: Path, log: Path, bind: str = "tcp://127.0.0.1:*") -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(log, "ab") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine_server", "serve", "--bind", bind, "--data", str(data), "--key-file",
             str(key_file), "--heartbeat", str(HEARTBEAT_S), "--device", "cpu", "--threads", "1"],
            stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        proc.kill()
        raise AssertionError(f"server did not start: {line!r} {log.read_text()[-2000:]}")
    return proc, line.split()[-1]


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (the worker children of a server)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    proc.stdout.close()


def collect(client: EngineClient, job_id: str, timeout: float = JOB_TIMEOUT, on_event=None) -> list:
    """The job's events up to and including its end."""
    deadline = time.monotonic() + timeout
    events = []
    while time.monotonic() < deadline:
        for event in client.poll_events(0.05):
            if event.job_id != job_id:
                continue
            events.append(event)
            if on_event is not None:
                on_event(event)
            if event.type in ("done", "failed", "cancelled"):
                return events
    raise AssertionError(f"job {job_id} did not end within {timeout} s; got {[e.type for e in events]}")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    proc, endpoint = start_engine(root / "data", root / "key", root / "server.log")
    client = EngineClient(endpoint, root / "key", heartbeat_s=HEARTBEAT_S, timeout=10)
    engine_state = {"proc": proc, "endpoint": endpoint, "client": client, "root": root}
    try:
        client.hello()
        yield engine_state
    finally:
        client.close()
        stop(engine_state["proc"])


def test_text_job_streams_progress_preview_mesh_done_and_the_glb_loads(engine, tmp_path):
    client = engine["client"]
    job = client.submit("text", "a red cube", seed=3, options=TINY)
    events = collect(client, job)
    types = [e.type for e in events]
    assert types[-1] == "done", [(e.type, e.fields) for e in events if e.type == "failed"]
    first = {t: types.index(t) for t in ("progress", "preview", "mesh")}
    assert first["progress"] < first["preview"] < first["mesh"] < len(types) - 1, types
    assert not any(e.get("texture") for e in events if e.type == "mesh")  # intermediate meshes only: no final copy
    coarse = [e for e in events if e.type == "progress" and e["stage"] == "coarse"]
    assert coarse and coarse[-1]["step"] == coarse[-1]["total"] == TINY["coarse_steps"]
    assert coarse[0]["step"] == 0 and "loss" not in coarse[0].fields  # the stage has begun, no step yet
    assert all(np.isfinite(e["loss"]) for e in coarse[1:])
    preview = next(e for e in events if e.type == "preview")
    assert preview["image"].data[:8] == b"\x89PNG\r\n\x1a\n" and preview["image"].width > 0

    result = client.result(job)
    out = tmp_path / "cube.glb"
    out.write_bytes(result.glb)
    mesh = load_glb(out)
    assert len(mesh.faces) == result.arrays["faces"].shape[0] > 0
    assert set(result.arrays) == {"vertices", "faces", "uvs"}  # the texture travels once, as the PNG
    assert result.texture[:8] == b"\x89PNG\r\n\x1a\n" and result.texture == glb_facts(out).texture_png
    assert result.meta["name"] == glb_facts(out).name == object_name("a red cube") == "red_cube"
    vertices = result.arrays["vertices"].numpy()
    assert np.isfinite(vertices).all() and np.abs(vertices).max() <= 0.5 + 1e-4  # unit box at the origin
    assert mesh.texture is not None and mesh.texture.shape[:2] == (TINY["texture_size"],) * 2
    assert result.meta["seed"] == 3 and result.meta["prompt"] == "a red cube" and result.meta["resumed_from_step"] == 0


def test_unknown_prompt_is_refused_at_submit_and_a_bad_option_fails_clearly(engine):
    client = engine["client"]
    with pytest.raises(RequestError) as info:  # refused at once, not after waiting in the queue
        client.submit("text", "a flying unicorn", options=TINY)
    assert (info.value.code, info.value.field) == ("invalid", "prompt")
    assert "flying" in info.value.message and "unicorn" in info.value.message and "cube" in info.value.message
    job = client.submit("text", "a red cube", options={**TINY, "coarse_stepz": 3})
    end = collect(client, job)[-1]
    assert end.type == "failed" and "coarse_stepz" in end["message"] and "coarse_steps" in end["message"]
    assert client.ping() < 2.0
    assert {j["job_id"]: j["state"] for j in client.jobs()}[job] == "failed"


def test_diverging_optimisation_fails_as_non_finite(engine):
    client = engine["client"]
    job = client.submit("text", "a blue sphere", options={**TINY, "learning_rate": 1e30})
    events = collect(client, job)
    assert (events[-1].type, events[-1]["code"]) == ("failed", "non_finite"), events[-1].fields
    assert not [e for e in events if e.type == "mesh"]  # never a NaN mesh
    summary = next(j for j in client.jobs() if j["job_id"] == job)
    assert summary["error_code"] == "non_finite"


def _object_on_background_png(size: int = 32) -> bytes:
    """A red square on the bundled prior's cyan background: what a flat reference render looks like."""
    import io

    from PIL import Image as PILImage

    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[:] = (0, 191, 191)
    pixels[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = (200, 30, 30)
    buf = io.BytesIO()
    PILImage.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def test_image_job_reconstructs_the_reference_into_a_glb(engine, tmp_path):
    client = engine["client"]
    job = client.submit("image", "", seed=1, image=_object_on_background_png(), options=TINY)
    events = collect(client, job)
    assert events[-1].type == "done", [(e.type, e.fields) for e in events if e.type == "failed"]
    stages = [e["stage"] for e in events if e.type == "progress"]
    assert stages.index("views") < stages.index("coarse") < stages.index("export")
    result = client.result(job)
    out = tmp_path / "image.glb"
    out.write_bytes(result.glb)
    assert len(load_glb(out).faces) > 0 and result.meta["kind"] == "image"


def test_multiview_job_returns_agreeing_views_and_their_reconstruction(engine, tmp_path):
    client = engine["client"]
    job = client.submit("multiview", "a blue sphere", seed=3,
                        options={**TINY, "views": 3, "multiview_strategy": "sequential", "multiview_steps": 4})
    events = collect(client, job)
    assert events[-1].type == "done", [(e.type, e.fields) for e in events if e.type == "failed"]
    # The generated views arrive as one preview strip in the views stage, before the fit starts.
    strip = next(e for e in events if e.type == "preview" and e["stage"] == "views")
    assert (strip["image"].width, strip["image"].height) == (3 * 32, 32)
    result = client.result(job)
    views, c2w = result.arrays["views"].numpy(), result.arrays["view_c2w"].numpy()
    assert views.shape == (3, 32, 32, 3) and views.dtype == np.uint8 and c2w.shape == (3, 4, 4)
    assert result.arrays["view_fov_y_deg"].numpy().shape == (3,)
    meta = result.meta
    assert meta["kind"] == "multiview" and meta["views"]["strategy"] == "sequential"
    assert len(meta["views"]["agreement"]) == 3 and isinstance(meta["views"]["left_out"], list)
    assert meta["reference_camera"]["source"] in ("default", "estimated", "rig")
    # Blue on the cyan background: the views show the prompt.
    fg = views.reshape(-1, 3)[np.abs(views.reshape(-1, 3).astype(int) - [0, 191, 191]).max(1) > 40]
    assert len(fg) > 30 and np.median(fg[:, 2]) > np.median(fg[:, 0]) + 60
    out = tmp_path / "multiview.glb"
    out.write_bytes(result.glb)
    assert len(load_glb(out).faces) > 0


@pytest.mark.parametrize("options, message", [
    ({"views": 1}, "options.views"), ({"multiview_strategy": "joint"}, "multiview_strategy"),
    ({"multiview_steps": 0}, "multiview_steps"),
])
def test_multiview_job_with_a_bad_view_option_fails_naming_it(engine, options, message):
    client = engine["client"]
    job = client.submit("multiview", "a red cube", seed=0, options={**TINY, **options})
    events = collect(client, job)
    assert events[-1].type == "failed" and events[-1]["code"] == "invalid_option", events[-1].fields
    assert message in events[-1]["message"]


def test_texture_refine_job_keeps_the_topology_and_the_frame(engine, tmp_path):
    import trimesh

    client = engine["client"]
    box = trimesh.creation.box((2.0, 2.0, 2.0))
    world = np.eye(4)
    world[:3, 3] = (3.0, 0.0, 1.0)  # the object sits away from the origin in the scene
    mesh = {"vertices": box.vertices.astype(np.float32), "faces": box.faces.astype(np.int32), "matrix_world": world}
    job = client.submit("refine", "a green cube", seed=2, mesh=mesh, mode="texture",
                        options={"refine_steps": 3, "texture_size": 64})
    events = collect(client, job)
    assert events[-1].type == "done", [(e.type, e.fields) for e in events if e.type == "failed"]
    result = client.result(job)
    vertices = result.arrays["vertices"].numpy()
    faces = result.arrays["faces"].numpy()
    assert len(faces) == len(box.faces)
    # texture mode: the input's own local positions come back (only UV-seam duplicates added)
    assert {tuple(v) for v in np.round(vertices, 5)} == {tuple(v) for v in np.round(box.vertices, 5)}


def _overcommit_refuses_huge() -> bool:
    try:
        return Path("/proc/sys/vm/overcommit_memory").read_text().strip() in ("0", "2")
    except OSError:
        return False


@pytest.mark.skipif(not _overcommit_refuses_huge(), reason="needs a kernel that refuses a 4 TB allocation outright")
def test_an_allocation_too_large_for_the_machine_fails_as_out_of_memory(engine):
    client = engine["client"]
    job = client.submit("text", "a red cube", options={**TINY, "occupancy_resolution": 16384})  # 16384^3 cells
    end = collect(client, job)[-1]
    assert (end.type, end["code"]) == ("failed", "out_of_memory"), end.fields
    assert alive(engine["proc"].pid) and client.ping() < 2.0


def test_cancel_ends_a_running_job_within_a_second_and_the_next_job_succeeds(engine):
    client = engine["client"]
    job = client.submit("text", "a green cone", options=SLOW_SHORT_STEPS)
    asked: list[float] = []

    def on_event(event):
        if event.type == "progress" and event.get("stage") == "coarse" and event["step"] >= 2 and not asked:
            asked.append(time.monotonic())
            assert client.cancel(job) == "running"

    events = collect(client, job, on_event=on_event)
    assert asked and events[-1].type == "cancelled"
    assert time.monotonic() - asked[0] < 1.0 + 0.1  # + one poll interval of this loop
    assert next(j for j in client.jobs() if j["job_id"] == job)["state"] == "cancelled"
    nxt = client.submit("text", "a red cube", options=TINY)
    assert collect(client, nxt)[-1].type == "done"


def test_kill_9_of_the_worker_resumes_the_job_from_its_checkpoint_on_a_fresh_worker(engine):
    client, server = engine["client"], engine["proc"]
    options = {"coarse_steps": 6, "tet_resolution": 24, "texture_size": 64, "checkpoint_every": 2}
    job = client.submit("text", "a yellow torus", seed=4, options=options)
    checkpoints = engine["root"] / "data" / "jobs" / job / "checkpoints"
    killed: list[tuple[int, float]] = []
    step = 0

    def on_event(event):
        nonlocal step
        if event.type == "progress" and event.get("stage") == "coarse":
            step = event["step"]

    deadline = time.monotonic() + JOB_TIMEOUT
    while not killed:  # kill -9 the worker once a checkpoint is on disk and the coarse stage is not over
        assert time.monotonic() < deadline, "no checkpoint was written"
        for event in client.poll_events(0.02):
            assert not (event.job_id == job and event.type in ("done", "failed", "cancelled")), event.fields
            if event.job_id == job:
                on_event(event)
        if step < options["coarse_steps"] and checkpoints.is_dir() and any(checkpoints.glob("*.pt")):
            workers = children(server.pid)
            assert len(workers) == 1, workers
            os.kill(workers[0], signal.SIGKILL)
            killed.append((workers[0], time.monotonic()))
    events = collect(client, job)
    assert events[-1].type == "done", events[-1].fields
    # (the "requeued" progress event may be replaced by a newer one before the client sees it: latest value wins)
    log = (engine["root"] / "server.log").read_text()
    assert f"job {job}: the worker process was killed by signal 9" in log and "attempt 2 of 3 next" in log
    print(f"killed at coarse step {step}; resumed and done {time.monotonic() - killed[0][1]:.1f} s after the kill")
    result = client.result(job)
    assert result.meta["resumed_from_step"] >= options["checkpoint_every"], result.meta
    assert next(j for j in client.jobs() if j["job_id"] == job)["attempts"] == 2
    assert killed[0][0] not in children(server.pid)
    # The fresh worker is still importing torch and loading the prior: it cannot see a cancel
    # between steps, so the server terminates it, still within a second.
    busy = client.submit("text", "a green cone", options=SLOW)
    asked: list[float] = []

    def on_start(event):
        if event.type == "progress" and event.get("stage") == "starting" and not asked:
            asked.append(time.monotonic())
            client.cancel(busy)

    assert collect(client, busy, on_event=on_start)[-1].type == "cancelled"
    assert asked and time.monotonic() - asked[0] < 1.0 + 0.1
    nxt = client.submit("text", "a red cube", options=TINY)
    assert collect(client, nxt)[-1].type == "done"
    assert children(server.pid) and killed[0] not in children(server.pid)


def test_jobs_command_lists_shows_fetches_and_deletes_from_the_store(engine, tmp_path):
    data = engine["root"] / "data"
    done = [j for j in engine["client"].jobs(state="done")]
    assert done
    job = done[0]["job_id"]

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "engine_server", "jobs", "--data", str(data), *args],
                              capture_output=True, text=True, timeout=60)

    r = cli("list")
    assert r.returncode == 0 and job in r.stdout and "non_finite" in r.stdout
    r = cli("show", job)
    assert r.returncode == 0 and '"state": "done"' in r.stdout and '"faces"' in r.stdout
    r = cli("result", job, "--out", str(tmp_path / "x.glb"))
    assert r.returncode == 0 and len(load_glb(tmp_path / "x.glb").faces) > 0
    r = cli("delete", job)
    assert r.returncode == 0
    r = cli("show", job)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no job" in r.stderr and "Traceback" not in r.stderr
    assert job not in [j["job_id"] for j in engine["client"].jobs()]


def test_kill_9_of_the_server_mid_job_resumes_from_the_checkpoint_after_a_restart(engine):
    """Last in the file: it replaces the module's server by a restarted one on the same port and data."""
    client, proc, root = engine["client"], engine["proc"], engine["root"]
    options = {"coarse_steps": 12, "checkpoint_every": 3, "tet_resolution": 24, "texture_size": 64,
               "preview_every": 100}
    job = client.submit("text", "a purple cylinder", seed=5, options=options)
    deadline = time.monotonic() + JOB_TIMEOUT
    step = 0
    while step < 5:  # the checkpoint of step 3 is committed once step 5 is reported
        assert time.monotonic() < deadline, "the job never reached step 5"
        for e in client.poll_events(0.05):
            if e.job_id == job and e.type == "progress" and e.get("stage") == "coarse":
                step = e["step"]
            assert not (e.job_id == job and e.type in ("done", "failed", "cancelled")), e.fields
    workers = children(proc.pid)
    session = client.server_session
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    proc.stdout.close()
    deadline = time.monotonic() + 5
    while any(alive(w) for w in workers):  # the orphaned worker stops by itself
        assert time.monotonic() < deadline, "the worker outlived its server"
        time.sleep(0.05)
    proc, again = start_engine(root / "data", root / "key", root / "server.log", bind=engine["endpoint"])
    engine["proc"] = proc  # the fixture stops this one
    assert again == engine["endpoint"]
    end = collect(client, job)[-1]  # the client notices the restart and subscribes again
    assert client.server_session != session
    assert end.type == "done", end.fields
    result = client.result(job)
    assert result.meta["resumed_from_step"] >= 3 and result.meta["resumed_from_step"] % 3 == 0
    summary = next(j for j in client.jobs() if j["job_id"] == job)
    assert summary["attempts"] == 2
    assert np.isfinite(result.arrays["vertices"].numpy()).all()
