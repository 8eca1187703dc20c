"""Bake colours from a field into a UV texture: rasterize the atlas, query, dilate seams.

Texel convention (see :mod:`engine_server.texture.unwrap` for the UV convention):
the ``(S, S)`` image's row ``i``, column ``j`` is the texel whose centre is at UV
``((j + 0.5) / S, (i + 0.5) / S)``, i.e. at pixel coordinates ``(x, y) = (u S, v S)``
with ``(0, 0)`` the image's top-left corner, as in glTF. The baked array is stored
row 0 first, the way PNG and PIL store images, so it can be written as it is.

Colours are whatever ``color_fn`` returns, clamped to [0, 1] and quantized to 8 bits
with no transfer function applied: a field supervised with sRGB images produces
sRGB values, which is what glTF's ``baseColorTexture`` holds.

Steps of :func:`bake_maps` (:func:`bake_texture` is its base colour alone):

1. :func:`rasterize_uv` finds, for every sample (``supersample`` x ``supersample`` per
   texel), the triangle covering it and the object-space point there; with
   ``conservative=True`` samples just outside a triangle get the nearest point of that
   triangle, so chart borders are sampled from the surface, not extrapolated.
2. With a high-resolution surface (a :class:`~engine_server.geometry.surface.SurfaceProjector`)
   each point moves to the nearest point of that surface, where the colour is read and
   whose normal goes into the tangent-space normal map (:mod:`engine_server.texture.tangents`).
3. ``color_fn`` is evaluated on the points in chunks, under ``torch.no_grad``; each texel
   averages its samples that hit the surface.
4. :func:`dilate` grows the charts by ``dilate`` texels (each empty texel next to a
   filled one takes the mean of its filled 8-neighbours, repeatedly), so bilinear
   filtering and the first mip levels never reach background at seams;
   :func:`push_pull_fill` then fills whatever is left with a smooth pull-push average
   so coarse mip levels do not darken either.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from engine_server.geometry.surface import SurfaceProjector
from engine_server.texture.unwrap import UnwrapConfig, UVMesh, check_mesh, to_numpy, unwrap, usable_uvs, uv_mesh_from_corner_uvs

logger = logging.getLogger(__name__)

ColorFn = Callable[[torch.Tensor], torch.Tensor]
"""(N, 3) float32 object-space positions -> (N, 3) RGB in [0, 1]."""

_CONSERVATIVE_RADIUS = math.sqrt(0.5)  # a texel square overlaps a triangle only if its centre is this close
_QUALITY_LEVELS = 1024  # distance quantization used to rank candidate triangles per texel


@dataclass
class BakeConfig:
    """How a texture is baked from a colour function."""

    size: int = 1024
    """Texture width and height in texels."""
    chunk: int = 65536
    """Number of points passed to the colour function at a time."""
    dilate: int = 8
    """Texels to grow each chart by into empty space (seam padding); 0 disables."""
    fill_rest: bool = True
    """Fill texels still empty after dilation with a pull-push average (no black at coarse mips)."""
    conservative: bool = True
    """Also bake texels whose square overlaps a triangle but whose centre lies outside it."""
    raster_chunk: int = 1 << 22
    """Candidate (texel, triangle) pairs tested at a time while rasterizing (memory bound)."""
    supersample: int = 2
    """Samples per texel along each axis (2: 2x2), averaged: colour edges inside a chart are antialiased."""

    def __post_init__(self) -> None:
        if not 1 <= self.size <= 16384:
            raise ValueError(f"BakeConfig.size must be in [1, 16384], got {self.size}")
        if self.chunk < 1 or self.raster_chunk < 1:
            raise ValueError(f"BakeConfig.chunk and raster_chunk must be >= 1, got {self.chunk}, {self.raster_chunk}")
        if self.dilate < 0:
            raise ValueError(f"BakeConfig.dilate must be >= 0, got {self.dilate}")
        if not 1 <= self.supersample <= 4:
            raise ValueError(f"BakeConfig.supersample must be in [1, 4], got {self.supersample}")


@dataclass
class UVRaster:
    """Which surface point every texel of a UV atlas shows (all maps are (S, S) row 0 = top)."""

    positions: torch.Tensor
    """(S, S, 3) float32 object-space point of each texel (zero where ``mask`` is False)."""
    normals: torch.Tensor
    """(S, S, 3) float32 unit face normal of each texel's triangle (zero where ``mask`` is False)."""
    mask: torch.Tensor
    """(S, S) bool: the texel shows a surface point (its centre is inside, or near with conservative)."""
    inside: torch.Tensor
    """(S, S) bool: the texel's centre is inside a triangle (a subset of ``mask``)."""
    face_id: torch.Tensor
    """(S, S) int64 triangle index per texel, -1 where ``mask`` is False."""
    barycentrics: torch.Tensor
    """(S, S, 3) float32 weights of the triangle's corners (of its nearest point for border texels), zero where empty."""


