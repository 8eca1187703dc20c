"""Procedural objects and their renders: the bundled prior's training data and ground truth.

Every shape is an analytic signed distance function (SDF), normalised so its
bounding box fits the unit box [-0.5, 0.5]^3 centred at the origin (largest side
1). A batch of cameras (engine convention, :mod:`engine_server.cameras`) is
sphere-traced at ``supersample`` x the output resolution, shaded with a fixed
world light (ambient + two Lambertian lights) and box-downsampled.

Shading is independent of colour, so a render stores the colour-free *shade*
``S = mean(hit * shading)`` and the coverage ``M = mean(hit)`` per output pixel;
an image of any colour is then exactly ``albedo * S + BACKGROUND_RGB * (1 - M)``
(see :func:`compose`). Everything is deterministic given the cameras.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch

from engine_server.cameras import camera_rays, look_at, orbit_position
from engine_server.models.bundled.vocab import COLORS, SHAPES, Caption

logger = logging.getLogger(__name__)

BACKGROUND_RGB: tuple[float, float, float] = (0.0, 0.75, 0.75)
"""The one plain background colour (cyan): far from every shaded colour of the vocabulary."""

AZIMUTH_RANGE: tuple[float, float] = (0.0, 360.0)
"""Training azimuths, degrees."""
ELEVATION_RANGE: tuple[float, float] = (-10.0, 60.0)
"""Training elevations, degrees."""
DISTANCE_RANGE: tuple[float, float] = (2.2, 2.8)
"""Camera distance to the origin."""
FOV_RANGE: tuple[float, float] = (38.0, 46.0)
"""Vertical field of view, degrees."""
DEFAULT_DISTANCE: float = 2.5
"""Distance used for evaluation cameras and by default at run time."""
DEFAULT_FOV: float = 42.0
"""Field of view used for evaluation cameras and by default at run time."""

HELD_OUT_VIEWS: tuple[tuple[float, float], ...] = tuple(
    (10.0 + 22.5 * k, (0.0, 15.0, 30.0, 45.0)[k % 4]) for k in range(16)
)
"""(azimuth, elevation) pairs kept for evaluation: 16 views around the orbit."""
HELD_OUT_RADIUS_DEG: float = 6.0
"""Training never samples a view direction within this angle of a held-out view."""

KEY_LIGHT = (0.45, -0.6, 0.66)
FILL_LIGHT = (-0.5, 0.7, 0.3)
AMBIENT, KEY, FILL = 0.38, 0.55, 0.2


def studio_lighting() -> dict:
    """The training renders' world-fixed lights: {"ambient": a, "lights": [(strength, (x, y, z)), ...]}."""
    return {"ambient": AMBIENT, "lights": [(KEY, KEY_LIGHT), (FILL, FILL_LIGHT)]}


SDF = Callable[[torch.Tensor], torch.Tensor]  # points (..., 3) -> distances (...)


# ---------------------------------------------------------------- SDF pieces
def _sphere(c, r) -> SDF:
    c = torch.tensor(c)
    return lambda p: (p - c).norm(dim=-1) - r


def _box(c, half) -> SDF:
    c, half = torch.tensor(c), torch.tensor(half)

    def f(p):
        q = (p - c).abs() - half
        return q.clamp(min=0).norm(dim=-1) + q.max(dim=-1).values.clamp(max=0)

    return f


def _frustum(z0, z1, r0, r1, square: bool = False, xy=(0.0, 0.0)) -> SDF:
    """Solid of revolution (or square pyramid frustum) between z0 < z1 with radius r0 -> r1.

    Cylinder: r0 == r1; cone: r1 == 0. Max of plane distances: exact inside, a
    lower bound outside, which is safe for sphere tracing.
    """
    h = z1 - z0
    norm = math.hypot(h, r0 - r1)

    def side(rho, z):
        return ((rho - r0) * h + (z - z0) * (r0 - r1)) / norm

    def f(p):
        x, y, z = p[..., 0] - xy[0], p[..., 1] - xy[1], p[..., 2]
        if square:
            s = torch.maximum(side(x.abs(), z), side(y.abs(), z))
        else:
            s = side(torch.sqrt(x * x + y * y + 1e-12), z)
        return torch.maximum(s, torch.maximum(z0 - z, z - z1))

    return f


