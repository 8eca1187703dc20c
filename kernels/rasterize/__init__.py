"""Differentiable triangle rasterization with run-time backends (nvdiffrast on CUDA, portable PyTorch).

    from kernels.rasterize import perspective_projection, transform_vertices, rasterize, interpolate, antialias
    clip = transform_vertices(vertices, perspective_projection(c2w, fov_y_deg, W / H))  # (B, V, 4)
    rast = rasterize(clip, faces, (H, W))          # (B, H, W, 4): u, v, z/w, triangle id + 1 (0 = empty)
    rgb = interpolate(vertex_colors, rast, faces)  # (B, H, W, C)
    rgb = antialias(rgb, rast, clip, faces)        # only needed for silhouette gradients

or `render_mesh(vertices, faces, c2w, fov_y_deg, H, W, vertex_colors=...)` for rgb, mask,
depth and normal images in one call. Conventions: `kernels.rasterize.reference`.
"""
from __future__ import annotations

from kernels.rasterize.backends import RasterOps, backend_names, backend_status
from kernels.rasterize.ops import antialias, interpolate, rasterize
from kernels.rasterize.projection import perspective_projection, projection_matrix, transform_vertices
from kernels.rasterize.reference import antialias_torch, interpolate_torch, rasterize_torch
from kernels.rasterize.render import face_normals, render_mesh, vertex_normals
from kernels.registry import BackendStatus, BackendUnavailableError

__all__ = [
    "BackendStatus",
    "BackendUnavailableError",
    "RasterOps",
    "antialias",
    "antialias_torch",
    "backend_names",
    "backend_status",
    "face_normals",
    "interpolate",
    "interpolate_torch",
    "perspective_projection",
    "projection_matrix",
    "rasterize",
    "rasterize_torch",
    "render_mesh",
    "transform_vertices",
    "vertex_normals",
]
