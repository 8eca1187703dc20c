"""Tangent frames for tangent-space normal maps, in the MikkTSpace convention Blender and glTF use.

A normal map texel stores the high-resolution normal in the low mesh's frame
(T, B, N): red along the tangent T (the direction of increasing u), green along the
bitangent B = w * (N x T) (increasing v *as Blender counts it*, bottom-up, i.e.
decreasing glTF v: "+Y green up", OpenGL style), blue along the normal N.
glTF renderers without stored tangents derive them with MikkTSpace from the normals
and UVs, and Blender bakes and shades with MikkTSpace, so the tangents here follow its
recipe: per-face tangents from the UV derivatives, normalised, projected onto each
corner's tangent plane, weighted by the corner angle and summed per vertex, then
orthonormalised against the vertex normal; the sign ``w`` says whether the UV chart is
mirrored. At bake (and shading) time T and N are interpolated over the triangle,
normalised, and B is rebuilt as w * (N x T).
"""
from __future__ import annotations

import numpy as np
import torch


def vertex_tangents(vertices: np.ndarray, faces: np.ndarray, uvs: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """(V, 4) float32 unit tangents (xyz) and bitangent signs (w = +-1) per vertex.

    vertices (V, 3), faces (F, 3), uvs (V, 2) glTF convention (top-left origin), normals (V, 3) unit.
    Vertices on UV seams must be split (one UV each), as :class:`~engine_server.texture.UVMesh` has them.
    """
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    uv = np.asarray(uvs, dtype=np.float64).copy()
    n = np.asarray(normals, dtype=np.float64)
    if uv.shape != (len(v), 2) or n.shape != (len(v), 3):
        raise ValueError(f"uvs and normals must be ({len(v)}, 2) and ({len(v)}, 3), got {uv.shape} and {n.shape}")
    uv[:, 1] = 1.0 - uv[:, 1]  # MikkTSpace's v runs bottom-up (Blender / OpenGL)
    p, t = v[f], uv[f]  # (F, 3, 3), (F, 3, 2)
    e1, e2 = p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]
    d1, d2 = t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]
    det = d1[:, 0] * d2[:, 1] - d2[:, 0] * d1[:, 1]
    ok = np.abs(det) > 1e-20
    inv = np.where(ok, 1.0 / np.where(ok, det, 1.0), 0.0)
    face_t = (e1 * d2[:, 1:2] - e2 * d1[:, 1:2]) * inv[:, None]
    face_b = (e2 * d1[:, 0:1] - e1 * d2[:, 0:1]) * inv[:, None]
    face_t /= np.maximum(np.linalg.norm(face_t, axis=1, keepdims=True), 1e-30)
    face_b /= np.maximum(np.linalg.norm(face_b, axis=1, keepdims=True), 1e-30)
    acc_t = np.zeros_like(v)
    acc_b = np.zeros_like(v)
    for k in range(3):
        a, b, c = p[:, k], p[:, (k + 1) % 3], p[:, (k + 2) % 3]
        u, w = b - a, c - a
        cos = np.einsum("ij,ij->i", u, w) / np.maximum(np.linalg.norm(u, axis=1) * np.linalg.norm(w, axis=1), 1e-30)
        angle = np.arccos(np.clip(cos, -1.0, 1.0))
        nk = n[f[:, k]]
        # Project onto the corner's tangent plane before summing (MikkTSpace does, per corner).
        tk = face_t - nk * np.einsum("ij,ij->i", face_t, nk)[:, None]
        bk = face_b - nk * np.einsum("ij,ij->i", face_b, nk)[:, None]
        tk /= np.maximum(np.linalg.norm(tk, axis=1, keepdims=True), 1e-30)
        bk /= np.maximum(np.linalg.norm(bk, axis=1, keepdims=True), 1e-30)
        np.add.at(acc_t, f[:, k], tk * angle[:, None])
        np.add.at(acc_b, f[:, k], bk * angle[:, None])
    tangent = acc_t - n * np.einsum("ij,ij->i", acc_t, n)[:, None]
    length = np.linalg.norm(tangent, axis=1, keepdims=True)
    # A vertex with no usable UV direction gets any unit vector perpendicular to its normal.
    fallback = np.cross(n, np.where(np.abs(n[:, :1]) < 0.9, [[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]]))
    fallback /= np.maximum(np.linalg.norm(fallback, axis=1, keepdims=True), 1e-30)
    tangent = np.where(length > 1e-12, tangent / np.maximum(length, 1e-30), fallback)
    sign = np.where(np.einsum("ij,ij->i", np.cross(n, tangent), acc_b) < 0.0, -1.0, 1.0)
    return np.concatenate([tangent, sign[:, None]], axis=1).astype(np.float32)


def tangent_frames(normals: torch.Tensor, tangents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample frame (T, B, N), each (N, 3) unit, from interpolated normals (N, 3) and tangents (N, 4)."""
    nrm = torch.nn.functional.normalize(normals, dim=1, eps=1e-12)
    t = tangents[:, :3] - nrm * (tangents[:, :3] * nrm).sum(1, keepdim=True)
    t = torch.nn.functional.normalize(t, dim=1, eps=1e-12)
    sign = torch.where(tangents[:, 3:] < 0, -1.0, 1.0)
    return t, sign * torch.linalg.cross(nrm, t, dim=1), nrm


def to_tangent_space(world: torch.Tensor, normals: torch.Tensor, tangents: torch.Tensor) -> torch.Tensor:
    """World-space unit normals (N, 3) expressed in the interpolated frames: (N, 3) unit, +Z = no change."""
    t, b, n = tangent_frames(normals, tangents)
    local = torch.stack([(world * t).sum(1), (world * b).sum(1), (world * n).sum(1)], dim=1)
    return torch.nn.functional.normalize(local, dim=1, eps=1e-12)
