"""The add-on's bpy-free session against a real server on loopback: job list, failure reasons, the result it imports."""
from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from engine_server.service.jobs import Result
from engine_server.service.server import EngineServer, ServerConfig
from engine_server.wire.auth import load_or_create_key

from ..server.conftest import glb_bytes, png_bytes
from .conftest import ROOT  # noqa: F401  (puts the repo root on sys.path)

from blender_addon.session import Session  # noqa: E402


@pytest.fixture
def server(tmp_path):
    key = tmp_path / "key"
    load_or_create_key(key)
    srv = EngineServer(ServerConfig(bind="tcp://127.0.0.1:*", data_dir=tmp_path / "data", key_file=key))
    srv.bind()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv, key
    srv.stop()
    thread.join(10)
    srv.close()


@pytest.fixture
def session(server, tmp_path):
    srv, key = server
    s = Session(srv.endpoint, str(key), timeout=5.0, state_dir=tmp_path / "addon")
    s.connect()
    yield s
    s.close()


def test_refresh_keeps_the_failure_reason_of_a_job_that_failed_while_blender_was_closed(server, session):
    srv, _ = server
    job = session.submit("text", name="a red cube", prompt="a red cube")
    srv.store.claim_next()
    srv.store.finish(job.job_id, "failed", "non_finite", "the loss became NaN at step 3")
    session.jobs.clear()  # as after a restart with no saved list
    (view,) = [j for j in session.refresh() if j.job_id == job.job_id]
    assert view.state == "failed" and view.message == "non_finite: the loss became NaN at step 3"


def test_submit_sends_the_placement_and_saves_the_job_list_atomically(server, session, tmp_path):
    srv, _ = server
    cursor = [[1.0, 0, 0, 2.0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]]
    job = session.submit("text", name="a red cube", prompt="a red cube", placement=cursor)
    assert srv.store.load_request(job.job_id)["placement"] == cursor  # the engine reads it (rig, result meta)
    saved = tmp_path / "addon" / "jobs.json"
    assert json.loads(saved.read_text())[srv.endpoint][0]["placement"] == cursor
    assert [p.name for p in saved.parent.iterdir()] == ["jobs.json"]  # no temp file left beside it


def test_the_result_the_addon_imports_carries_name_texture_and_arrays_and_no_glb(server, session, tmp_path):
    srv, _ = server
    job = session.submit("text", name="a red cube", prompt="a red cube")
    srv.store.claim_next()
    glb = srv.store.job_dir(job.job_id) / "model.glb"
    glb.write_bytes(glb_bytes(64))
    vertices = np.zeros((3, 3), np.float32)
    srv.store.write_result(job.job_id, Result(glb, png_bytes(8, 8), {"vertices": vertices,
                                                                    "faces": np.array([[0, 1, 2]], np.int32)},
                                              {"name": "red_cube"}))
    srv.store.finish(job.job_id, "done")
    fetched = session.result(job.job_id)
    assert fetched.glb == b"" and fetched.texture == png_bytes(8, 8) and fetched.meta["name"] == "red_cube"
    assert set(fetched.arrays) == {"vertices", "faces"}


def test_overall_progress_weights_the_stages_of_the_jobs_kind():
    from blender_addon.session import STAGE_WEIGHTS, JobView

    job = JobView("j", kind="text", state="running", stage="coarse", step=50, total=100)
    weights = STAGE_WEIGHTS["text"]
    assert job.fraction == 0.5
    assert job.overall == pytest.approx(0.5 * weights["coarse"] / sum(weights.values()))
    job.stage, job.step, job.total = "texture", 0, 1  # coarse, extract and refine are behind it
    assert job.overall == pytest.approx((weights["coarse"] + weights["extract"] + weights["refine"]) / sum(weights.values()))
    job.state = "done"
    assert job.overall == 1.0
    assert JobView("k", kind="refine", state="running", stage="queued").overall == 0.0


def test_submit_later_returns_at_once_and_the_job_arrives_with_drain(server, session):
    srv, _ = server
    pending = session.submit_later("text", name="a red cube", prompt="a red cube")
    pending.thread.join(10)
    (ended,) = session.finished()
    assert ended is pending and not ended.error and session.pending == []
    job = session.add_job(ended.outcome)
    assert srv.store.load_request(job.job_id)["prompt"] == "a red cube"


def test_a_stopped_engine_is_refused_at_once_with_the_fix_named(tmp_path):
    import socket
    import time

    from blender_addon.session import SessionError

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    key = tmp_path / "key"
    load_or_create_key(key)
    s = Session(f"tcp://127.0.0.1:{port}", str(key), timeout=5.0)
    try:
        start = time.monotonic()
        with pytest.raises(SessionError, match="engine-server serve.*Start Engine Automatically"):
            s.connect()
        assert time.monotonic() - start < 0.1
    finally:
        s.close()


def test_disconnect_behind_a_connect_to_a_hung_engine_returns_at_once(tmp_path):
    """A connect waiting on an engine that accepts connections but never answers holds the client for its timeout;
    the UI's Disconnect (close_later) must not wait for it, and the session still ends once it gives up."""
    import socket
    import time

    key = tmp_path / "key"
    load_or_create_key(key)
    with socket.socket() as silent:  # accepts TCP connections, never speaks ZMTP
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        s = Session(f"tcp://127.0.0.1:{silent.getsockname()[1]}", str(key), timeout=1.0)
        pending = s.connect_later()
        time.sleep(0.1)
        assert not pending.done  # still waiting on the hung engine
        start = time.monotonic()
        closer = s.close_later()
        assert time.monotonic() - start < 0.1
        closer.join(10)
        assert not closer.is_alive() and not pending.thread.is_alive()


def test_a_rig_jobs_object_is_centred_on_its_placement_and_others_rest_on_it():
    from blender_addon.session import JobView

    assert JobView("a").rests() and not JobView("a", kind="refine").rests()
    assert not JobView("a", rig_cameras=2).rests()
    assert not JobView("a").rests({"kind": "text", "rig_cameras": 3})  # a job another Blender submitted


def test_the_job_list_shows_the_node_a_cluster_engine_runs_each_job_on(tmp_path):
    load_or_create_key(tmp_path / "key")
    s = Session("tcp://127.0.0.1:1", str(tmp_path / "key"), state_dir=tmp_path / "addon")
    try:
        (running, done) = s.apply_listing([
            {"job_id": "j1", "state": "running", "kind": "text", "label": "a cube",
             "progress": {"stage": "coarse", "node": "gpu-box-2"}},
            {"job_id": "j2", "state": "done", "kind": "text", "progress": {"node": "gpu-box-1"}}])
        assert running.node == "gpu-box-2" and done.node == ""
    finally:
        s.close()


def test_the_reference_camera_sent_is_kept_with_the_job_and_said_in_a_few_words(server, session, tmp_path):
    _, key = server
    sent = {"source": "rig", "camera": "Camera", "elevation_deg": 35.0}
    job = session.submit("text", name="cube", prompt="a red cube", reference_camera=sent)
    assert job.camera_line() == "Reference camera: scene camera Camera, 35\u00b0 up"
    again = Session(session.endpoint, str(key), timeout=1.0, state_dir=tmp_path / "addon")  # the saved job list
    try:
        assert again.jobs[job.job_id].reference_camera == sent
    finally:
        again.close()
    job.reference_camera = {"source": "estimated", "elevation_deg": 19.6}  # what an estimate's meta says
    assert job.camera_line() == "Reference camera: estimated, 20\u00b0 up"
    job.reference_camera = None
    assert job.camera_line() == ""
