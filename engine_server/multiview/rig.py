"""Camera rigs for multi-view generation, foreground masks by background colour, silhouette agreement.

Cameras follow :mod:`engine_server.cameras` (Blender convention, c2w (4, 4), vertical FOV).
The agreement measure needs no reconstruction: the visual hull of all silhouettes
(voxels that project inside every mask) is projected back into each view; a view whose
silhouette disagrees with the others loses pixels to the carving, so IoU(hull, mask) < 1.
"""
from __future__ import annotations

import math

import torch

from engine_server.cameras import Camera, look_at, orbit_position

DEFAULT_ELEVATION = 15.0
"""Elevation of the default ring and of the default reference (front) view, degrees."""
OVERHEAD_ELEVATION = 55.0
"""Elevation of the default rig's overhead view (inside the bundled prior's trained range)."""


def default_rig(num_views: int, distance: float, fov_y_deg: float, resolution: int,
                start_azimuth: float = 0.0, elevation: float = DEFAULT_ELEVATION,
                overhead: bool = True) -> list[Camera]:
    """A ring of ``num_views - 1`` cameras (``num_views`` without the overhead) plus one overhead view.

    The ring starts at ``start_azimuth`` (the reference view's azimuth) and is evenly spaced;
    the overhead camera sits above the ring's second view, at :data:`OVERHEAD_ELEVATION`.
    """
    ring = num_views - 1 if overhead else num_views
    if num_views < 2 or ring < 1:
        raise ValueError(f"a rig needs at least 2 views, got {num_views}")
    cams = []
    for k in range(ring):
        az = (start_azimuth + 360.0 * k / ring) % 360.0
        cams.append(Camera(look_at(orbit_position(az, elevation, distance)), fov_y_deg, resolution, resolution))
    if overhead:
        az = (start_azimuth + 360.0 / max(ring, 2) * 0.5) % 360.0
        cams.append(Camera(look_at(orbit_position(az, OVERHEAD_ELEVATION, distance)), fov_y_deg,
                           resolution, resolution))
    return cams


def background_mask(images: torch.Tensor, background_rgb, threshold: float = 0.15) -> torch.Tensor:
    """Foreground masks (N, H, W) bool of images (N, 3, H, W) in [0, 1]: any channel off the background by > threshold."""
    bg = torch.as_tensor(background_rgb, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - bg).abs().amax(dim=1) > threshold


def project_points(points: torch.Tensor, c2w: torch.Tensor, fov_y_deg: float, width: int,
                   height: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixel (column, row) float coordinates (P,), (P,) and depth (P,) of world points (P, 3) in one camera.

    The inverse of :func:`engine_server.cameras.camera_rays`: a point on the ray through pixel
    (row i, column j) lands at (j + 0.5, i + 0.5).
    """
    c2w = c2w.to(points)
    local = (points - c2w[:3, 3]) @ c2w[:3, :3]  # world -> camera axes (R^T (p - eye))
    depth = -local[:, 2]
    focal = 0.5 * height / math.tan(math.radians(fov_y_deg) / 2)
    z = depth.clamp_min(1e-6)
    col = local[:, 0] / z * focal + width / 2
    row = -local[:, 1] / z * focal + height / 2
    return col, row, depth


def silhouette_agreement(masks: torch.Tensor, c2w: torch.Tensor, fovs: torch.Tensor | list[float],
                         grid: int = 64, extent: float = 0.75) -> torch.Tensor:
    """Per-view IoU (N,) between each silhouette and the projection of the visual hull of all of them.

    masks: (N, H, W) bool; c2w: (N, 4, 4); fovs: (N,) degrees. The hull is carved on a
    ``grid``^3 lattice over [-extent, extent]^3 (points projecting outside a frame are kept).
    1.0 everywhere means the silhouettes are those of one solid; lower means they disagree.
    """
    n, h, w = masks.shape
    axis = torch.linspace(-extent, extent, grid)
    pts = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    keep = torch.ones(len(pts), dtype=torch.bool)
    pix = []
    for k in range(n):
        col, row, depth = project_points(pts, c2w[k].float(), float(fovs[k]), w, h)
        ci, ri = col.floor().long(), row.floor().long()
        inside = (ci >= 0) & (ci < w) & (ri >= 0) & (ri < h) & (depth > 0)
        hit = torch.zeros(len(pts), dtype=torch.bool)
        hit[inside] = masks[k].cpu()[ri[inside], ci[inside]]
        keep &= hit | ~inside
        pix.append((ci, ri, inside))
    ious = []
    for k in range(n):
        ci, ri, inside = pix[k]
        sel = keep & inside
        hull = torch.zeros(h, w, dtype=torch.bool)
        hull[ri[sel], ci[sel]] = True
        m = masks[k].cpu()
        union = (hull | m).sum()
        ious.append(float((hull & m).sum()) / float(union) if union > 0 else 1.0)
    return torch.tensor(ious)


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU per image of two stacks of masks (N, H, W) bool -> (N,)."""
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
