"""The kind table: one submit contract per kind, checked by the server; rig cameras relative to the placement."""
from __future__ import annotations

import numpy as np
import pytest

from engine_server.pipelines.kinds import COMMON_FIELDS, KINDS, check_submit, relative_rig
from engine_server.pipelines.presets import DEFAULT_PRESET, PRESETS
from engine_server.service.server import ServerConfig
from engine_server.wire import protocol
from engine_server.wire.client import RequestError

from .conftest import png_bytes

CAMERA = {"fov_y_deg": 40.0, "width": 64, "height": 48}


def _mesh():
    rng = np.random.default_rng(0)
    return {"vertices": rng.uniform(-1, 1, (30, 3)).astype(np.float32),
            "faces": rng.integers(0, 30, (40, 3)).astype(np.int32)}


def test_the_table_covers_the_wire_kinds_and_names_only_wire_fields():
    assert set(KINDS) == set(protocol.KINDS)
    every = {"request_id", "kind", "prompt", "negative_prompt", "seed", "preset", "mode", "subscribe", "options",
             "image", "placement", "rig", "mesh"}  # the fields _check_submit defines
    for kind in KINDS.values():
        assert set(COMMON_FIELDS + kind.fields) <= every, kind.name
        assert {f for group in kind.needs for f in group} <= set(COMMON_FIELDS + kind.fields), kind.name
        assert kind.steps_option in ("coarse_steps", "refine_steps")


@pytest.mark.parametrize("fields, field, words", [
    ({"kind": "refine", "prompt": "p", "mesh": "m", "image": "png"}, "image", "refine job does not use image"),
    ({"kind": "refine", "prompt": "p", "mesh": "m", "rig": []}, "rig", "refine job does not use rig"),
    ({"kind": "text", "prompt": "p", "mode": "texture"}, "mode", "text job does not use mode"),
    ({"kind": "text", "prompt": "p", "mesh": "m"}, "mesh", "text job does not use mesh"),
    ({"kind": "text", "prompt": "  "}, "prompt", "needs a non-empty prompt"),
    ({"kind": "image", "prompt": "p"}, "image", "needs a image"),
    ({"kind": "multiview", "prompt": ""}, "prompt", "a non-empty prompt or a image"),
    ({"kind": "refine", "prompt": "p"}, "mesh", "needs a mesh"),
    ({"kind": "refine", "prompt": " ", "mesh": "m"}, "prompt", "needs a non-empty prompt"),
])
def test_a_field_the_kind_does_not_read_or_lacks_is_refused_naming_it(fields, field, words):
    with pytest.raises(protocol.ProtocolError) as info:
        check_submit(fields)
    assert info.value.field == field and words in info.value.message


def test_server_refuses_refine_image_and_rig_and_takes_presets_from_the_engine(make_server, make_client):
    assert ServerConfig().presets == tuple(PRESETS)
    server = make_server()
    client = make_client(server.endpoint)
    assert client.hello()["presets"] == list(PRESETS)
    mesh = _mesh()
    for extra, field in (({"image": png_bytes(20, 10)}, "image"),
                         ({"rig": [{**CAMERA, "matrix_world": np.eye(4)}]}, "rig")):
        with pytest.raises(RequestError) as info:
            client.submit("refine", "make it wooden", mesh=mesh, **extra)
        assert info.value.field == field and "refine job does not use" in info.value.message
    assert client.jobs() == []  # nothing was stored
    job = client.submit("text", "a red cube")  # no preset: stored without one, the runner uses the default
    assert "preset" not in server.store.load_request(job) and DEFAULT_PRESET in PRESETS


def test_rig_cameras_are_taken_relative_to_the_placement():
    placement = np.eye(4)
    placement[:3, :3] = [[0, -1, 0], [1, 0, 0], [0, 0, 1]]  # the cursor turned 90 degrees about Z ...
    placement[:3, 3] = (2.0, 0.0, 0.0)  # ... at x = 2
    camera = np.eye(4)
    camera[:3, 3] = (2.0, -3.0, 1.0)  # three units in front of the cursor (world -Y), one up
    (rel,) = relative_rig([{**CAMERA, "matrix_world": camera.tolist()}], placement.tolist())
    m = np.asarray(rel["matrix_world"])
    np.testing.assert_allclose(m[:3, 3], (-3.0, 0.0, 1.0), atol=1e-12)  # in the cursor's frame: its -X
    np.testing.assert_allclose(placement @ m, camera, atol=1e-12)
    assert rel["fov_y_deg"] == 40.0 and rel["width"] == 64
    (same,) = relative_rig([{**CAMERA, "matrix_world": camera.tolist()}], None)
    assert same["matrix_world"] == camera.tolist()
