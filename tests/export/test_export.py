"""GLB export: the file's raw contents against the glTF spec, round trips, sidecar, errors."""
from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from engine_server.export import (
    ENGINE_TO_GLTF,
    MaterialParams,
    engine_to_gltf,
    export_glb,
    gltf_to_engine,
    load_glb,
    object_name,
    sidecar_path,
    smooth_normals,
)
from engine_server.texture import unwrap

_COMPONENT = {5121: np.uint8, 5123: np.uint16, 5125: np.uint32, 5126: np.float32}
_WIDTH = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4}


def read_glb(path: Path) -> tuple[dict, bytes]:
    """Split a GLB into its JSON chunk and its BIN chunk, checking the container layout."""
    data = path.read_bytes()
    magic, version, length = struct.unpack_from("<4sII", data, 0)
    assert magic == b"glTF" and version == 2 and length == len(data)
    json_len, json_type = struct.unpack_from("<I4s", data, 12)
    assert json_type == b"JSON" and json_len % 4 == 0
    tree = json.loads(data[20 : 20 + json_len])
    bin_len, bin_type = struct.unpack_from("<I4s", data, 20 + json_len)
    assert bin_type == b"BIN\x00"
    start = 28 + json_len
    return tree, data[start : start + bin_len]


def accessor(tree: dict, blob: bytes, index: int) -> np.ndarray:
    acc = tree["accessors"][index]
    view = tree["bufferViews"][acc["bufferView"]]
    dtype = np.dtype(_COMPONENT[acc["componentType"]]).newbyteorder("<")
    width = _WIDTH[acc["type"]]
    assert "byteStride" not in view
    offset = view.get("byteOffset", 0) + acc.get("byteOffset", 0)
    arr = np.frombuffer(blob, dtype=dtype, count=acc["count"] * width, offset=offset)
    return arr.reshape(acc["count"], width) if width > 1 else arr


def test_coordinate_maps_are_inverse_rotations():
    p = np.random.default_rng(0).normal(size=(10, 3))
    np.testing.assert_allclose(gltf_to_engine(engine_to_gltf(p)), p)
    np.testing.assert_allclose(engine_to_gltf(p), p @ ENGINE_TO_GLTF.T)
    assert np.linalg.det(ENGINE_TO_GLTF) == pytest.approx(1.0)
    # Blender up (+Z) is glTF up (+Y); Blender front (-Y, the front view's camera side) is glTF +Z
    np.testing.assert_allclose(engine_to_gltf(np.array([0.0, 0.0, 1.0])), [0.0, 1.0, 0.0])
    np.testing.assert_allclose(engine_to_gltf(np.array([0.0, -1.0, 0.0])), [0.0, 0.0, 1.0])


def test_glb_contents_follow_the_gltf_spec(textured, tmp_path):
    m = textured.mesh
    path = export_glb(tmp_path / "obj.glb", m.vertices, m.faces, m.uvs, textured.texture,
                      MaterialParams(roughness=0.9), name="thing")
    tree, blob = read_glb(path)
    prim = tree["meshes"][0]["primitives"][0]
    assert tree["nodes"][0]["name"] == "thing" and prim["mode"] == 4
    pos = accessor(tree, blob, prim["attributes"]["POSITION"])
    assert pos.dtype == np.float32
    np.testing.assert_allclose(pos, engine_to_gltf(m.vertices), atol=1e-7)  # Y-up in the file
    acc_pos = tree["accessors"][prim["attributes"]["POSITION"]]
    np.testing.assert_allclose(acc_pos["min"], pos.min(0))
    np.testing.assert_allclose(acc_pos["max"], pos.max(0))
    idx = accessor(tree, blob, prim["indices"])
    assert idx.dtype == np.uint32
    np.testing.assert_array_equal(idx.reshape(-1, 3), m.faces)
    # TEXCOORD_0 holds our UVs unchanged: both use glTF's top-left origin
    np.testing.assert_allclose(accessor(tree, blob, prim["attributes"]["TEXCOORD_0"]), m.uvs, atol=1e-7)
    normals = accessor(tree, blob, prim["attributes"]["NORMAL"])
    np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(normals, engine_to_gltf(smooth_normals(m.vertices, m.faces)), atol=1e-6)
    # outward: the normal points away from the ellipsoid's centre
    centre = engine_to_gltf(m.vertices.mean(0))
    assert ((normals * (pos - centre)).sum(1) > 0).all()
    pbr = tree["materials"][prim["material"]]["pbrMetallicRoughness"]
    assert pbr["metallicFactor"] == 0.0 and pbr["roughnessFactor"] == pytest.approx(0.9)
    assert pbr.get("baseColorFactor", [1, 1, 1, 1]) == [1.0, 1.0, 1.0, 1.0]
    texture = tree["textures"][pbr["baseColorTexture"]["index"]]
    assert tree["samplers"][texture["sampler"]]["wrapS"] == 33071  # clamp to edge for an atlas
    image = tree["images"][texture["source"]]
    assert image["mimeType"] == "image/png"
    view = tree["bufferViews"][image["bufferView"]]
    png = blob[view.get("byteOffset", 0) : view.get("byteOffset", 0) + view["byteLength"]]
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), textured.texture)  # row 0 = top


def test_load_glb_round_trip(textured, tmp_path):
    m = textured.mesh
    path = export_glb(tmp_path / "rt.glb", torch.from_numpy(m.vertices), torch.from_numpy(m.faces), m.uvs, textured.texture)
    back = load_glb(path)
    vertices, faces, uvs, texture = back  # also a plain tuple
    assert vertices.shape == m.vertices.shape and faces.shape == m.faces.shape
    np.testing.assert_allclose(vertices, m.vertices, atol=1e-7)  # engine coordinates again
    np.testing.assert_array_equal(faces, m.faces)
    np.testing.assert_allclose(uvs, m.uvs, atol=1e-6)
    np.testing.assert_array_equal(texture, textured.texture)


