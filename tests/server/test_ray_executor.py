"""The engine's workers as Ray actors: a real local Ray cluster, a real server process, real ZeroMQ on loopback.

The test process starts a private 2-CPU Ray cluster (small object store) and is a driver
of it, to look the actors up as ``engine-server info`` does; the server runs as
``engine-server serve --executor ray --ray-actors 2`` in a child process, which the last
test kills with SIGKILL and restarts on the same port and data. Jobs are the bundled
prior's tiny ones, one torch thread per actor.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engine_server.cli import main
from engine_server.wire.client import EngineClient

from .conftest import HEARTBEAT_S
from .test_engine_integration import JOB_TIMEOUT, SLOW_SHORT_STEPS, TINY, alive, collect, stop

CHECKPOINTED = {"coarse_steps": 12, "checkpoint_every": 3, "tet_resolution": 24, "texture_size": 64,
                "preview_every": 100}
"""A job with checkpoints at coarse steps 3, 6, 9 that is still in its coarse stage when the test acts."""
WARM_TIMEOUT = 180.0
"""Actors import torch and load the prior, two at once on two loaded cores."""


def test_ray_flags_need_the_ray_executor_and_sane_values(capsys):
    assert main(["serve", "--ray-actors", "2"]) == 2
    assert "--ray-actors needs --executor ray" in capsys.readouterr().err
    assert main(["serve", "--executor", "ray", "--ray-cpus-per-actor", "0"]) == 2
    assert "CPUs per actor must be > 0" in capsys.readouterr().err
    assert main(["serve", "--executor", "ray", "--ray-actors", "-1"]) == 2
    assert "actor count" in capsys.readouterr().err
    assert main(["serve", "--executor", "ray", "--device", "cpu", "--device", "cuda"]) == 2
    assert "give --device once" in capsys.readouterr().err


ray = pytest.importorskip("ray", reason="the cluster extra (ray) is not installed")
from engine_server.service.ray_executor import NAMESPACE, RayConfig, RayExecutor, cluster_info  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    """A private local Ray cluster: 2 CPUs, a 100 MB object store; its address."""
    ray.init(num_cpus=2, object_store_memory=100_000_000, include_dashboard=False, namespace=NAMESPACE,
             log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def start_server(root: Path, address: str, bind: str = "tcp://127.0.0.1:*") -> tuple[subprocess.Popen, str]:
    """``engine-server serve --executor ray`` with two one-CPU actors; returns (process, endpoint)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(root / "server.log", "ab") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "engine_server", "serve", "--bind", bind, "--data", str(root / "data"),
             "--key-file", str(root / "key"), "--heartbeat", str(HEARTBEAT_S), "--executor", "ray",
             "--ray-address", address, "--ray-actors", "2", "--device", "cpu", "--threads", "1"],
            stdout=subprocess.PIPE, stderr=err, text=True, env=env)
    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        proc.kill()
        raise AssertionError(f"server did not start: {line!r} {(root / 'server.log').read_text()[-3000:]}")
    return proc, line.split()[-1]


def warm_actors(address: str, n: int = 2, exclude: set[str] = frozenset()) -> list[dict]:
    """Wait until ``n`` engine actors (not named in ``exclude``) answer: created, torch imported, prior loaded."""
    deadline = time.monotonic() + WARM_TIMEOUT
    while True:
        ready = [a for a in cluster_info(address)["actors"]
                 if a["state"] in ("idle", "busy") and a["name"] not in exclude]
        if len(ready) >= n:
            return ready
        assert time.monotonic() < deadline, f"{n} actors did not warm up within {WARM_TIMEOUT} s"
        time.sleep(0.5)


def actor_of(log: Path, job_id: str, attempt: int) -> str:
    """The actor the server's log says ran this attempt of the job."""
    found = re.search(rf"job {job_id} \(attempt {attempt}\) runs on actor (\S+),", log.read_text())
    assert found, f"no attempt {attempt} of job {job_id} in the server log"
    return found.group(1)


