"""Camera rigs for multi-view generation, foreground masks by background colour, silhouette agreement.

Cameras follow :mod:`engine_server.cameras` (Blender convention, c2w (4, 4), vertical FOV).
The agreement measure needs no reconstruction: the visual hull of the other views' silhouettes
(voxels that project inside every other mask) is projected into each view and compared with its
silhouette; a view whose shape disagrees with the others' scores low (see :func:`silhouette_agreement`).
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


AGREEMENT_THRESHOLD = 0.85
"""A view whose :func:`silhouette_agreement` is below this disagrees with the others in shape."""


def _carve_tests(masks: torch.Tensor, c2w: torch.Tensor, fovs, grid: int, extent: float):
    """Lattice points' pixels in every view: per view (column, row, in-frame) and whether it keeps each point."""
    n, h, w = masks.shape
    axis = torch.linspace(-extent, extent, grid)
    pts = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    pix, keeps = [], []
    for k in range(n):
        col, row, depth = project_points(pts, c2w[k].float(), float(fovs[k]), w, h)
        ci, ri = col.floor().long(), row.floor().long()
        inside = (ci >= 0) & (ci < w) & (ri >= 0) & (ri < h) & (depth > 0)
        hit = torch.zeros(len(pts), dtype=torch.bool)
        hit[inside] = masks[k].cpu()[ri[inside], ci[inside]]
        pix.append((ci, ri, inside))
        keeps.append(hit | ~inside)  # points projecting outside a frame are kept
    return pix, torch.stack(keeps)


def silhouette_agreement(masks: torch.Tensor, c2w: torch.Tensor, fovs: torch.Tensor | list[float],
                         trusted: tuple[int, ...] = (), threshold: float = AGREEMENT_THRESHOLD,
                         grid: int = 64, extent: float = 0.75) -> torch.Tensor:
    """Per-view agreement (N,) of silhouettes masks (N, H, W) bool seen from c2w (N, 4, 4), fovs (N,) degrees.

    Each view is compared with the visual hull of the *other* views (carved on a ``grid``^3 lattice
    over [-extent, extent]^3) projected into it: IoU(projection, own silhouette). Leaving the view
    out matters: a silhouette narrower than the others' (an ellipse among discs) carves the hull it
    is compared with to its own shape, and would score 1. The IoU is divided by the median over the
    views (a hull carved from pixel masks is about a pixel wider than the object: 0.8-0.85 at 32 px
    for one solid), so one solid scores about 1 in every view. A view below ``threshold`` is taken
    out of the others' hulls and the scores computed again, until none is; views in ``trusted``
    (the reference) are never taken out. Values: 1 agrees, below ``threshold`` disagrees in shape.
    """
    n, h, w = masks.shape
    pix, keeps = _carve_tests(masks, c2w, fovs, grid, extent)
    out = torch.ones(n, dtype=torch.bool)  # views left out of every hull

    def scores() -> torch.Tensor:
        raw = torch.ones(n)
        for k in range(n):
            others = [j for j in range(n) if j != k and not bool(out[j])]
            if not others:
                continue
            keep = keeps[others].all(0)
            ci, ri, inside = pix[k]
            sel = keep & inside
            hull = torch.zeros(h, w, dtype=torch.bool)
            hull[ri[sel], ci[sel]] = True
            m = masks[k].cpu()
            union = (hull | m).sum()
            raw[k] = float((hull & m).sum()) / float(union) if union > 0 else 1.0
        typical = raw[~out].median().clamp_min(1e-6) if bool((~out).any()) else torch.tensor(1.0)
        return (raw / typical).clamp(max=1.0)

    out[:] = False
    while True:
        s = scores()
        candidates = [k for k in range(n) if k not in trusted and not bool(out[k]) and float(s[k]) < threshold]
        if not candidates or int((~out).sum()) <= 2:
            return s
        out[min(candidates, key=lambda k: float(s[k]))] = True


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU per image of two stacks of masks (N, H, W) bool -> (N,)."""
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
