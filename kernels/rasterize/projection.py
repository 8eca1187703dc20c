"""Camera matrices for the rasterizer in the engine's camera convention.

Cameras follow `engine_server.cameras` (Blender): a 4x4 camera-to-world `c2w`, the
camera looking along its local -Z with +Y up, vertical FOV in degrees. The projection
is OpenGL's: NDC x right, y up, z in [-1, 1] from near to far, clip w = -z_camera (the
view depth). With aspect = width / height, pixel (i, j) of a rasterized image sees the
same point as `camera_rays(c2w, fov_y_deg, width, height)[i, j]`.
"""
from __future__ import annotations

import math

import torch


def projection_matrix(
    fov_y_deg: float, aspect: float, near: float, far: float, device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """OpenGL perspective projection (4, 4): camera space -> clip space."""
    if not 0.0 < fov_y_deg < 180.0:
        raise ValueError(f"fov_y_deg must be in (0, 180), got {fov_y_deg}")
    if not 0.0 < near < far:
        raise ValueError(f"need 0 < near < far, got near={near}, far={far}")
    if aspect <= 0.0:
        raise ValueError(f"aspect must be positive, got {aspect}")
    t = math.tan(math.radians(fov_y_deg) / 2.0)
    proj = torch.zeros(4, 4, device=device, dtype=dtype)
    proj[0, 0] = 1.0 / (aspect * t)
    proj[1, 1] = 1.0 / t
    proj[2, 2] = -(far + near) / (far - near)
    proj[2, 3] = -2.0 * far * near / (far - near)
    proj[3, 2] = -1.0
    return proj


def perspective_projection(
    c2w: torch.Tensor, fov_y_deg: float, aspect: float, near: float = 0.01, far: float = 100.0
) -> torch.Tensor:
    """Full view-projection matrix (world -> clip) for camera(s) c2w (4, 4) or (B, 4, 4); same leading shape."""
    if not isinstance(c2w, torch.Tensor) or c2w.dim() not in (2, 3) or c2w.shape[-2:] != (4, 4):
        shape = tuple(c2w.shape) if isinstance(c2w, torch.Tensor) else type(c2w).__name__
        raise ValueError(f"c2w must be (4, 4) or (B, 4, 4), got {shape}")
    c2w = c2w.to(torch.float32) if not c2w.is_floating_point() else c2w
    proj = projection_matrix(fov_y_deg, aspect, near, far, c2w.device, c2w.dtype)
    return proj @ torch.linalg.inv(c2w)


def transform_vertices(vertices: torch.Tensor, mvp: torch.Tensor) -> torch.Tensor:
    """World vertices (V, 3) or (B, V, 3) -> homogeneous clip coordinates (B, V, 4) for mvp (4, 4) or (B, 4, 4)."""
    if not isinstance(vertices, torch.Tensor) or vertices.dim() not in (2, 3) or vertices.shape[-1] != 3:
        shape = tuple(vertices.shape) if isinstance(vertices, torch.Tensor) else type(vertices).__name__
        raise ValueError(f"vertices must be (V, 3) or (B, V, 3), got {shape}")
    if not isinstance(mvp, torch.Tensor) or mvp.dim() not in (2, 3) or mvp.shape[-2:] != (4, 4):
        shape = tuple(mvp.shape) if isinstance(mvp, torch.Tensor) else type(mvp).__name__
        raise ValueError(f"mvp must be (4, 4) or (B, 4, 4), got {shape}")
    mvp = mvp[None] if mvp.dim() == 2 else mvp
    vertices = vertices[None] if vertices.dim() == 2 else vertices
    if vertices.shape[0] not in (1, mvp.shape[0]) and mvp.shape[0] != 1:
        raise ValueError(f"vertices batch {vertices.shape[0]} does not match mvp batch {mvp.shape[0]}")
    homo = torch.cat([vertices, torch.ones_like(vertices[..., :1])], dim=-1)  # (B, V, 4)
    return homo @ mvp.transpose(-1, -2).to(homo.dtype)
