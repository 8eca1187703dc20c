"""blender_addon/glb.py reads the engine's GLB back into engine coordinates, UVs and texture PNG, without Blender."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from .conftest import ROOT  # noqa: F401  (puts the repo root on sys.path)

from blender_addon.glb import GLBError, blender_uvs, read_glb  # noqa: E402
from engine_server.export import export_glb  # noqa: E402


@pytest.fixture
def exported(tmp_path):
    rng = np.random.default_rng(0)
    vertices = rng.uniform(-0.5, 0.5, (40, 3)).astype(np.float32)
    faces = rng.integers(0, 40, (60, 3)).astype(np.int32)
    uvs = rng.uniform(0, 1, (40, 2)).astype(np.float32)
    texture = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)
    path = export_glb(tmp_path / "m.glb", vertices, faces, uvs, texture, name="thing")
    return vertices, faces, uvs, texture, path.read_bytes()


def test_glb_reads_back_engine_coordinates_uvs_and_texture(exported):
    vertices, faces, uvs, texture, data = exported
    mesh = read_glb(data)
    np.testing.assert_allclose(mesh.vertices, vertices, atol=1e-6)  # Z-up again, not glTF's Y-up
    np.testing.assert_array_equal(mesh.faces, faces)
    np.testing.assert_allclose(mesh.uvs, uvs, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(mesh.texture_png)).convert("RGB")), texture)
    assert mesh.name == "thing"


def test_blender_uvs_are_per_loop_with_v_flipped():
    uvs = np.array([[0.1, 0.2], [0.3, 0.9], [0.5, 0.0]], dtype=np.float32)
    loops = blender_uvs(uvs, np.array([[2, 0, 1]]))
    np.testing.assert_allclose(loops, [[0.5, 1.0], [0.1, 0.8], [0.3, 0.1]], atol=1e-6)


@pytest.mark.parametrize("data, message", [(b"nope", "shorter"), (b"glTF" + b"\x01\x00\x00\x00" + b"\x00" * 12, "2.0")])
def test_bad_glb_is_refused_with_a_reason(data, message):
    with pytest.raises(GLBError, match=message):
        read_glb(data)