def test_rgba_and_non_square_textures_round_trip(textured, tmp_path):
    m = textured.mesh
    tex = np.random.default_rng(0).integers(0, 256, size=(40, 72, 4), dtype=np.uint8)
    back = load_glb(export_glb(tmp_path / "rgba.glb", m.vertices, m.faces, m.uvs, tex))
    np.testing.assert_array_equal(back.texture, tex)


def test_smooth_normals_ignore_uv_seams():
    sphere = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    um = unwrap(sphere.vertices, sphere.faces)
    assert len(um.vertices) > len(sphere.vertices)  # seams were split
    n = smooth_normals(um.vertices, um.faces)
    radial = um.vertices / np.linalg.norm(um.vertices, axis=1, keepdims=True)
    assert (n * radial).sum(1).min() > 0.99
    # zero-area faces alone give a unit fallback, never NaN
    n = smooth_normals(np.zeros((3, 3)), np.array([[0, 1, 2]]))
    np.testing.assert_allclose(np.linalg.norm(n, axis=1), 1.0)


def test_given_normals_are_rotated_and_normalized(textured, tmp_path):
    m = textured.mesh
    up = np.tile([0.0, 0.0, 2.0], (len(m.vertices), 1))  # engine +Z, not unit length
    path = export_glb(tmp_path / "n.glb", m.vertices, m.faces, m.uvs, textured.texture, normals=up)
    tree, blob = read_glb(path)
    normals = accessor(tree, blob, tree["meshes"][0]["primitives"][0]["attributes"]["NORMAL"])
    np.testing.assert_allclose(normals, np.tile([0.0, 1.0, 0.0], (len(m.vertices), 1)), atol=1e-7)  # glTF +Y
    with pytest.raises(ValueError, match="zero-length"):
        export_glb(tmp_path / "z.glb", m.vertices, m.faces, m.uvs, textured.texture, normals=np.zeros_like(up))


def test_sidecar_is_written_beside_the_glb(textured, tmp_path):
    m = textured.mesh
    meta = {"prompt": "a red ellipsoid", "seed": 7, "preset": "draft", "model": "bundled",
            "guidance": {"mode": "sds", "scale": 7.5}, "timings": {"field": 1.5, "texture": 0.2}}
    path = export_glb(tmp_path / "model.glb", m.vertices, m.faces, m.uvs, textured.texture, sidecar=meta)
    side = sidecar_path(path)
    assert side == tmp_path / "model.json"
    data = json.loads(side.read_text())
    for key, value in meta.items():
        assert data[key] == value
    assert data["mesh"]["vertices"] == len(m.vertices) and data["mesh"]["faces"] == len(m.faces)
    assert data["mesh"]["texture_size"] == [128, 128] and data["mesh"]["files"] == {"model.glb": path.stat().st_size}
    np.testing.assert_allclose(data["mesh"]["bounds_min"], m.vertices.min(0), rtol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.glb", "model.json"]  # no temp files left


def test_export_overwrites_and_fails_without_partial_files(textured, tmp_path):
    m = textured.mesh
    path = tmp_path / "x.glb"
    path.write_bytes(b"old")
    export_glb(path, m.vertices, m.faces, m.uvs, textured.texture)
    assert path.read_bytes()[:4] == b"glTF"
    with pytest.raises(TypeError, match="JSON"):
        export_glb(tmp_path / "y.glb", m.vertices, m.faces, m.uvs, textured.texture, sidecar={"bad": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.glb"]


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"path": "model.gltf"}, ValueError, r"\.glb"),
        ({"texture": np.zeros((8, 8, 3), dtype=np.float32)}, TypeError, "uint8"),
        ({"texture": np.zeros((8, 8), dtype=np.uint8)}, ValueError, "base_color"),
        ({"uvs": np.zeros((3, 2))}, ValueError, "uvs"),
        ({"faces": np.array([[0, 1, 10_000]])}, ValueError, "faces"),
        ({"faces": np.array([[0.0, 1.0, 2.0]])}, TypeError, "integers"),
        ({"vertices": "nan"}, ValueError, "NaN"),
    ],
)
def test_export_rejects_bad_inputs(textured, tmp_path, change, error, match):
    m = textured.mesh
    args = {"path": "model.glb", "vertices": m.vertices, "faces": m.faces, "uvs": m.uvs, "texture": textured.texture}
    args.update(change)
    args["path"] = tmp_path / args["path"]
    if change.get("vertices") == "nan":
        args["vertices"] = np.full_like(m.vertices, np.nan)
    with pytest.raises(error, match=match):
        export_glb(**args)


def test_material_params_are_checked():
    with pytest.raises(ValueError, match="roughness"):
        MaterialParams(roughness=1.5)
    with pytest.raises(ValueError, match="base_color_factor"):
        MaterialParams(base_color_factor=(1.0, 1.0, 1.0))


def test_load_glb_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_glb(tmp_path / "missing.glb")


@pytest.mark.parametrize("prompt, name", [
    ("a red cube", "red_cube"), ("Torus, yellow.", "torus_yellow"), ("The RED pyramid!", "red_pyramid"),
    ("a low-poly chair", "low_poly_chair"), ("un cubo rojo", "un_cubo_rojo"), ("красный куб", "красный_куб"),
    ("...", "generated"),
])
def test_object_names_keep_the_prompts_words_and_drop_articles_and_punctuation(prompt, name):
    assert object_name(prompt) == name
