"""The wire format: encoding, every refusal naming its field, bounds, and no torch / numpy at import."""
from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine_server.wire import protocol
from engine_server.wire.auth import ReplayGuard, Signer
from engine_server.wire.protocol import Array, Blob, Image, Limits, ProtocolError, decode, encode, make

from .conftest import glb_bytes, png_bytes

SIGNER = Signer(b"0123456789abcdef0123456789abcdef")


def frames_of(header: dict, blobs=(), signer=SIGNER) -> list[bytes]:
    full = {"v": 1, "type": "ping", "id": protocol.new_id(), "parent": None, "ts": time.time(), "nonce": protocol.new_id()}
    full.update(header)
    head = json.dumps(full).encode()
    return [head, signer.sign([head, *blobs]), *blobs]


def refusal(frames, limits: Limits = protocol.DEFAULT_LIMITS, guard=None, from_client=True) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode(frames, SIGNER, guard or ReplayGuard(), limits, from_client=from_client)
    return info.value


def roundtrip(msg, from_client=True, limits=protocol.DEFAULT_LIMITS):
    frames = encode(msg, SIGNER)
    return decode(frames, SIGNER, ReplayGuard(), limits if from_client else protocol.RECEIVE_LIMITS, from_client=from_client)


def mesh_arrays(n_vertices=4, faces=((0, 1, 2), (0, 2, 3))):
    rng = np.random.default_rng(0)
    return {"vertices": rng.uniform(-0.5, 0.5, (n_vertices, 3)).astype(np.float32),
            "faces": np.asarray(faces, dtype=np.int32)}


CAMERA = {"matrix_world": np.eye(4).tolist(), "fov_y_deg": 49.1, "width": 128, "height": 96}


def test_submit_roundtrip_with_every_part():
    png = png_bytes(16, 12)
    mesh = mesh_arrays()
    msg = make("submit", request_id="req-1", kind="refine", prompt="a red chair", negative_prompt="blurry", seed=7,
               preset="draft", mode="texture", image=Image.from_png(png), rig=[CAMERA, CAMERA],
               mesh={**mesh, "matrix_world": np.eye(4).tolist()}, placement=np.eye(4).tolist(),
               options={"coarse_steps": 10, "texture_size": 256, "note": "x", "flag": True, "none": None})
    frames = encode(msg, SIGNER)
    assert len(frames) == 2 + 3  # header, signature, image + vertices + faces
    header = json.loads(frames[0])
    assert header["v"] == protocol.PROTOCOL_VERSION and header["id"] == msg.id and header["parent"] is None
    assert header["mesh"]["vertices"] == {"blob": 1, "dtype": "float32", "shape": [4, 3]}
    assert header["image"] == {"blob": 0, "format": "png"}
    out = decode(frames, SIGNER, ReplayGuard())
    assert (out.type, out.id, out.nonce) == ("submit", msg.id, msg.nonce)
    f = out.fields
    assert f["prompt"] == "a red chair" and f["seed"] == 7 and f["mode"] == "texture" and f["subscribe"] is True
    assert (f["image"].width, f["image"].height) == (16, 12) and bytes(f["image"].data) == png
    np.testing.assert_array_equal(f["mesh"]["vertices"].numpy(), mesh["vertices"])
    np.testing.assert_array_equal(f["mesh"]["faces"].numpy(), mesh["faces"])
    assert f["rig"][1]["fov_y_deg"] == pytest.approx(49.1) and f["rig"][0]["width"] == 128
    assert f["options"] == {"coarse_steps": 10, "texture_size": 256, "note": "x", "flag": True, "none": None}


def test_defaults_filled_in():
    out = roundtrip(make("submit", request_id="r", kind="text", prompt="a cube"))
    assert out.fields["negative_prompt"] == "" and out.fields["options"] == {} and out.fields["seed"] is None
    # preset and mode are left out when absent: the engine's default preset applies, and only refine reads a mode
    assert not {"preset", "mode", "mesh", "image", "rig", "placement"} & set(out.fields)


