"""Public rasterizer ops: inputs checked at this boundary, then handed to the chosen backend.

    clip = transform_vertices(vertices, mvp)            # (B, V, 4)
    rast = rasterize(clip, faces, (H, W))              # (B, H, W, 4): u, v, z/w, triangle id + 1
    rgb = interpolate(colors, rast, faces)             # (B, H, W, 3), gradients to colours and vertices
    rgb = antialias(rgb, rast, clip, faces)            # silhouette gradients

See `kernels.rasterize.reference` for the conventions every backend follows.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from kernels.rasterize.backends import get_ops

logger = logging.getLogger(__name__)


def _check_clip(clip_pos: torch.Tensor) -> torch.Tensor:
    if not isinstance(clip_pos, torch.Tensor):
        raise TypeError(f"clip_pos must be a torch.Tensor, got {type(clip_pos).__name__}")
    if clip_pos.dim() == 2:
        clip_pos = clip_pos[None]
    if clip_pos.dim() != 3 or clip_pos.shape[-1] != 4:
        raise ValueError(
            f"clip_pos must be (B, V, 4) or (V, 4) homogeneous clip coordinates, got {tuple(clip_pos.shape)}"
        )
    if not clip_pos.is_floating_point():
        raise TypeError(f"clip_pos must be floating point, got {clip_pos.dtype}")
    return clip_pos.contiguous()


def _check_faces(faces: torch.Tensor, n_vertices: int, device: torch.device) -> torch.Tensor:
    if not isinstance(faces, torch.Tensor):
        raise TypeError(f"faces must be a torch.Tensor, got {type(faces).__name__}")
    if faces.dim() != 2 or faces.shape[1] != 3:
        raise ValueError(f"faces must be (F, 3) vertex indices, got {tuple(faces.shape)}")
    if faces.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"faces must be int32 or int64, got {faces.dtype}")
    if faces.device != device:
        raise ValueError(f"faces are on {faces.device} but the vertices are on {device}")
    if faces.numel():
        lo, hi = int(faces.min()), int(faces.max())
        if lo < 0 or hi >= n_vertices:
            raise ValueError(f"face indices must be in [0, {n_vertices}), got range [{lo}, {hi}]")
    return faces.long().contiguous()


def _check_resolution(resolution: Sequence[int]) -> tuple[int, int]:
    try:
        height, width = (int(r) for r in resolution)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"resolution must be (height, width), got {resolution!r}") from exc
    if height < 1 or width < 1 or (height, width) != tuple(resolution):
        raise ValueError(f"resolution must be two positive integers (height, width), got {resolution!r}")
    return height, width


def _check_rast(rast: torch.Tensor, n_faces: int) -> torch.Tensor:
    if not isinstance(rast, torch.Tensor) or rast.dim() != 4 or rast.shape[-1] != 4:
        shape = tuple(rast.shape) if isinstance(rast, torch.Tensor) else type(rast).__name__
        raise ValueError(f"rast must be the (B, H, W, 4) output of rasterize, got {shape}")
    if rast.numel():
        top = int(rast[..., 3].max())
        if top > n_faces:
            raise ValueError(f"rast refers to triangle {top - 1} but faces has only {n_faces} rows")
    return rast.contiguous()


def rasterize(
    clip_pos: torch.Tensor, faces: torch.Tensor, resolution: Sequence[int], backend: str = "auto"
) -> torch.Tensor:
    """Rasterize triangles into (B, H, W, 4) = (u, v, z/w, triangle_id + 1), 0 on empty pixels.

    clip_pos: (B, V, 4) or (V, 4) homogeneous clip-space vertices (OpenGL clip space);
    faces: (F, 3) int32/int64; resolution: (H, W). Row 0 is the top of the image.
    (u, v) are the perspective-correct barycentrics of vertices 0 and 1 (vertex 2 gets
    1 - u - v), as in nvdiffrast; they carry gradients w.r.t. clip_pos, visibility does not.
    """
    clip = _check_clip(clip_pos)
    faces = _check_faces(faces, clip.shape[1], clip.device)
    height, width = _check_resolution(resolution)
    return get_ops(backend, clip.device).rasterize(clip, faces, (height, width))


def interpolate(attr: torch.Tensor, rast: torch.Tensor, faces: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Interpolate vertex attributes (B, V, C) or (V, C) over `rast`: (B, H, W, C), 0 on empty pixels.

    Differentiable w.r.t. attr and, through rast's barycentrics, w.r.t. the vertex positions.
    """
    if not isinstance(attr, torch.Tensor) or attr.dim() not in (2, 3):
        shape = tuple(attr.shape) if isinstance(attr, torch.Tensor) else type(attr).__name__
        raise ValueError(f"attr must be (B, V, C) or (V, C), got {shape}")
    if not attr.is_floating_point():
        raise TypeError(f"attr must be floating point, got {attr.dtype}")
    attr = attr[None] if attr.dim() == 2 else attr
    faces = _check_faces(faces, attr.shape[1], attr.device)
    rast = _check_rast(rast, faces.shape[0])
    if attr.shape[0] not in (1, rast.shape[0]):
        raise ValueError(f"attr has batch {attr.shape[0]} but rast has batch {rast.shape[0]} (use 1 to broadcast)")
    if rast.device != attr.device:
        raise ValueError(f"rast is on {rast.device} but attr is on {attr.device}")
    return get_ops(backend, attr.device).interpolate(attr.contiguous(), rast, faces)


def antialias(
    color: torch.Tensor, rast: torch.Tensor, clip_pos: torch.Tensor, faces: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    """Blend colours across silhouette edges so that they pass gradients to vertex positions.

    color: (B, H, W, C) final shaded image, background included; rast, clip_pos, faces:
    exactly those given to / returned by `rasterize`. Returns (B, H, W, C). Without this,
    only pixels inside triangles give vertex gradients (nothing moves a silhouette).
    """
    clip = _check_clip(clip_pos)
    faces = _check_faces(faces, clip.shape[1], clip.device)
    rast = _check_rast(rast, faces.shape[0])
    if not isinstance(color, torch.Tensor) or color.dim() != 4 or color.shape[:3] != rast.shape[:3]:
        shape = tuple(color.shape) if isinstance(color, torch.Tensor) else type(color).__name__
        raise ValueError(f"color must be (B, H, W, C) matching rast {tuple(rast.shape[:3])}, got {shape}")
    if clip.shape[0] != rast.shape[0]:
        raise ValueError(f"clip_pos has batch {clip.shape[0]} but rast has batch {rast.shape[0]}")
    return get_ops(backend, clip.device).antialias(color.contiguous(), rast, clip, faces)
