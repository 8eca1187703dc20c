"""Tangent frames and the normal-map bake, checked against Blender's own baker."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from engine_server.export import smooth_normals
from engine_server.geometry.surface import SurfaceProjector, decimate
from engine_server.texture import UnwrapConfig, unwrap
from engine_server.texture.bake import BakeConfig, bake_maps, rasterize_uv
from engine_server.texture.tangents import vertex_tangents

BLENDER_BAKE = Path(__file__).resolve().parent / "blender_normal_bake.py"


def _bumpy_sphere() -> tuple[np.ndarray, np.ndarray]:
    """A 20k-face sphere with bumps finer than a few-hundred-face mesh can follow."""
    ico = trimesh.creation.icosphere(subdivisions=5, radius=0.5)
    v = np.asarray(ico.vertices)
    d = v / np.linalg.norm(v, axis=1, keepdims=True)
    v = v * (1 + 0.03 * np.sin(14 * d[:, 0]) * np.sin(13 * d[:, 1] + 1) * np.cos(12 * d[:, 2]))[:, None]
    return v, np.asarray(ico.faces)


def _unit(rgb: np.ndarray) -> np.ndarray:
    n = rgb.astype(np.float64) / 255.0 * 2.0 - 1.0 if rgb.dtype == np.uint8 else rgb * 2.0 - 1.0
    return n / np.linalg.norm(n, axis=-1, keepdims=True)


def _flat_grey(p: torch.Tensor) -> torch.Tensor:
    return torch.full_like(p, 0.5)


def test_tangents_follow_u_and_blender_v_and_flag_mirrored_charts():
    v = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], dtype=np.float64)
    f = np.array([[0, 1, 2], [0, 2, 3]])
    n = np.tile([0.0, 0.0, 1.0], (4, 1))
    uv = np.array([[0, 1], [1, 1], [1, 0], [0, 0]], dtype=np.float64)  # glTF: v down, so Blender's v = y
    t = vertex_tangents(v, f, uv, n)
    assert np.allclose(t[:, :3], [1, 0, 0], atol=1e-6) and np.all(t[:, 3] == 1)
    mirrored = uv.copy()
    mirrored[:, 0] = 1 - mirrored[:, 0]  # u runs along -x: tangent -x, bitangent still +y, so w = -1
    t = vertex_tangents(v, f, mirrored, n)
    assert np.allclose(t[:, :3], [-1, 0, 0], atol=1e-6) and np.all(t[:, 3] == -1)
    with pytest.raises(ValueError, match="uvs and normals"):
        vertex_tangents(v, f, uv[:2], n)


def test_a_surface_baked_onto_itself_gives_a_flat_normal_map():
    v, f = _bumpy_sphere()
    low_v, low_f = decimate(v, f, 2000)
    uv_mesh = unwrap(low_v, low_f, UnwrapConfig(texture_size=128))
    maps = bake_maps(uv_mesh, _flat_grey, BakeConfig(size=128), surface=SurfaceProjector(low_v, low_f))
    inside = rasterize_uv(uv_mesh, 128, conservative=False).inside.numpy()
    z = _unit(maps.normal_map)[..., 2]
    assert np.degrees(np.arccos(np.clip(z[inside], -1, 1))).mean() < 1.0
    assert (maps.base_color == 128).all()


def test_normal_map_agrees_with_blenders_bake(tmp_path):
    """Blender (Cycles, selected to active, the low mesh carrying our normals as a glTF import
    would) bakes the same high surface onto the same UVs: the two maps must agree."""
    pytest.importorskip("bpy")
    v, f = _bumpy_sphere()
    low_v, low_f = decimate(v, f, 800)
    size = 128
    uv_mesh = unwrap(low_v, low_f, UnwrapConfig(texture_size=size))
    normals = smooth_normals(uv_mesh.vertices, uv_mesh.faces)
    mine = bake_maps(uv_mesh, _flat_grey, BakeConfig(size=size, supersample=1), surface=SurfaceProjector(v, f),
                     normals=normals).normal_map
    src, dst = tmp_path / "in.npz", tmp_path / "out.npy"
    np.savez(src, high_v=v, high_f=f, low_v=uv_mesh.vertices, low_f=uv_mesh.faces, low_uv=uv_mesh.uvs,
             low_n=normals, size=size)
    subprocess.run([sys.executable, str(BLENDER_BAKE), str(src), str(dst)], check=True, capture_output=True,
                   timeout=300)
    theirs = _unit(np.load(dst))
    ours = _unit(mine)
    inside = rasterize_uv(uv_mesh, size, conservative=False).inside.numpy()
    error = np.degrees(np.arccos(np.clip((theirs * ours).sum(-1), -1, 1)))[inside]
    detail = np.degrees(np.arccos(np.clip(ours[..., 2], -1, 1)))[inside]
    assert detail.mean() > 5.0  # the bumps are in the map, so agreeing is not trivial
    assert error.mean() < 2.0 and np.percentile(error, 95) < 5.0