@pytest.mark.parametrize("dtype", sorted(protocol.DTYPES))
def test_arrays_every_dtype_any_byte_order(dtype):
    rng = np.random.default_rng(1)
    a = (rng.uniform(-100, 100, (5, 3)) if dtype.startswith("float") else rng.integers(0, 100, (5, 3))).astype(dtype)
    for variant in (a, a.astype(a.dtype.newbyteorder(">")), np.asfortranarray(a), a[::2]):
        arr = Array.from_numpy(variant)
        assert arr.dtype == dtype and arr.shape == variant.shape
        back = roundtrip(make("result", job_id="0123456789abcdef", arrays={"x": arr}), from_client=False)
        np.testing.assert_array_equal(back.fields["arrays"]["x"].numpy(), variant)
    assert Array.from_values(dtype, (2, 2), [1, 2, 3, 4]).values() == [1, 2, 3, 4]


def test_array_refuses_unlisted_dtype():
    with pytest.raises(ValueError, match="cannot travel"):
        Array.from_numpy(np.zeros(3, dtype=np.complex64))
    with pytest.raises(ValueError, match="needs"):
        Array("float32", (2, 3), b"\x00" * 20)


def test_every_server_message_roundtrips():
    job = "0123456789abcdef"
    msgs = [
        make("welcome", "p1", server="s", versions=[1], models=["bundled"], presets=["draft"], device="cpu",
             heartbeat_s=1.0, signature="hmac-sha256", session="abc", limits=Limits().to_dict(), capabilities={"x": 1}),
        make("pong", "p1", server_ts=1.0, jobs_running=0, session="abc"),
        make("accepted", "p1", job_id=job, request_id="r", state="queued", duplicate=True, queue_position=0),
        make("busy", "p1", queued=3, max_queued=3, retry_after_s=5.0),
        make("ok", "p1", job_id=job, state="running", job={"job_id": job, "state": "running"}),
        make("job_list", "p1", jobs=[{"job_id": job, "state": "done", "label": "x"}]),
        make("result", "p1", job_id=job, glb=Blob(glb_bytes(8)), arrays=mesh_arrays(), meta={"steps": 3},
             texture=Image.from_png(png_bytes())),
        make("error", "p1", code="invalid", message="bad", field="prompt"),
        make("progress", job_id=job, stage="coarse", step=3, total=10, loss=0.5, eta_s=2.0),
        make("preview", job_id=job, stage="coarse", step=3, image=Image.from_png(png_bytes())),
        make("mesh", job_id=job, uvs=np.zeros((4, 2), np.float32),
             texture=Image.from_png(png_bytes()), **mesh_arrays()),
        make("done", job_id=job, summary={"faces": 2}),
        make("failed", job_id=job, code="non_finite", message="loss became NaN"),
        make("cancelled", job_id=job),
    ]
    assert {m.type for m in msgs} == set(protocol.SERVER_TYPES)
    for m in msgs:
        out = roundtrip(m, from_client=False)
        assert out.type == m.type and out.parent == m.parent and out.id == m.id
        for k, v in m.fields.items():
            if isinstance(v, (str, int, float, bool)):
                assert out.fields[k] == v, (m.type, k)
    res = roundtrip(msgs[6], from_client=False)
    assert bytes(res["glb"].data) == glb_bytes(8)
    np.testing.assert_array_equal(res["arrays"]["faces"].numpy(), mesh_arrays()["faces"])


def test_server_messages_tolerate_new_fields_client_messages_do_not():
    assert roundtrip(make("pong", "p", future_field=1), from_client=False).type == "pong"
    e = refusal(frames_of({"type": "ping", "future_field": 1}))
    assert (e.code, e.field) == ("invalid", "future_field")


def _ihdr_png(width: int, height: int, crc_ok: bool = True) -> bytes:
    body = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    crc = zlib.crc32(body) ^ (0 if crc_ok else 1)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + body + struct.pack(">I", crc) + b"\x00" * 12


def test_png_header_checks_without_decoding():
    assert protocol.png_size(png_bytes(31, 17)) == (31, 17)
    assert protocol.png_size(_ihdr_png(100000, 3)) == (100000, 3)  # size read, nothing decoded
    for bad, match in ((b"GIF89a" + b"\x00" * 40, "signature"), (_ihdr_png(4, 4, crc_ok=False), "CRC"),
                       (_ihdr_png(0, 4), "invalid size"), (png_bytes()[:20], "signature")):
        with pytest.raises(ValueError, match=match):
            protocol.png_size(bad)


