"""A real server process on loopback: heartbeat loss under SIGSTOP, kill -9 and restart, refusing a public bind."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from engine_server.wire.client import EngineClient

from .conftest import HEARTBEAT_S

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX signals")


def start_server(data, key_file, bind="tcp://127.0.0.1:*", *extra) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine_server", "serve", "--bind", bind, "--data", str(data), "--key-file", str(key_file),
         "--heartbeat", str(HEARTBEAT_S), "--protocol-only", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        proc.kill()
        raise AssertionError(f"server did not start: {line!r} {proc.stderr.read()}")
    return proc, line.split()[-1]


@pytest.fixture
def processes():
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGCONT)
            p.kill()
        p.wait(10)
        p.stdout.close()
        p.stderr.close()


def poll_until(client: EngineClient, cond, timeout: float) -> float:
    """Poll the client until cond() holds; returns the seconds it took."""
    start = time.monotonic()
    while not cond():
        assert time.monotonic() - start < timeout, "condition not reached"
        client.poll_events(0.02)
    return time.monotonic() - start


@pytest.mark.slow  # waits out three heartbeats plus a server start: ~3 s
def test_sigstopped_server_reported_unresponsive_within_three_heartbeats(tmp_path, processes):
    key_file = tmp_path / "key"
    proc, endpoint = start_server(tmp_path / "data", key_file)
    processes.append(proc)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600  # created on first start, private
    client = EngineClient(endpoint, key_file, heartbeat_s=HEARTBEAT_S, timeout=5)
    try:
        client.hello()
        calm_until = time.monotonic() + 4 * HEARTBEAT_S
        while time.monotonic() < calm_until:  # heartbeats keep it alive while nothing else happens
            client.poll_events(0.02)
            assert client.is_responsive
        os.kill(proc.pid, signal.SIGSTOP)
        took = poll_until(client, lambda: not client.is_responsive, 10 * HEARTBEAT_S)
        assert took <= 3 * HEARTBEAT_S + 0.3, took
        assert client.reconnects <= 2
        os.kill(proc.pid, signal.SIGCONT)
        poll_until(client, lambda: client.is_responsive, 15.0)
        assert client.ping() < 1.0
    finally:
        client.close()


def test_kill_9_and_restart_keeps_jobs_and_subscriptions(tmp_path, processes):
    key_file = tmp_path / "key"
    proc, endpoint = start_server(tmp_path / "data", key_file)
    processes.append(proc)
    client = EngineClient(endpoint, key_file, heartbeat_s=HEARTBEAT_S, timeout=5)
    try:
        client.hello()
        job = client.submit("text", "a red cube")
        first_session = client.server_session
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc, again = start_server(tmp_path / "data", key_file, endpoint)  # same port, same data
        processes.append(proc)
        assert again == endpoint
        # the client notices the new session from a pong and subscribes again by itself
        poll_until(client, lambda: client.server_session not in (None, first_session), 15.0)
        assert [j["job_id"] for j in client.jobs()] == [job]
        other = EngineClient(endpoint, key_file, timeout=5)
        try:
            assert other.cancel(job) == "cancelled"
        finally:
            other.close()
        event = client.wait(job, timeout=10.0)
        assert (event.type, event.job_id) == ("cancelled", job)
    finally:
        client.close()


def test_public_bind_without_auth_exits_with_a_reason(tmp_path):
    r = subprocess.run([sys.executable, "-m", "engine_server", "serve", "--bind", "tcp://0.0.0.0:0", "--no-auth",
                        "--data", str(tmp_path / "d"), "--key-file", str(tmp_path / "k")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "without authentication" in r.stderr
    assert not (tmp_path / "k").exists()


def test_a_request_sent_while_the_server_restarts_is_stamped_again_and_succeeds(tmp_path, processes):
    """A request signed before a restart is refused after it (replay); the client sends it again with a fresh stamp."""
    import threading

    key_file = tmp_path / "key"
    proc, endpoint = start_server(tmp_path / "data", key_file)
    processes.append(proc)
    # A long heartbeat: the client keeps its socket (and the queued request) instead of reconnecting.
    client = EngineClient(endpoint, key_file, heartbeat_s=30.0, timeout=20.0, retries=0)
    try:
        client.hello()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        out: dict = {}
        worker = threading.Thread(target=lambda: out.update(job=client.submit("text", "a red cube")))
        worker.start()  # signed now, queued in the socket until the server is back
        time.sleep(0.5)
        proc, again = start_server(tmp_path / "data", key_file, endpoint)
        processes.append(proc)
        worker.join(30)
        assert out.get("job"), "the submit did not succeed after the restart"
        assert [j["job_id"] for j in client.jobs()] == [out["job"]]
    finally:
        client.close()