def mesh_hash(client: EngineClient, job_id: str) -> str:
    """SHA-256 of the result's vertices, faces, UVs and texture PNG."""
    result = client.result(job_id, glb=False)
    digest = hashlib.sha256()
    for name in ("vertices", "faces", "uvs"):
        digest.update(result.arrays[name].numpy().tobytes())
    digest.update(result.texture)
    return digest.hexdigest()


def ends_of(client: EngineClient, job_ids: list[str], timeout: float = JOB_TIMEOUT) -> dict[str, object]:
    """Each job's end event (done / failed / cancelled), waiting for all of them."""
    deadline = time.monotonic() + timeout
    ends: dict[str, object] = {}
    while len(ends) < len(job_ids):
        assert time.monotonic() < deadline, f"jobs {set(job_ids) - set(ends)} did not end within {timeout} s"
        for e in client.poll_events(0.05):
            if e.job_id in job_ids and e.type in ("done", "failed", "cancelled"):
                ends[e.job_id] = e
    return ends


def until_step(client: EngineClient, job_id: str, step: int) -> None:
    """Take events until the job reports coarse step ``step`` (failing if it ends first)."""
    deadline = time.monotonic() + JOB_TIMEOUT
    seen = 0
    while seen < step:
        assert time.monotonic() < deadline, f"job {job_id} never reached coarse step {step}"
        for e in client.poll_events(0.05):
            assert not (e.job_id == job_id and e.type in ("done", "failed", "cancelled")), e.fields
            if e.job_id == job_id and e.type == "progress" and e.get("stage") == "coarse":
                seen = e["step"]