SMALL = Limits(max_prompt_chars=20, max_cameras=2, max_mesh_vertices=10, max_mesh_faces=10, max_image_pixels=1000,
               max_image_side=100, max_image_bytes=5000, max_options=2, max_blobs=4, max_header_bytes=4096,
               max_message_bytes=200_000, max_camera_side=256)


def _submit(**fields) -> dict:
    base = {"type": "submit", "request_id": "r1", "kind": "text", "prompt": "a cube"}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


def _mesh_blobs(vertices, faces):
    v, f = np.asarray(vertices, np.float32), np.asarray(faces, np.int32)
    ref = {"vertices": {"blob": 0, "dtype": "float32", "shape": list(v.shape)},
           "faces": {"blob": 1, "dtype": "int32", "shape": list(f.shape)}}
    return ref, [v.tobytes(), f.tobytes()]


TRI = ([[0, 0, 0], [1, 0, 0], [0, 1, 0]], [[0, 1, 2]])


@pytest.mark.parametrize("header,blobs,code,field", [
    ({"type": "pingg"}, [], "unknown_type", "type"),
    ({"type": "welcome"}, [], "unknown_type", "type"),  # a server type sent to the server
    ({"v": 2}, [], "version", "v"),
    ({"v": "1"}, [], "version", "v"),
    ({"id": ""}, [], "malformed", "id"),
    ({"id": "x" * 65}, [], "malformed", "id"),
    ({"ts": "now"}, [], "malformed", "ts"),
    ({"nonce": "short"}, [], "malformed", "nonce"),
    ({"parent": 5}, [], "malformed", "parent"),
    ({"ts": 1.0}, [], "replay", "ts"),
    (_submit(request_id=None), [], "invalid", "request_id"),
    (_submit(request_id="has space"), [], "invalid", "request_id"),
    (_submit(kind="video"), [], "invalid", "kind"),
    (_submit(prompt="x" * 21), [], "too_large", "prompt"),
    (_submit(negative_prompt="x" * 21), [], "too_large", "negative_prompt"),
    (_submit(prompt=5), [], "invalid", "prompt"),
    (_submit(prompt="a\x00b"), [], "invalid", "prompt"),
    (_submit(seed=-1), [], "invalid", "seed"),
    (_submit(seed=1.5), [], "invalid", "seed"),
    (_submit(subscribe="yes"), [], "invalid", "subscribe"),
    (_submit(preset="../etc"), [], "invalid", "preset"),
    (_submit(mode="all"), [], "invalid", "mode"),
    (_submit(colour="red"), [], "invalid", "colour"),
    (_submit(options={"a": 1, "b": 2, "c": 3}), [], "too_large", "options"),
    (_submit(options={"a": [1]}), [], "invalid", "options.a"),
    (_submit(options={"bad key": 1}), [], "invalid", "options.bad key"),
    (_submit(options=[1]), [], "invalid", "options"),
    (_submit(placement=[[1, 0, 0, 0]] * 3), [], "invalid", "placement"),
    (_submit(rig=[CAMERA] * 3), [], "too_large", "rig"),
    (_submit(rig=[CAMERA, {**CAMERA, "fov_y_deg": 0}]), [], "invalid", "rig[1].fov_y_deg"),
    (_submit(rig=[{**CAMERA, "width": 257}]), [], "invalid", "rig[0].width"),
    (_submit(rig=[{**CAMERA, "matrix_world": [[1, 0, 0, 0]] * 3 + [[0, 0, 0, "1"]]}]), [], "invalid", "rig[0].matrix_world[3][3]"),
    (_submit(rig=[{**CAMERA, "lens": 50}]), [], "invalid", "rig[0].lens"),
    (_submit(rig=[{k: v for k, v in CAMERA.items() if k != "height"}]), [], "invalid", "rig[0].height"),
    (_submit(rig="cam"), [], "invalid", "rig"),
    (_submit(image={"blob": 0, "format": "png"}), [b"not a png at all, no no no no no no"], "invalid", "image"),
    (_submit(image={"blob": 0, "format": "png"}), [_ihdr_png(200, 2)], "too_large", "image"),
    (_submit(image={"blob": 0, "format": "png"}), [_ihdr_png(40, 40)], "too_large", "image"),
    (_submit(image={"blob": 0, "format": "gif"}), [b"x"], "invalid", "image"),
    (_submit(image={"blob": 1, "format": "png"}), [b"x"], "malformed", "image"),
    (_submit(image={"blob": "0", "format": "png"}), [b"x"], "malformed", "image"),
    (_submit(image={"blob": 0}), [b"x"], "malformed", "image"),
    (_submit(), [b"stray"], "malformed", "blobs"),
    (_submit(kind="image", image={"blob": 0, "dtype": "float32", "shape": [1]}), [b"\x00" * 4], "invalid", "image"),
    (_submit(mesh={"vertices": {"blob": 0, "dtype": "float32", "shape": [3, 3]},
                   "faces": {"blob": 0, "dtype": "int32", "shape": [1, 3]}}), [b"\x00" * 36], "malformed", "mesh.faces"),
    (_submit(mesh={"vertices": {"blob": 0, "dtype": "float32", "shape": [4, 3]}}), [b"\x00" * 36], "invalid", "mesh.vertices"),
    (_submit(mesh={"vertices": {"blob": 0, "dtype": "complex64", "shape": [3, 3]}}), [b"\x00" * 72], "invalid", "mesh.vertices"),
    (_submit(mesh={"vertices": {"blob": 0, "dtype": "float32", "shape": [-3, 3]}}), [b""], "invalid", "mesh.vertices"),
    (_submit(mesh={"vertices": {"blob": 0, "dtype": "float32", "shape": [1, 1, 1, 1, 1]}}), [b"\x00" * 4], "invalid", "mesh.vertices"),
])
def test_refusals_name_the_field(header, blobs, code, field):
    frames = frames_of(header, blobs)
    e = refusal(frames, SMALL)
    assert (e.code, e.field) == (code, field), str(e)
    if field not in ("id", "v"):
        assert e.parent == json.loads(frames[0])["id"]  # the error reply is linked to the request
    reply = protocol.error_message(e)
    assert reply.type == "error" and reply["field"] == field and reply.parent == e.parent


