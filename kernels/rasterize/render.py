"""`render_mesh`: one call from a mesh and camera(s) to colour, mask, depth and normal images."""
from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.nn.functional as F

from kernels.rasterize.ops import antialias as antialias_op
from kernels.rasterize.ops import interpolate, rasterize
from kernels.rasterize.projection import perspective_projection, transform_vertices

logger = logging.getLogger(__name__)


def face_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Unit normals (F, 3) of triangles, counter-clockwise winding facing outward."""
    v = vertices[faces.long()]  # (F, 3, 3)
    n = torch.linalg.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
    return F.normalize(n, dim=-1, eps=1e-12)


def vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted unit vertex normals (V, 3)."""
    f = faces.long()
    v = vertices[f]
    n = torch.linalg.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])  # length = 2 * area
    acc = torch.zeros_like(vertices).index_add(0, f.reshape(-1), n.repeat_interleave(3, dim=0))
    return F.normalize(acc, dim=-1, eps=1e-12)


def face_attribute(attr: torch.Tensor, rast: torch.Tensor) -> torch.Tensor:
    """Per-face attribute (F, C) looked up by rast's triangle ids: (B, H, W, C), 0 on empty pixels."""
    B, H, W, _ = rast.shape
    tri = rast[..., 3].detach().reshape(-1).round().long() - 1
    pix = (tri >= 0).nonzero().squeeze(1)
    out = torch.zeros(B * H * W, attr.shape[-1], device=attr.device, dtype=attr.dtype)
    return out.index_put((pix,), attr[tri[pix]]).view(B, H, W, -1)


def sample_texture(texture: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear lookup of texture (Ht, Wt, C) (row 0 = top) at uv (B, H, W, 2) (v = 0 at the bottom, as in Blender)."""
    B = uv.shape[0]
    tex = texture.permute(2, 0, 1)[None].expand(B, -1, -1, -1).to(uv.dtype)
    grid = torch.stack([2.0 * uv[..., 0] - 1.0, 1.0 - 2.0 * uv[..., 1]], dim=-1)
    out = F.grid_sample(tex, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.permute(0, 2, 3, 1)


def _background(background: float | Sequence[float] | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    bg = torch.as_tensor(background, dtype=like.dtype, device=like.device)
    try:
        return torch.broadcast_to(bg, like.shape)
    except RuntimeError as exc:
        raise ValueError(
            f"background of shape {tuple(bg.shape)} does not broadcast to the image {tuple(like.shape)}"
        ) from exc


def render_mesh(
    vertices: torch.Tensor,
    faces: torch.Tensor,
    c2w: torch.Tensor,
    fov_y_deg: float,
    height: int,
    width: int,
    vertex_colors: torch.Tensor | None = None,
    uv: torch.Tensor | None = None,
    texture: torch.Tensor | None = None,
    uv_faces: torch.Tensor | None = None,
    background: float | Sequence[float] | torch.Tensor = 0.0,
    near: float = 0.01,
    far: float = 100.0,
    normals: str = "face",
    antialias: bool = False,
    backend: str = "auto",
) -> dict[str, torch.Tensor]:
    """Render a triangle mesh from camera(s) in the engine's convention (`engine_server.cameras`).

    vertices: (V, 3) world positions; faces: (F, 3); c2w: (4, 4) or (B, 4, 4).
    Colour from vertex_colors (V, C) / (B, V, C), or from texture (Ht, Wt, C) looked up
    at uv (V, 2) (or uv (U, 2) indexed by uv_faces (F, 3)); white when neither is given.
    Returns (all (B, H, W, .), row 0 at the top):
      rgb (C): colour composited over `background` (a scalar, (C,) or an image);
      mask (1): coverage; depth (1): view depth (distance along the camera axis), 0 where empty;
      normal (3): world unit normals, per face ("face") or interpolated ("vertex"), 0 where empty;
      rast (4): the rasterizer output.
    antialias=True runs `antialias` on rgb and mask, which gives silhouette gradients.
    """
    if normals not in ("face", "vertex"):
        raise ValueError(f"normals must be 'face' or 'vertex', got {normals!r}")
    if vertices.dim() != 2 or vertices.shape[-1] != 3:
        raise ValueError(f"vertices must be (V, 3), got {tuple(vertices.shape)}")
    if (uv is None) != (texture is None):
        raise ValueError("uv and texture must be given together")
    if vertex_colors is not None and texture is not None:
        raise ValueError("give vertex_colors or uv + texture, not both")
    mvp = perspective_projection(c2w.to(vertices), fov_y_deg, width / height, near, far)
    clip = transform_vertices(vertices, mvp)  # (B, V, 4)
    rast = rasterize(clip, faces, (height, width), backend=backend)
    mask = (rast[..., 3:] > 0).to(vertices.dtype)

    if vertex_colors is not None:
        color = interpolate(vertex_colors.to(vertices.dtype), rast, faces, backend=backend)
    elif texture is not None:
        if texture.dim() != 3:
            raise ValueError(f"texture must be (Ht, Wt, C), got {tuple(texture.shape)}")
        uv_idx = faces if uv_faces is None else uv_faces
        uv_img = interpolate(uv.to(vertices.dtype), rast, uv_idx, backend=backend)
        color = sample_texture(texture, uv_img)
    else:
        color = torch.ones_like(mask)
    rgb = color * mask + _background(background, color) * (1.0 - mask)
    if antialias:
        aa = antialias_op(torch.cat([rgb, mask], dim=-1), rast, clip, faces, backend=backend)
        rgb, mask = aa[..., :-1], aa[..., -1:]

    depth = interpolate(clip[..., 3:], rast, faces, backend=backend)  # clip w = view depth, exact under interpolation
    if normals == "face":
        normal = face_attribute(face_normals(vertices, faces), rast)
    else:
        normal = interpolate(vertex_normals(vertices, faces), rast, faces, backend=backend)
        normal = F.normalize(normal, dim=-1, eps=1e-12)
    return {"rgb": rgb, "mask": mask, "depth": depth, "normal": normal, "rast": rast}