def rasterize_uv(
    uv_mesh: UVMesh,
    size: int,
    conservative: bool = True,
    device: str | torch.device | None = None,
    chunk: int = 1 << 22,
) -> UVRaster:
    """Rasterize a UV mesh's atlas at ``size`` x ``size`` texels (vectorized, chunked over triangles).

    Where triangles overlap in UV space a texel takes the one that covers its centre
    (ties: the highest face index); conservative texels take the nearest triangle.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    S = int(size)
    verts = torch.from_numpy(uv_mesh.vertices).to(dev, torch.float64)
    faces = torch.from_numpy(uv_mesh.faces).to(dev)
    uv_px = torch.from_numpy(uv_mesh.uvs).to(dev, torch.float64) * S  # (V', 2) in pixel units (x, y)
    tri = uv_px[faces]  # (F, 3, 2)
    n_faces = faces.shape[0]
    radius = _CONSERVATIVE_RADIUS if conservative else 0.0

    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    e0, e1 = b - a, c - a
    den = e0[:, 0] * e1[:, 1] - e1[:, 0] * e0[:, 1]  # twice the signed UV area, pixel units
    ok = den.abs() > 1e-12
    # Candidate texel ranges: centres (j + 0.5) within [min - r, max + r].
    lo = torch.ceil(tri.amin(1) - radius - 0.5).clamp(0, S - 1).long()  # (F, 2) (x, y)
    hi = torch.floor(tri.amax(1) + radius - 0.5).clamp(0, S - 1).long()
    extent = (hi - lo + 1).clamp(min=0)
    counts = torch.where(ok, extent[:, 0] * extent[:, 1], torch.zeros_like(den, dtype=torch.long))
    # Signed distance (texels, positive inside) of a point to each edge, as an affine function of
    # its offset (dx, dy) from the face's first candidate texel corner ``lo``: small offsets keep
    # float32 exact enough. Row k is barycentric k times the triangle's height over edge k.
    edge_len = torch.stack([(c - b).norm(dim=1), (c - a).norm(dim=1), (b - a).norm(dim=1)], dim=1)  # (F, 3)
    heights = den.abs()[:, None] / edge_len.clamp(min=1e-12)
    safe_den = torch.where(ok, den, torch.ones_like(den))
    oa = lo.to(torch.float64) - a  # (F, 2)
    lb = torch.stack([e1[:, 1], -e1[:, 0], oa[:, 0] * e1[:, 1] - e1[:, 0] * oa[:, 1]], dim=1) / safe_den[:, None]
    lc = torch.stack([-e0[:, 1], e0[:, 0], e0[:, 0] * oa[:, 1] - oa[:, 0] * e0[:, 1]], dim=1) / safe_den[:, None]
    la = -lb - lc
    la[:, 2] += 1.0
    dist_coef = (torch.stack([la, lb, lc], dim=1) * heights[:, :, None]).to(torch.float32)  # (F, 3, 3)
    tri_local = (tri - lo.to(torch.float64)[:, None, :]).to(torch.float32)  # (F, 3, 2) corners relative to lo
    eps = 1e-4  # texels

    best = torch.full((S * S,), -1, dtype=torch.int64, device=dev)
    offsets = torch.cumsum(counts, 0) - counts
    cum = torch.cumsum(counts, 0)
    start = 0
    while start < n_faces:
        # Take faces until their candidate count exceeds ``chunk`` (at least one face).
        base = int(offsets[start])
        stop = int(torch.searchsorted(cum, base + chunk, right=True))
        stop = min(max(stop, start + 1), n_faces)
        face_ids = torch.arange(start, stop, device=dev)
        cnt = counts[start:stop]
        total = int(cnt.sum())
        start = stop
        if total == 0:
            continue
        fid = torch.repeat_interleave(face_ids, cnt)  # (N,)
        local = torch.arange(total, device=dev) - (offsets[fid] - base)
        width = extent[fid, 0]
        ix = local % width
        iy = torch.div(local, width, rounding_mode="floor")
        coef = dist_coef[fid]  # (N, 3, 3)
        dist = coef[:, :, 0] * (ix.to(torch.float32) + 0.5)[:, None] + coef[:, :, 1] * (iy.to(torch.float32) + 0.5)[:, None] + coef[:, :, 2]
        outside = (-dist.amin(1)).clamp(min=0.0)  # a lower bound of the distance to the triangle, texels
        inside = outside <= eps
        near = ~inside & (outside <= radius)
        if bool(near.any()):  # exact distance where the bound lets a texel in
            sel = near.nonzero().squeeze(1)
            q = torch.stack([ix[sel], iy[sel]], dim=1).to(torch.float32) + 0.5
            outside[sel] = _closest_on_triangle(q, tri_local[fid[sel]])[0]
        keep = inside | (outside <= radius)
        if not bool(keep.any()):
            continue
        quality = torch.where(
            inside,
            torch.full_like(outside, float(_QUALITY_LEVELS)),
            torch.floor((1.0 - outside / max(radius, 1e-12)) * (_QUALITY_LEVELS - 1)),
        ).long()
        key = quality * (n_faces + 1) + fid
        lin = (lo[fid, 1] + iy) * S + lo[fid, 0] + ix
        best.scatter_reduce_(0, lin[keep], key[keep], reduce="amax", include_self=True)

    mask = best >= 0
    face_id = torch.where(mask, best % (n_faces + 1), torch.full_like(best, -1))
    inside_map = mask & (torch.div(best, n_faces + 1, rounding_mode="floor") == _QUALITY_LEVELS)

    idx = mask.nonzero().squeeze(1)
    fid = face_id[idx]
    p = torch.stack([idx % S, torch.div(idx, S, rounding_mode="floor")], dim=1).to(torch.float64) + 0.5
    lam = _barycentric(p, a[fid], e0[fid], e1[fid], den[fid]).clamp(min=0.0)
    lam = lam / lam.sum(1, keepdim=True).clamp(min=1e-12)
    border = ~inside_map[idx]  # conservative texels: the triangle's point nearest the texel centre
    if bool(border.any()):
        lam[border] = _closest_on_triangle(p[border], tri[fid[border]])[1]
    corners = verts[faces[fid]]  # (M, 3, 3)
    pos = (lam[:, :, None] * corners).sum(1)
    normal = torch.linalg.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    normal = normal / normal.norm(dim=1, keepdim=True).clamp(min=1e-20)

    positions = torch.zeros(S * S, 3, dtype=torch.float32, device=dev)
    positions[idx] = pos.float()
    normals = torch.zeros(S * S, 3, dtype=torch.float32, device=dev)
    normals[idx] = normal.float()
    bary = torch.zeros(S * S, 3, dtype=torch.float32, device=dev)
    bary[idx] = lam.float()
    return UVRaster(
        positions=positions.view(S, S, 3),
        normals=normals.view(S, S, 3),
        mask=mask.view(S, S),
        inside=inside_map.view(S, S),
        face_id=face_id.view(S, S),
        barycentrics=bary.view(S, S, 3),
    )


def _barycentric(p: torch.Tensor, a: torch.Tensor, e0: torch.Tensor, e1: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """(N, 3) barycentric weights of 2-D points p (N, 2) in triangles a, a + e0, a + e1 (den = e0 x e1)."""
    d = p - a
    lb = (d[:, 0] * e1[:, 1] - e1[:, 0] * d[:, 1]) / den
    lc = (e0[:, 0] * d[:, 1] - d[:, 0] * e0[:, 1]) / den
    return torch.stack([1.0 - lb - lc, lb, lc], dim=1)


def _closest_on_triangle(p: torch.Tensor, tri: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance (N,) from 2-D points p (N, 2) outside triangles tri (N, 3, 2) to them, and the
    barycentric weights (N, 3) of the nearest point (which lies on an edge)."""
    start = tri
    end = tri.roll(-1, dims=1)  # edges 0->1, 1->2, 2->0
    edge = end - start  # (N, 3, 2)
    t = ((p[:, None, :] - start) * edge).sum(-1) / (edge * edge).sum(-1).clamp(min=1e-20)
    t = t.clamp(0.0, 1.0)
    dist = (start + t[..., None] * edge - p[:, None, :]).norm(dim=-1)  # (N, 3)
    best_dist, k = dist.min(dim=1)
    tk = t.gather(1, k[:, None]).squeeze(1)
    bary = torch.zeros(len(p), 3, dtype=p.dtype, device=p.device)
    rows = torch.arange(len(p), device=p.device)
    bary[rows, k] = 1.0 - tk
    bary[rows, (k + 1) % 3] = tk
    return best_dist, bary