def _mesh_submit(vertices, faces, vdtype=np.float32, fdtype=np.int32):
    v, f = np.asarray(vertices, vdtype), np.asarray(faces, fdtype)
    return frames_of(_submit(kind="refine", mesh={
        "vertices": {"blob": 0, "dtype": np.dtype(vdtype).name, "shape": list(v.shape)},
        "faces": {"blob": 1, "dtype": np.dtype(fdtype).name, "shape": list(f.shape)}}), [v.tobytes(), f.tobytes()])


@pytest.mark.parametrize("vertices,faces,vdtype,fdtype,code,field", [
    (TRI[0], [[0, 1, 3]], np.float32, np.int32, "invalid", "mesh.faces"),
    (TRI[0], [[0, -1, 2]], np.float32, np.int32, "invalid", "mesh.faces"),
    ([[0, 0, math.nan]] + TRI[0][1:], TRI[1], np.float32, np.int32, "invalid", "mesh.vertices"),
    ([[0, 0, 0]] * 11, TRI[1], np.float32, np.int32, "too_large", "mesh.vertices"),
    (TRI[0], TRI[1] * 11, np.float32, np.int32, "too_large", "mesh.faces"),
    (TRI[0], TRI[1], np.float64, np.int32, "invalid", "mesh.vertices"),
    (TRI[0], TRI[1], np.float32, np.int64, "invalid", "mesh.faces"),
    (TRI[0][:2], [[0, 1, 1]], np.float32, np.int32, "invalid", "mesh"),
    ([[0, 0], [1, 0], [0, 1]], TRI[1], np.float32, np.int32, "invalid", "mesh.vertices"),
])
def test_mesh_refusals(vertices, faces, vdtype, fdtype, code, field):
    e = refusal(_mesh_submit(vertices, faces, vdtype, fdtype), SMALL)
    assert (e.code, e.field) == (code, field), str(e)


def test_mesh_accepted_at_the_bound():
    out = decode(_mesh_submit([[0, 0, 0]] * 10, TRI[1] * 10), SIGNER, ReplayGuard(), SMALL)
    assert out["mesh"]["vertices"].shape == (10, 3) and out["mesh"]["faces"].shape == (10, 3)