def _torus(R, r) -> SDF:
    def f(p):
        q = torch.stack([torch.sqrt(p[..., 0] ** 2 + p[..., 1] ** 2 + 1e-12) - R, p[..., 2]], dim=-1)
        return q.norm(dim=-1) - r

    return f


def _union(*fs: SDF) -> SDF:
    def f(p):
        d = fs[0](p)
        for g in fs[1:]:
            d = torch.minimum(d, g(p))
        return d

    return f


def _intersect(*fs: SDF) -> SDF:
    def f(p):
        d = fs[0](p)
        for g in fs[1:]:
            d = torch.maximum(d, g(p))
        return d

    return f


def _raw_shape(name: str) -> SDF:
    if name == "cube":
        return _box((0, 0, 0), (0.5, 0.5, 0.5))
    if name == "sphere":
        return _sphere((0, 0, 0), 0.5)
    if name == "cylinder":
        return _frustum(-0.5, 0.5, 0.4, 0.4)
    if name == "cone":
        return _frustum(-0.5, 0.5, 0.5, 0.0)
    if name == "torus":
        return _torus(0.33, 0.17)
    if name == "pyramid":
        return _frustum(-0.5, 0.4, 0.5, 0.0, square=True)
    if name == "mushroom":
        cap = _intersect(_sphere((0, 0, -0.05), 0.5), lambda p: 0.05 - p[..., 2])
        return _union(_frustum(-0.5, 0.1, 0.13, 0.11), cap)
    if name == "snowman":
        return _union(_sphere((0, 0, 0), 0.3), _sphere((0, 0, 0.42), 0.22), _sphere((0, 0, 0.74), 0.15))
    if name == "table":
        legs = [_box((sx * 0.4, sy * 0.25, 0.22), (0.055, 0.055, 0.22)) for sx in (-1, 1) for sy in (-1, 1)]
        return _union(_box((0, 0, 0.47), (0.5, 0.34, 0.05)), *legs)
    if name == "lamp":
        return _union(
            _frustum(0.0, 0.06, 0.26, 0.24), _frustum(0.0, 0.55, 0.055, 0.055), _frustum(0.45, 0.85, 0.34, 0.16)
        )
    if name == "tree":
        return _union(_frustum(0.0, 0.3, 0.1, 0.1), _frustum(0.22, 1.0, 0.4, 0.0))
    raise ValueError(f"unknown shape {name!r}; known shapes: {', '.join(SHAPES)}")


_NORMALISED: dict[str, SDF] = {}


def shape_sdf(name: str) -> SDF:
    """The shape's SDF, scaled and centred so its bounding box fits [-0.5, 0.5]^3 (largest side 1)."""
    if name not in _NORMALISED:
        raw = _raw_shape(name)
        g = torch.linspace(-1.2, 1.2, 121)
        pts = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), dim=-1).reshape(-1, 3)
        inside = pts[raw(pts) <= 0]
        lo, hi = inside.min(dim=0).values, inside.max(dim=0).values
        step = float(g[1] - g[0])
        lo, hi = lo - step / 2, hi + step / 2  # grid cells half-covered at the boundary
        centre, scale = (lo + hi) / 2, float((hi - lo).max())
        _NORMALISED[name] = lambda p, raw=raw, c=centre, s=scale: raw(p * s + c) / s
    return _NORMALISED[name]


# ---------------------------------------------------------------- cameras
def _view_dir(az_deg: torch.Tensor, el_deg: torch.Tensor) -> torch.Tensor:
    az, el = torch.deg2rad(az_deg), torch.deg2rad(el_deg)
    return torch.stack([torch.cos(el) * torch.sin(az), -torch.cos(el) * torch.cos(az), torch.sin(el)], dim=-1)