@pytest.fixture(scope="module")
def engine(cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-engine")
    proc, endpoint = start_server(root, cluster)
    state = {"proc": proc, "endpoint": endpoint, "root": root, "log": root / "server.log", "address": cluster}
    client = EngineClient(endpoint, root / "key", heartbeat_s=HEARTBEAT_S, timeout=10)
    state["client"] = client
    try:
        state["actors"] = warm_actors(cluster)  # first: two actors importing torch load both cores
        client.hello()
        yield state
    finally:
        client.close()
        stop(state["proc"])


@pytest.mark.slow
def test_a_job_deaf_to_its_cancel_has_its_actor_killed_and_ray_restarts_it_for_the_next(cluster, tmp_path, key_file):
    """No grace: the cancel kills the actor at once (as for a job stuck in one long step).

    First of the cluster's tests: its own server and actor use the cluster before the module's server takes both CPUs.
    """
    from engine_server.service.runner import RunnerConfig
    from engine_server.service.server import EngineServer, ServerConfig

    server = EngineServer(ServerConfig(bind="tcp://127.0.0.1:*", data_dir=tmp_path / "data", key_file=key_file,
                                       heartbeat_s=HEARTBEAT_S))
    endpoint = server.bind()
    executor = server.executor = RayExecutor(server.store.root, RayConfig(
        actors=1, cancel_grace_s=0.0, runner=RunnerConfig(device="cpu", threads=1)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    client = EngineClient(endpoint, key_file, heartbeat_s=HEARTBEAT_S, timeout=10)
    try:
        deadline = time.monotonic() + WARM_TIMEOUT
        while executor.capacity() < 1:
            assert time.monotonic() < deadline, executor.actors()
            time.sleep(0.1)
        first = executor.actors()[0]
        job = client.submit("text", "a green cone", options=SLOW_SHORT_STEPS)
        until_step(client, job, 1)
        asked = time.monotonic()
        assert client.cancel(job) == "running"
        assert ends_of(client, [job])[job].type == "cancelled"
        print(f"cancel by killing the actor: {(time.monotonic() - asked) * 1e3:.0f} ms")
        assert time.monotonic() - asked < 1.0 and executor.stats["cancel_kills"] == 1
        nxt = client.submit("text", "a red cube", options=TINY)
        assert ends_of(client, [nxt], timeout=WARM_TIMEOUT)[nxt].type == "done"
        again = executor.actors()[0]
        assert again["name"] == first["name"] and again["pid"] != first["pid"] and not alive(first["pid"])
    finally:
        client.close()
        server.stop()
        thread.join(10)
        server.close()
    deadline = time.monotonic() + 10
    while alive(again["pid"]):  # closing the executor ends its actors
        assert time.monotonic() < deadline, "the actor outlived its executor"
        time.sleep(0.05)


@pytest.mark.slow
def test_four_jobs_on_two_actors_run_two_at_a_time_and_all_finish(engine):
    client, log = engine["client"], engine["log"]
    jobs = [client.submit("text", "a red cube", seed=i, options=TINY) for i in range(4)]
    states = {j["job_id"]: j["state"] for j in client.jobs()}
    assert sorted(states[j] for j in jobs) == ["queued", "queued", "running", "running"]  # no free actor: queued
    deadline = time.monotonic() + 5
    while True:  # the listing names the node of each running job
        running = [j for j in client.jobs(state="running") if j["job_id"] in jobs[:2]]
        if len(running) == 2 and all(j.get("progress", {}).get("node") for j in running):
            break
        assert time.monotonic() < deadline, running
        time.sleep(0.05)
    assert {j["progress"]["node"] for j in running} == {a["node"] for a in engine["actors"]}
    ends, spans = {}, {}
    deadline = time.monotonic() + JOB_TIMEOUT
    while len(ends) < 4:
        assert time.monotonic() < deadline, ends
        for e in client.poll_events(0.05):
            now = time.monotonic()
            if e.type == "progress" and e.get("stage") == "coarse":
                spans.setdefault(e.job_id, [now, now])
            elif e.type in ("done", "failed", "cancelled"):
                ends[e.job_id] = e
                spans.setdefault(e.job_id, [now, now])[1] = now
    assert all(ends[j].type == "done" for j in jobs), {j: ends[j].fields for j in jobs}
    assert actor_of(log, jobs[0], 1) != actor_of(log, jobs[1], 1)
    (a0, a1), (b0, b1) = spans[jobs[0]], spans[jobs[1]]
    assert max(a0, b0) < min(a1, b1), "the first two jobs did not run at the same time"
    assert {client.result(j, glb=False).meta["faces"] > 0 for j in jobs} == {True}


@pytest.mark.slow
def test_killed_actor_job_resumes_from_its_checkpoint_on_the_other_with_the_same_mesh(engine):
    client, log = engine["client"], engine["log"]
    reference = client.submit("text", "a yellow torus", seed=4, options=CHECKPOINTED)
    assert collect(client, reference)[-1].type == "done"
    job = client.submit("text", "a yellow torus", seed=4, options=CHECKPOINTED)
    until_step(client, job, 5)  # the checkpoint of step 3 is on disk once step 5 is reported
    victim = next(a for a in cluster_info(engine["address"])["actors"] if a.get("job") == job)
    os.kill(victim["pid"], signal.SIGKILL)
    killed = time.monotonic()
    resumed_at = None

    def on_event(event):
        nonlocal resumed_at
        if event.type == "progress" and event.get("stage") == "coarse" and resumed_at is None:
            resumed_at = time.monotonic()

    events = collect(client, job, on_event=on_event)
    assert events[-1].type == "done", events[-1].fields
    done_s = time.monotonic() - killed
    print(f"actor killed at coarse step >= 5: first coarse step of the resumed attempt "
          f"{resumed_at - killed:.2f} s later, done {done_s:.2f} s after the kill")
    assert actor_of(log, job, 1) == victim["name"] != actor_of(log, job, 2)
    assert f"the Ray actor {victim['name']} on {victim['node']} died while running the job" in log.read_text()
    result = client.result(job, glb=False)
    assert result.meta["resumed_from_step"] >= 3 and result.meta["resumed_from_step"] % 3 == 0, result.meta
    assert next(j for j in client.jobs() if j["job_id"] == job)["attempts"] == 2
    assert mesh_hash(client, job) == mesh_hash(client, reference)
    # Ray restarts the killed actor in a fresh process, which takes jobs again once warm.
    again = next(a for a in warm_actors(engine["address"]) if a["name"] == victim["name"])
    assert again["pid"] != victim["pid"] and not alive(victim["pid"])


@pytest.mark.slow
def test_info_shows_the_job_on_its_actor_and_cancel_ends_it_within_a_second(engine):
    client, log = engine["client"], engine["log"]
    job = client.submit("text", "a green cone", options=SLOW_SHORT_STEPS)
    until_step(client, job, 1)
    info = subprocess.run([sys.executable, "-m", "engine_server", "info", "--json", "--ray-address", engine["address"]],
                          capture_output=True, text=True, timeout=120)
    assert info.returncode == 0, info.stderr[-2000:]
    cluster = json.loads(info.stdout)["cluster"]
    assert [n["alive"] for n in cluster["nodes"]] == [True] and cluster["cpus"] == 2
    running = [a for a in cluster["actors"] if a.get("job") == job]
    assert len(running) == 1 and running[0]["node"] and running[0]["device"] == "cpu"
    assert running[0]["name"] == actor_of(log, job, 1)

    asked: list[float] = []

    def on_event(event):
        if event.type == "progress" and event.get("stage") == "coarse" and not asked:
            asked.append(time.monotonic())
            assert client.cancel(job) == "running"

    events = collect(client, job, on_event=on_event)
    latency = time.monotonic() - asked[0]
    print(f"cancel latency {latency * 1e3:.0f} ms")
    assert events[-1].type == "cancelled" and latency < 1.0 + 0.1  # + one poll interval of this loop
    assert "killing actor" not in log.read_text()  # the flag stopped it, no kill needed
    # Both actors take the next two jobs, the one that ran the cancelled job among them.
    nxt = [client.submit("text", "a red cube", seed=10 + i, options=TINY) for i in range(2)]
    assert [e.type for e in ends_of(client, nxt).values()] == ["done", "done"]
    assert running[0]["name"] in {actor_of(log, j, 1) for j in nxt}


@pytest.mark.slow
def test_server_killed_while_the_cluster_runs_restarts_and_its_jobs_complete(engine):
    """Last in the file: it replaces the module's server by a restarted one on the same port and data."""
    client, address = engine["client"], engine["address"]
    job = client.submit("text", "a purple cylinder", seed=5, options=CHECKPOINTED)
    other = client.submit("text", "a red cube", seed=6, options=CHECKPOINTED)
    until_step(client, job, 5)
    assert {j["job_id"] for j in client.jobs(state="running")} == {job, other}
    before = warm_actors(address)
    session = client.server_session
    engine["proc"].kill()
    engine["proc"].wait(10)
    engine["proc"].stdout.close()
    deadline = time.monotonic() + 30
    while any(alive(a["pid"]) for a in before):  # Ray ends the actors of a driver that died
        assert time.monotonic() < deadline, "the actors outlived their server"
        time.sleep(0.1)
    restarted = time.monotonic()
    proc, again = start_server(engine["root"], address, bind=engine["endpoint"])
    engine["proc"] = proc  # the fixture stops this one
    assert again == engine["endpoint"]
    ends = ends_of(client, [job, other], timeout=WARM_TIMEOUT + JOB_TIMEOUT)  # the client subscribes again itself
    assert client.server_session != session
    assert {j: e.type for j, e in ends.items()} == {job: "done", other: "done"}, {j: e.fields for j, e in ends.items()}
    print(f"server restarted: both jobs done {time.monotonic() - restarted:.1f} s later (fresh actors warm up first)")
    result = client.result(job, glb=False)
    assert result.meta["resumed_from_step"] >= 3 and result.meta["resumed_from_step"] % 3 == 0, result.meta
    assert [j["attempts"] for j in client.jobs() if j["job_id"] in (job, other)] == [2, 2]