@pytest.mark.parametrize("frames,code,field", [
    ([b"{}"], "malformed", "frames"),
    ([b"{}", b"", *[b"x"] * 5], "too_large", "blobs"),
    ([b" " * 5000, b""], "too_large", "header"),
    ([b"{}", b"", b"x" * 300_000], "too_large", "frames"),
])
def test_envelope_refusals(frames, code, field):
    e = refusal(frames, SMALL)
    assert (e.code, e.field) == (code, field)


def test_signature_checked_before_parsing():
    frames = frames_of({"type": "ping"})
    e = refusal([frames[0], b""])
    assert (e.code, e.field, e.parent) == ("auth", "signature", None)
    e = refusal([frames[0], Signer(b"x" * 32).sign([frames[0]])])
    assert (e.code, e.field) == ("auth", "signature")
    e = refusal([b"\xff not json", b""])  # unsigned garbage: refused for the signature, never parsed
    assert e.code == "auth"
    tampered = frames_of({"type": "submit", "request_id": "r", "kind": "text", "prompt": "a cube"})
    tampered[0] = tampered[0].replace(b"a cube", b"a cone")
    assert refusal(tampered).code == "auth"


@pytest.mark.parametrize("head,match", [
    (b"\xff\xfe", "UTF-8"),
    (b'{"v": 1, "v": 1}', "duplicate"),
    (b'{"v": NaN}', "NaN"),
    (b'{"v": 1e999}', "overflows"),
    (b"[" * 100_000 + b"]" * 100_000, ""),
    (b"[1, 2]", "JSON object"),
    (b'"just a string"', "JSON object"),
    ("{\"v\": \"\u00e9\"".encode("utf-16"), ""),
])
def test_bad_json_is_malformed(head, match):
    e = refusal([head, SIGNER.sign([head])], Limits(max_header_bytes=1_000_000))
    assert (e.code, e.field) == ("malformed", "header") and match in e.message


def test_replayed_message_refused():
    guard = ReplayGuard()
    frames = encode(make("ping"), SIGNER)
    decode(frames, SIGNER, guard)
    e = refusal(frames, guard=guard)
    assert (e.code, e.field) == ("replay", "nonce")


def test_client_side_check_matches_server():
    with pytest.raises(ProtocolError) as info:
        protocol.check_fields("submit", {"request_id": "r", "kind": "text", "prompt": "x" * 21}, SMALL)
    assert (info.value.code, info.value.field) == ("too_large", "prompt")
    with pytest.raises(ProtocolError) as info:
        protocol.check_fields("submit", {"request_id": "r", "kind": "refine", "prompt": "p",
                                         "mesh": mesh_arrays(faces=[(0, 1, 9)])})
    assert info.value.field == "mesh.faces"
    with pytest.raises(ProtocolError) as info:
        protocol.check_fields("submit", {"request_id": "r", "kind": "text", "prompt": "p", "options": {"blob": 1}})
    assert info.value.code == "invalid"
    ok = protocol.check_fields("submit", {"request_id": "r", "kind": "refine", "prompt": "p", "mesh": mesh_arrays()})
    assert ok["mesh"]["faces"].shape == (2, 3)


def test_encode_refuses_what_json_cannot_carry():
    with pytest.raises(ValueError, match="non-finite"):
        encode(make("progress", job_id="0123456789abcdef", loss=math.nan), SIGNER)
    with pytest.raises(ValueError, match="reserved"):
        encode(make("ok", nonce_x=1, **{"ts": 5}), SIGNER)


# ----------------------------------------------------------------------------- property-based

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)
_keys = st.sampled_from(["type", "request_id", "kind", "prompt", "seed", "rig", "mesh", "image", "options", "job_id",
                         "state", "limit", "v", "id", "nonce", "ts", "parent", "blob", "dtype", "shape", "format"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.lists(st.binary(max_size=200), min_size=0, max_size=6))
def test_random_frames_only_raise_protocol_errors(frames):
    try:
        decode(frames, SIGNER, ReplayGuard())
    except ProtocolError as e:
        assert e.code and e.message
    try:
        decode(frames, Signer(None), ReplayGuard())
    except ProtocolError as e:
        assert e.code and e.message


@pytest.mark.slow  # ~4 s on 2 busy cores
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mtype=st.sampled_from(protocol.CLIENT_TYPES + ("nope",)), extra=st.dictionaries(_keys, _json, max_size=6),
       blobs=st.lists(st.binary(max_size=64), max_size=3), from_client=st.booleans())