def is_held_out(az_deg: torch.Tensor, el_deg: torch.Tensor) -> torch.Tensor:
    """True where the view (az, el) lies within HELD_OUT_RADIUS_DEG of a held-out view. (N,) -> (N,) bool."""
    d = _view_dir(torch.as_tensor(az_deg, dtype=torch.float64), torch.as_tensor(el_deg, dtype=torch.float64))
    h = torch.tensor(HELD_OUT_VIEWS, dtype=torch.float64)
    hd = _view_dir(h[:, 0], h[:, 1])
    cos = (d[..., None, :] * hd).sum(-1).clamp(-1, 1)
    return (torch.rad2deg(torch.acos(cos)) < HELD_OUT_RADIUS_DEG).any(dim=-1)


@dataclass
class CameraBatch:
    """A batch of orbit cameras."""

    c2w: torch.Tensor
    """(N, 4, 4) camera-to-world."""
    fov: torch.Tensor
    """(N,) vertical FOV in degrees."""
    azimuth: torch.Tensor
    """(N,) degrees."""
    elevation: torch.Tensor
    """(N,) degrees."""
    distance: torch.Tensor
    """(N,) distance to the origin."""


def orbit_cameras(azimuth, elevation, distance, fov) -> CameraBatch:
    """Cameras from per-view orbit parameters (sequences or tensors of equal length)."""
    az, el = torch.as_tensor(azimuth, dtype=torch.float32), torch.as_tensor(elevation, dtype=torch.float32)
    dist, fov = torch.as_tensor(distance, dtype=torch.float32), torch.as_tensor(fov, dtype=torch.float32)
    n = az.numel()
    dist, fov = dist.expand(n).clone(), fov.expand(n).clone()
    c2w = torch.stack([look_at(orbit_position(float(a), float(e), float(d))) for a, e, d in zip(az, el, dist)])
    return CameraBatch(c2w=c2w, fov=fov, azimuth=az, elevation=el, distance=dist)


def sample_training_cameras(n: int, generator: torch.Generator) -> CameraBatch:
    """n random training cameras (uniform over the sphere band), never near a held-out view."""
    az_l, el_l, d_l, f_l = [], [], [], []
    lo, hi = (math.sin(math.radians(e)) for e in ELEVATION_RANGE)
    while sum(len(a) for a in az_l) < n:
        m = 2 * n
        az = torch.rand(m, generator=generator, dtype=torch.float64) * 360.0
        el = torch.rad2deg(torch.asin(lo + (hi - lo) * torch.rand(m, generator=generator, dtype=torch.float64)))
        dist = DISTANCE_RANGE[0] + (DISTANCE_RANGE[1] - DISTANCE_RANGE[0]) * torch.rand(m, generator=generator, dtype=torch.float64)
        fov = FOV_RANGE[0] + (FOV_RANGE[1] - FOV_RANGE[0]) * torch.rand(m, generator=generator, dtype=torch.float64)
        keep = ~is_held_out(az, el)
        az_l.append(az[keep]), el_l.append(el[keep]), d_l.append(dist[keep]), f_l.append(fov[keep])
    cat = lambda xs: torch.cat(xs)[:n].float()  # noqa: E731
    return orbit_cameras(cat(az_l), cat(el_l), cat(d_l), cat(f_l))


def held_out_cameras() -> CameraBatch:
    """The evaluation cameras: HELD_OUT_VIEWS at DEFAULT_DISTANCE and DEFAULT_FOV."""
    az = [a for a, _ in HELD_OUT_VIEWS]
    el = [e for _, e in HELD_OUT_VIEWS]
    return orbit_cameras(az, el, DEFAULT_DISTANCE, DEFAULT_FOV)


# ---------------------------------------------------------------- rendering
@dataclass
class Render:
    """Colour-free renders of one shape; compose() gives images of any colour."""

    shade: torch.Tensor
    """(N, 1, H, W) mean of hit * shading per pixel."""
    mask: torch.Tensor
    """(N, 1, H, W) coverage in [0, 1]."""
    depth: torch.Tensor
    """(N, 1, H, W) camera-space depth (distance along -Z), 0 where empty."""


def render_shape(shape: str, c2w: torch.Tensor, fov: torch.Tensor, resolution: int = 32,
                 supersample: int = 2, steps: int = 64, chunk: int = 64) -> Render:
    """Sphere-trace ``shape`` from cameras c2w (N, 4, 4) with FOVs (N,) degrees."""
    sdf = shape_sdf(shape)
    outs = []
    for s in range(0, c2w.shape[0], chunk):
        outs.append(_render_chunk(sdf, c2w[s:s + chunk], fov[s:s + chunk], resolution, supersample, steps))
    return Render(*(torch.cat([o[i] for o in outs]) for i in range(3)))