def dilate(image: torch.Tensor, mask: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grow the filled region of image (S, S, C) by ``iterations`` texels; returns (image, mask).

    Each step an empty texel with filled 8-neighbours takes their mean.
    """
    if image.dim() != 3 or tuple(mask.shape) != tuple(image.shape[:2]):
        raise ValueError(f"image must be (H, W, C) and mask (H, W), got {tuple(image.shape)} and {tuple(mask.shape)}")
    img = image.permute(2, 0, 1)[None].float()  # (1, C, H, W)
    m = mask[None, None].to(img.dtype)
    kernel_c = torch.ones(img.shape[1], 1, 3, 3, dtype=img.dtype, device=img.device)
    kernel_m = torch.ones(1, 1, 3, 3, dtype=img.dtype, device=img.device)
    for _ in range(iterations):
        total = F.conv2d(img * m, kernel_c, padding=1, groups=img.shape[1])
        count = F.conv2d(m, kernel_m, padding=1)
        grow = (m == 0) & (count > 0)
        if not bool(grow.any()):
            break
        img = torch.where(grow, total / count.clamp(min=1.0), img)
        m = torch.where(grow, torch.ones_like(m), m)
    return img[0].permute(1, 2, 0).contiguous(), m[0, 0] > 0


def push_pull_fill(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fill the texels of image (H, W, C) where mask (H, W) is False with a smooth pull-push average."""
    if not bool(mask.any()):
        return image
    img = image.permute(2, 0, 1)[None].float()
    m = mask[None, None].to(img.dtype)
    filled = _push_pull(img * m, m)
    out = torch.where(m > 0, img, filled)
    return out[0].permute(1, 2, 0).contiguous()


def _push_pull(weighted: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Premultiplied (1, C, H, W) colour and (1, 1, H, W) weight -> colour defined everywhere."""
    h, w = weighted.shape[-2:]
    colour = weighted / weight.clamp(min=1e-12)
    if bool((weight > 0).all()) or (h == 1 and w == 1):
        return colour
    size = (max(1, (h + 1) // 2), max(1, (w + 1) // 2))
    coarse_w = F.adaptive_avg_pool2d(weight, size)
    coarse = F.adaptive_avg_pool2d(weighted, size)
    coarse_colour = _push_pull(coarse, coarse_w)
    up = F.interpolate(coarse_colour, size=(h, w), mode="bilinear", align_corners=False)
    return torch.where(weight > 0, colour, up)


@dataclass
class BakedMaps:
    """What :func:`bake_maps` returns: (S, S, 3) uint8 images, row 0 = top, glTF UVs."""

    base_color: np.ndarray
    """Colours of ``color_fn``, clamped to [0, 1], 8-bit."""
    normal_map: np.ndarray | None
    """Tangent-space normals as 0.5 * n + 0.5 (MikkTSpace, +Y green up), or None without a high surface."""


def _resolve(values: torch.Tensor, mask: torch.Tensor, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Average factor x factor blocks of values (H, W, C) over their masked samples -> (H/f, W/f, C), mask."""
    if factor == 1:
        return values, mask
    h, w, c = values.shape
    m = mask.to(values.dtype)[..., None]
    blocks = (values * m).view(h // factor, factor, w // factor, factor, c).sum((1, 3))
    count = m.view(h // factor, factor, w // factor, factor, 1).sum((1, 3))
    return blocks / count.clamp(min=1.0), count[..., 0] > 0


def _pad(image: torch.Tensor, mask: torch.Tensor, texels: torch.Tensor, cfg: BakeConfig) -> torch.Tensor:
    """Seam padding of image (S, S, C) whose samples cover ``mask`` (S, S): dilate, then fill the rest.

    ``texels`` is the atlas rasterized at S: a texel touching the surface whose samples all
    missed it first takes its neighbours' mean, so padding starts from the same texels
    whatever the supersampling.
    """
    missed = texels & ~mask
    if bool(missed.any()):
        grown, _ = dilate(image, mask, 1)
        image = torch.where(missed[..., None], grown, image)
        mask = mask | texels
    image, mask = dilate(image, mask, cfg.dilate)
    return push_pull_fill(image, mask) if cfg.fill_rest else image


def _query(fn: Callable[[torch.Tensor], torch.Tensor], points: torch.Tensor, chunk: int, what: str) -> torch.Tensor:
    """fn over points (N, 3) in chunks under no_grad -> (N, 3) float32, checked."""
    out = torch.zeros(len(points), 3, dtype=torch.float32, device=points.device)
    with torch.no_grad():
        for s in range(0, len(points), chunk):
            part = points[s : s + chunk]
            value = torch.as_tensor(fn(part))
            if tuple(value.shape) != (len(part), 3):
                raise ValueError(f"{what} must return ({len(part)}, 3) for ({len(part)}, 3) points, got {tuple(value.shape)}")
            value = value.to(points.device, torch.float32)
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"{what} returned NaN or infinite values")
            out[s : s + chunk] = value
    return out


def bake_maps(
    uv_mesh: UVMesh,
    color_fn: ColorFn,
    config: BakeConfig | None = None,
    *,
    surface: SurfaceProjector | None = None,
    normals: np.ndarray | None = None,
    device: str | torch.device | None = None,
    **overrides: object,
) -> BakedMaps:
    """Bake the base colour, and with a high-resolution ``surface`` a tangent-space normal map.

    Each texel averages ``supersample`` x ``supersample`` samples of the atlas. A sample's point
    on ``uv_mesh`` is first moved to the nearest point of ``surface`` when one is given, so the
    colour is read on the surface the field made (not on the flatter decimated triangles) and the
    normal map holds that surface's normal in the frame of ``uv_mesh``'s interpolated ``normals``
    (V, 3) (the ones the exporter writes; default: area-weighted, shared across seams) and
    MikkTSpace tangents. ``color_fn`` gets (N, 3) float32 object-space points on ``device``.
    """
    from engine_server.texture.tangents import to_tangent_space, vertex_tangents

    cfg = dataclasses.replace(config or BakeConfig(), **overrides)
    start = time.perf_counter()
    ss = cfg.supersample
    raster = rasterize_uv(uv_mesh, cfg.size * ss, conservative=cfg.conservative, device=device, chunk=cfg.raster_chunk)
    texels = raster.mask if ss == 1 else rasterize_uv(uv_mesh, cfg.size, conservative=cfg.conservative, device=device,
                                                      chunk=cfg.raster_chunk).mask
    t_raster = time.perf_counter() - start
    n = cfg.size * ss
    dev = raster.positions.device
    idx = raster.mask.view(-1).nonzero().squeeze(1)
    points = raster.positions.view(-1, 3)[idx]
    high_normals = None
    if surface is not None:
        points, high_normals = surface.project(points)
    t_project = time.perf_counter() - start - t_raster
    colours = torch.zeros(n * n, 3, dtype=torch.float32, device=dev)
    colours[idx] = _query(color_fn, points, cfg.chunk, "color_fn").clamp(0.0, 1.0)
    image, mask = _resolve(colours.view(n, n, 3), raster.mask, ss)
    base_color = (_pad(image, mask, texels, cfg).clamp(0.0, 1.0) * 255.0 + 0.5).to(torch.uint8).cpu().numpy()
    normal_map = None
    if high_normals is not None:
        if normals is None:
            from engine_server.export import smooth_normals

            normals = smooth_normals(uv_mesh.vertices, uv_mesh.faces)
        tangents = torch.as_tensor(vertex_tangents(uv_mesh.vertices, uv_mesh.faces, uv_mesh.uvs, normals), device=dev)
        corner = uv_mesh.faces[raster.face_id.view(-1)[idx].cpu().numpy()]  # (M, 3) low-mesh vertices per sample
        bary = raster.barycentrics.view(-1, 3)[idx]
        nrm = torch.as_tensor(np.asarray(normals, np.float32), device=dev)[corner]
        tan = tangents[corner]
        local = to_tangent_space(high_normals.to(dev), (bary[:, :, None] * nrm).sum(1), (bary[:, :, None] * tan).sum(1))
        encoded = torch.zeros(n * n, 3, dtype=torch.float32, device=dev)
        encoded[idx] = local
        local_s, mask_s = _resolve(encoded.view(n, n, 3), raster.mask, ss)
        local_s = torch.nn.functional.normalize(local_s, dim=-1, eps=1e-12)
        local_s[~mask_s] = torch.tensor([0.0, 0.0, 1.0], device=dev)  # padding starts from "no change"
        flat = _pad(local_s, mask_s, texels, cfg)
        flat = torch.nn.functional.normalize(flat, dim=-1, eps=1e-12)
        normal_map = ((flat * 0.5 + 0.5).clamp(0.0, 1.0) * 255.0 + 0.5).to(torch.uint8).cpu().numpy()
    logger.info(
        "bake: %dx%d texels x %d samples, %d samples on the surface; raster %.2f s, projection %.2f s, total %.2f s",
        cfg.size, cfg.size, ss * ss, len(idx), t_raster, t_project, time.perf_counter() - start,
    )
    return BakedMaps(base_color, normal_map)


def bake_texture(
    uv_mesh: UVMesh,
    color_fn: ColorFn,
    config: BakeConfig | None = None,
    *,
    device: str | torch.device | None = None,
    **overrides: object,
) -> np.ndarray:
    """Bake ``color_fn`` over the surface into a (S, S, 3) uint8 texture (row 0 = top, glTF UVs).

    ``overrides`` replace fields of ``config`` (e.g. ``bake_texture(m, fn, size=512)``);
    ``color_fn`` gets (N, 3) float32 object-space positions on ``device`` and returns
    (N, 3) RGB in [0, 1] (values outside are clamped; NaN is an error).
    """
    return bake_maps(uv_mesh, color_fn, config, device=device, **overrides).base_color


def reuse_or_unwrap(
    vertices: np.ndarray | torch.Tensor,
    faces: np.ndarray | torch.Tensor,
    uvs: np.ndarray | torch.Tensor | None = None,
    unwrap_config: UnwrapConfig | None = None,
) -> UVMesh:
    """A :class:`UVMesh` on the given topology: its own UVs when usable, else a fresh xatlas unwrap.

    uvs: (V, 2) per vertex or (F, 3, 2) per corner (Blender's per-loop UVs), glTF
    convention (flip Blender's with :func:`~engine_server.texture.unwrap.flip_v`), or None.
    Usable means finite, inside [0, 1] and covering some area (:func:`usable_uvs`).
    """
    v, f = check_mesh(vertices, faces)
    if uvs is not None:
        uv = to_numpy(uvs, np.float32, "uvs")
        if uv.shape not in ((len(v), 2), (len(f), 3, 2)):
            raise ValueError(f"uvs must be (V, 2) = ({len(v)}, 2) or (F, 3, 2) = ({len(f)}, 3, 2), got {uv.shape}")
        if usable_uvs(uv, f):
            if uv.ndim == 3:
                return uv_mesh_from_corner_uvs(v, f, uv)
            return UVMesh(vertices=v, faces=f, uvs=np.clip(uv, 0.0, 1.0), vmapping=np.arange(len(v)))
        logger.warning("the mesh's UVs are unusable (outside [0, 1], non-finite or zero area): unwrapping afresh")
    return unwrap(v, f, unwrap_config)


def bake_onto_uvs(
    vertices: np.ndarray | torch.Tensor,
    faces: np.ndarray | torch.Tensor,
    uvs: np.ndarray | torch.Tensor | None,
    color_fn: ColorFn,
    config: BakeConfig | None = None,
    *,
    device: str | torch.device | None = None,
    unwrap_config: UnwrapConfig | None = None,
    **overrides: object,
) -> tuple[UVMesh, np.ndarray]:
    """Texture-only refine: bake onto an existing mesh, reusing its UVs where they are usable.

    Returns the (possibly seam-split) :class:`UVMesh` to export and the (S, S, 3) uint8
    texture; the faces keep their order and ``vmapping`` points back to the input vertices.
    """
    uv_mesh = reuse_or_unwrap(vertices, faces, uvs, unwrap_config)
    return uv_mesh, bake_texture(uv_mesh, color_fn, config, device=device, **overrides)