def test_signed_random_headers_only_raise_protocol_errors(mtype, extra, blobs, from_client):
    header = {"type": mtype, **extra}
    try:
        msg = decode(frames_of(header, blobs), SIGNER, ReplayGuard(), from_client=from_client)
    except ProtocolError as e:
        assert e.code in ("malformed", "auth", "replay", "version", "unknown_type", "invalid", "too_large")
        return
    assert msg.type in (protocol.CLIENT_TYPES if from_client else protocol.SERVER_TYPES)


# ----------------------------------------------------------------------------- imports

def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_protocol_and_client_import_no_torch_bpy_numpy():
    r = _run("import sys, engine_server.wire.protocol, engine_server.wire.auth, engine_server.wire.client, engine_server.service.jobs, "
             "engine_server.service.server, engine_server.pipelines.events\n"
             "bad = [m for m in ('torch', 'bpy', 'numpy') if m in sys.modules]\n"
             "assert not bad, bad\nprint('ok')")
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_protocol_works_without_numpy():
    r = _run("import sys; sys.modules['numpy'] = None\n"
             "from engine_server.wire import protocol as P\nfrom engine_server.wire.auth import Signer, ReplayGuard\n"
             "s = Signer(b'k' * 32)\n"
             "v = P.Array.from_values('float32', (3, 3), [0, 0, 0, 1, 0, 0, 0, 1, 0])\n"
             "f = P.Array.from_values('int32', (1, 3), [0, 1, 2])\n"
             "m = P.make('submit', request_id='r', kind='refine', prompt='p', mesh={'vertices': v, 'faces': f})\n"
             "out = P.decode(P.encode(m, s), s, ReplayGuard())\n"
             "assert out['mesh']['faces'].values() == [0, 1, 2]\n"
             "bad = P.Array.from_values('int32', (1, 3), [0, 1, 3])\n"
             "m = P.make('submit', request_id='r', kind='refine', prompt='p', mesh={'vertices': v, 'faces': bad})\n"
             "try:\n    P.decode(P.encode(m, s), s, ReplayGuard())\nexcept P.ProtocolError as e:\n    print(e.field)\n")
    assert r.returncode == 0 and r.stdout.strip() == "mesh.faces", r.stderr


# ----------------------------------------------------------------------------- inputs that once ended the server

_HUGE = "1" + "0" * 400  # 10**400: no float holds it


@pytest.mark.parametrize("head, field", [
    ('{"v":1,"type":"ping","id":"a1","parent":null,"ts":%s,"nonce":"%s"}' % (_HUGE, "ab" * 16), "ts"),
    ('{"v":1,"type":"submit","id":"a1","parent":null,"ts":%%s,"nonce":"%s","request_id":"r","kind":"text",'
     '"prompt":"a","placement":[[1,0,0,0],[0,%s,0,0],[0,0,1,0],[0,0,0,1]]}' % ("cd" * 16, _HUGE), "placement[1][1]"),
    ('{"v":1,"type":"submit","id":"a1","parent":null,"ts":%%s,"nonce":"%s","request_id":"r","kind":"text",'
     '"prompt":"a","rig":[{"matrix_world":[[1,0,0,0],[0,1,0,0],[0,0,1,0],[0,0,0,1]],"fov_y_deg":%s,"width":8,'
     '"height":8}]}' % ("ef" * 16, _HUGE), "rig[0].fov_y_deg"),
    ('{"v":1,"type":"ping","id":"a1","parent":null,"ts":%%s,"nonce":"%s","\\udc80":1}' % ("01" * 16), "\\udc80"),
    ('{"v":1,"type":"submit","id":"a1","parent":null,"ts":%%s,"nonce":"%s","request_id":"r","kind":"text",'
     '"prompt":"a \\ud800 cube"}' % ("23" * 16), "prompt"),
    ('{"v":1,"type":"ping","id":"a1","parent":null,"ts":%%s,"nonce":"%s","x":%s}' % ("45" * 16, "[" * 600 + "]" * 600),
     "x" + "[0]" * 31),
])
def test_huge_numbers_lone_surrogates_and_deep_nesting_are_refused_naming_the_field(head, field):
    if "%s" in head:
        head = head % time.time()
    head = head.encode()
    err = refusal([head, SIGNER.sign([head])], Limits(max_header_bytes=2**20))
    assert (err.code, err.field) == ("invalid", field), (err.code, err.field, err.message)
    assert err.parent == "a1"
    frames = encode(protocol.error_message(err), SIGNER)  # the reply is always encodable
    assert decode(frames, SIGNER, ReplayGuard(), protocol.RECEIVE_LIMITS, from_client=False)["field"] == field