def _render_chunk(sdf: SDF, c2w, fov, res, ss, steps):
    n, big = c2w.shape[0], res * ss
    rays_o, rays_d = [], []
    for i in range(n):  # per-camera FOV
        o, d = camera_rays(c2w[i], float(fov[i]), big, big)
        rays_o.append(o), rays_d.append(d)
    o = torch.stack(rays_o).reshape(-1, 3)
    d = torch.stack(rays_d).reshape(-1, 3)
    # start at the bounding sphere (radius sqrt(3)/2 + margin)
    b = (o * d).sum(-1)
    c = (o * o).sum(-1) - 0.9 ** 2
    disc = b * b - c
    t = (-b - disc.clamp(min=0).sqrt()).clamp(min=0)
    t_far = -b + disc.clamp(min=0).sqrt()
    active = disc > 0
    hit = torch.zeros_like(active)
    idx = active.nonzero().squeeze(1)
    for _ in range(steps):
        if idx.numel() == 0:
            break
        p = o[idx] + t[idx, None] * d[idx]
        dist = sdf(p)
        t[idx] = t[idx] + dist
        done_hit = dist < 1e-3
        hit[idx[done_hit]] = True
        gone = t[idx] > t_far[idx]
        idx = idx[~(done_hit | gone)]
    # rays still marching after `steps` count as hits only if very close
    p = o + t[:, None] * d
    eps = 1e-3
    e = torch.eye(3) * eps
    hp = p[hit]
    grad = torch.stack([sdf(hp + e[k]) - sdf(hp - e[k]) for k in range(3)], dim=-1)
    normal = grad / grad.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    key = torch.tensor(KEY_LIGHT) / torch.tensor(KEY_LIGHT).norm()
    fill = torch.tensor(FILL_LIGHT) / torch.tensor(FILL_LIGHT).norm()
    shade_hit = AMBIENT + KEY * (normal @ key).clamp(min=0) + FILL * (normal @ fill).clamp(min=0)
    shade = torch.zeros(o.shape[0])
    shade[hit] = shade_hit.clamp(max=1.0)
    # camera-space depth: distance along the camera's -Z axis
    fwd = -c2w[:, :3, 2].repeat_interleave(big * big, dim=0)
    depth = torch.zeros(o.shape[0])
    depth[hit] = ((p[hit] - o[hit]) * fwd[hit]).sum(-1)
    hitf = hit.float()

    def down(x):
        return torch.nn.functional.avg_pool2d(x.reshape(n, 1, big, big), ss)

    m = down(hitf)
    depth_lo = down(depth * hitf) / m.clamp(min=1e-6)
    return down(shade * hitf), m, torch.where(m > 0, depth_lo, torch.zeros_like(depth_lo))


def compose(shade: torch.Tensor, mask: torch.Tensor, albedo: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] (N, 3, H, W) from shade/mask (N, 1, H, W) and albedos (N, 3)."""
    bg = torch.tensor(BACKGROUND_RGB, dtype=shade.dtype, device=shade.device).view(1, 3, 1, 1)
    return (albedo[:, :, None, None] * shade + bg * (1 - mask)).clamp(0, 1)


def albedo_of(color: str) -> torch.Tensor:
    """(3,) albedo of a colour word."""
    return torch.tensor(COLORS[color])


def render_caption(caption: Caption, cameras: CameraBatch, resolution: int = 32) -> dict[str, torch.Tensor]:
    """Ground-truth renders of a full caption: rgb (N,3,H,W) in [0,1], mask, depth (N,1,H,W)."""
    if caption.shape is None or caption.color is None:
        raise ValueError(f"ground truth needs a colour and a shape, got {caption.text!r}")
    r = render_shape(caption.shape, cameras.c2w, cameras.fov, resolution)
    alb = albedo_of(caption.color).expand(r.shade.shape[0], 3)
    return {"rgb": compose(r.shade, r.mask, alb), "mask": r.mask, "depth": r.depth}