def test_json_too_deep_for_the_parser_is_malformed():
    head = ('{"v":1,"type":"ping","id":"a1","parent":null,"ts":%s,"nonce":"%s","x":%s}'
            % (time.time(), "67" * 16, "[" * 100_000 + "]" * 100_000)).encode()
    err = refusal([head, SIGNER.sign([head])], Limits(max_header_bytes=2**20))
    assert (err.code, err.field) == ("malformed", "header")


def test_client_side_check_refuses_huge_numbers_and_surrogates_too():
    with pytest.raises(ProtocolError) as info:
        protocol.check_fields("submit", {"request_id": "r", "kind": "text", "prompt": "a",
                                         "placement": [[10**400, 0, 0, 0]] + np.eye(4).tolist()[1:]})
    assert info.value.field == "placement[0][0]"
    with pytest.raises(ProtocolError) as info:
        protocol.check_fields("submit", {"request_id": "r", "kind": "text", "prompt": "\udc80"})
    assert info.value.field == "prompt"


def test_error_text_quoting_the_input_is_always_encodable():
    err = ProtocolError("invalid", "bad value \udc80" + "x" * 5000, "a.\udcff" + "y" * 1000)
    assert len(err.message) <= 1024 and len(err.field) <= 256 and "\\udc80" in err.message
    encode(protocol.error_message(err), SIGNER)


@pytest.mark.parametrize(("options", "field", "match"), [
    ({"format": "fbx"}, "options.format", "glb, obj, usd, usdz"),
    ({"format": 1}, "options.format", "glb, obj, usd, usdz"),
    ({"faces": 99}, "options.faces", "100 to 2,000,000"),
    ({"faces": 2_000_001}, "options.faces", "100 to 2,000,000"),
    ({"faces": 5000.0}, "options.faces", "integer"),
    ({"faces": True}, "options.faces", "integer"),
    ({"texture_size": 8}, "options.texture_size", "16 to 8,192"),
    ({"texture_size": 16384}, "options.texture_size", "16 to 8,192"),
])
def test_export_options_are_bounded_at_submit(options, field, match):
    with pytest.raises(ProtocolError, match=match) as info:
        protocol.check_fields("submit", {"request_id": "r", "kind": "text", "prompt": "p", "options": options})
    assert (info.value.code, info.value.field) == ("invalid", field)


def test_export_options_at_their_bounds_pass():
    for options in ({"format": f} for f in protocol.EXPORT_FORMATS):
        assert protocol.check_fields("submit", {"request_id": "r", "kind": "text", "prompt": "p",
                                                "options": options})["options"] == options
    options = {"faces": 100, "texture_size": 8192}
    assert protocol.check_fields("submit", {"request_id": "r", "kind": "refine", "prompt": "p", "mesh": mesh_arrays(),
                                            "options": options})["options"] == options


def test_result_carries_the_normal_map_and_the_export_files():
    job = "0123456789abcdef"
    files = {"model.obj": Blob(b"v 0 0 0\n", "file"), "model_normal.png": Blob(png_bytes(), "file")}
    msg = make("result", "p1", job_id=job, glb=Blob(glb_bytes(8)), arrays=mesh_arrays(), meta={"export": {"format": "obj"}},
               texture=Image.from_png(png_bytes()), normal_texture=Image.from_png(png_bytes(4, 4)), files=files)
    res = roundtrip(msg, from_client=False)
    assert bytes(res["normal_texture"].data) == png_bytes(4, 4)
    assert {k: bytes(v.data) for k, v in res["files"].items()} == {k: bytes(v.data) for k, v in files.items()}
    for bad, field in (({"../x.obj": Blob(b"", "file")}, "files.../x.obj"),
                       ({"model.glb": Blob(glb_bytes(8))}, "files.model.glb")):
        with pytest.raises(ProtocolError) as info:
            roundtrip(make("result", "p1", job_id=job, files=bad), from_client=False)
        assert info.value.field == field
