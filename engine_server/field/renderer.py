"""Volume rendering of a radiance field by ray marching with empty-space skipping.

Rays are clipped to the field's box and marched with one fixed step size
(box diagonal / ``num_steps``), optionally jittered per ray. Samples in cells the
occupancy grid marks empty are dropped before the field is called (compaction),
so the field only sees the samples that count. Samples are kept padded per
pass of ``steps_per_pass`` steps over a chunk of rays; after each pass rays whose
transmittance fell below ``min_transmittance`` stop (early termination).

Compositing: alpha_i = 1 - exp(-sigma_i delta_i), T_i = exp(-sum_{j<i} sigma_j delta_j),
w_i = T_i alpha_i; rgb = sum w_i c_i + (1 - sum w_i) background.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine_server.cameras import Camera, camera_rays
from engine_server.field.occupancy import OccupancyGrid

logger = logging.getLogger(__name__)

SHADINGS = ("albedo", "lambertian", "textureless", "normal")
_NEEDS_NORMALS = ("lambertian", "textureless", "normal")


@dataclass
class RendererConfig:
    """How rays are marched and composited."""

    num_steps: int = 128
    """Steps across the box diagonal: the step size is diagonal / num_steps."""
    steps_per_pass: int = 32
    """Steps marched per pass before terminated rays are dropped; bounds samples in flight."""
    chunk_rays: int = 8192
    """Rays rendered together; at most chunk_rays * steps_per_pass samples are evaluated at once."""
    min_transmittance: float = 1e-4
    """Rays stop once their transmittance falls below this (0: never)."""
    min_near: float = 0.0
    """Nearest distance sampled along a ray (for cameras inside the box)."""
    shading: str = "albedo"
    """Default shading: "albedo", "lambertian", "textureless" or "normal"."""
    ambient: float = 0.1
    """Ambient light fraction of lambertian / textureless shading."""
    normal_mode: str = "finite_difference"
    """How sample normals are computed: "finite_difference" or "analytic"."""
    min_weight: float = 1e-4
    """Samples whose compositing weight is at most this get a zero normal (0: only samples adding nothing)."""

    def __post_init__(self) -> None:
        if self.num_steps < 1 or self.steps_per_pass < 1 or self.chunk_rays < 1:
            raise ValueError(
                f"num_steps, steps_per_pass and chunk_rays must be >= 1, got "
                f"{self.num_steps}, {self.steps_per_pass}, {self.chunk_rays}"
            )
        if self.shading not in SHADINGS:
            raise ValueError(f"shading must be one of {', '.join(SHADINGS)}, got {self.shading!r}")
        if not 0.0 <= self.ambient <= 1.0:
            raise ValueError(f"ambient must be in [0, 1], got {self.ambient}")
        if not 0.0 <= self.min_transmittance < 1.0:
            raise ValueError(f"min_transmittance must be in [0, 1), got {self.min_transmittance}")
        if not 0.0 <= self.min_weight < 1.0:
            raise ValueError(f"min_weight must be in [0, 1), got {self.min_weight}")


def intersect_aabb(
    rays_o: torch.Tensor, rays_d: torch.Tensor, aabb: torch.Tensor, min_near: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slab test. rays (N, 3), aabb (2, 3) -> near (N,), far (N,), hit (N,) bool (far > near)."""
    d = torch.where(rays_d.abs() < 1e-9, torch.full_like(rays_d, 1e-9), rays_d)
    t0 = (aabb[0] - rays_o) / d
    t1 = (aabb[1] - rays_o) / d
    near = torch.minimum(t0, t1).amax(dim=-1).clamp(min=min_near)
    far = torch.maximum(t0, t1).amin(dim=-1)
    hit = far > near
    return near, far, hit


class VolumeRenderer:
    """Renders any field with ``aabb``, ``forward(x, view_dirs)`` and ``normals(x, mode)``."""

    def __init__(self, config: RendererConfig | None = None) -> None:
        self.config = config or RendererConfig()

    def step_size(self, aabb: torch.Tensor) -> float:
        return float((aabb[1] - aabb[0]).norm()) / self.config.num_steps

    def render(
        self,
        field: nn.Module,
        rays_o: torch.Tensor,
        rays_d: torch.Tensor,
        background: nn.Module | None = None,
        shading: str | None = None,
        light_dir: torch.Tensor | None = None,
        ambient: float | None = None,
        occupancy: OccupancyGrid | None = None,
        jitter: bool = False,
        compute_normals: bool = False,
    ) -> dict:
        """Render rays (N, 3) origins and unit directions.

        background: module (N, 3) dirs -> (N, 3) colour, or None for black.
        shading: "albedo" | "lambertian" | "textureless" | "normal" (default from the config).
        light_dir: (3,) or (N, 3) direction towards the light; None: a headlight (-rays_d).
        occupancy: skip samples in empty cells. jitter: random offset per ray (training).
        compute_normals: composite normals even when the shading does not need them.

        Returns rgb (N, 3), opacity (N,), depth (N,) (expected distance, weighted by opacity),
        normal (N, 3) (composited, not renormalised; zeros unless computed), background (N, 3),
        n_samples (int: samples the field was evaluated at), and samples: a dict of per-sample
        ray_indices (M,) long, weights (M,), t (M,), albedo (M, 3), and normals (M, 3) when computed, for
        regularisers such as DreamFusion's orientation loss and the background-matter penalty.
        """
        c = self.config
        shading = shading or c.shading
        if shading not in SHADINGS:
            raise ValueError(f"shading must be one of {', '.join(SHADINGS)}, got {shading!r}")
        ambient = c.ambient if ambient is None else ambient
        if rays_o.dim() != 2 or rays_o.shape[1] != 3 or rays_d.shape != rays_o.shape:
            raise ValueError(
                f"rays_o and rays_d must both be (N, 3), got {tuple(rays_o.shape)} and {tuple(rays_d.shape)}"
            )
        if rays_o.dtype != torch.float32 or rays_d.dtype != torch.float32:
            raise TypeError(f"rays must be float32, got {rays_o.dtype} and {rays_d.dtype}")
        n = rays_o.shape[0]
        if light_dir is not None:
            light_dir = torch.as_tensor(light_dir, dtype=rays_d.dtype, device=rays_d.device)
            if light_dir.shape not in ((3,), (n, 3)):
                raise ValueError(f"light_dir must be (3,) or (N, 3) with N = {n}, got {tuple(light_dir.shape)}")
            light_dir = F.normalize(light_dir.expand(n, 3), dim=-1)
        want_normals = compute_normals or shading in _NEEDS_NORMALS

        outs = []
        for start in range(0, max(n, 1), c.chunk_rays):
            sl = slice(start, start + c.chunk_rays)
            light = None if light_dir is None else light_dir[sl]
            out = self._render_chunk(
                field, rays_o[sl], rays_d[sl], shading, light, ambient, occupancy, jitter, want_normals
            )
            out["samples"]["ray_indices"] = out["samples"]["ray_indices"] + start
            outs.append(out)

        result: dict = {}
        for key in ("rgb_fg", "opacity", "depth", "normal"):
            result[key] = torch.cat([o[key] for o in outs])
        result["n_samples"] = sum(o["n_samples"] for o in outs)
        result["samples"] = {k: torch.cat([o["samples"][k] for o in outs]) for k in outs[0]["samples"]}
        bg = background(rays_d) if background is not None else torch.zeros_like(rays_d)
        rgb_fg = result.pop("rgb_fg")
        result["rgb"] = rgb_fg + (1.0 - result["opacity"])[:, None] * bg
        result["background"] = bg
        return result

    def _render_chunk(
        self,
        field: nn.Module,
        rays_o: torch.Tensor,
        rays_d: torch.Tensor,
        shading: str,
        light_dir: torch.Tensor | None,
        ambient: float,
        occupancy: OccupancyGrid | None,
        jitter: bool,
        want_normals: bool,
    ) -> dict:
        c = self.config
        n, dev, dt = rays_o.shape[0], rays_o.device, rays_o.dtype
        aabb = field.aabb.to(device=dev, dtype=dt)
        step = self.step_size(aabb)
        near, far, hit = intersect_aabb(rays_o, rays_d, aabb, c.min_near)
        near = torch.where(hit, near, torch.zeros_like(near))
        far = torch.where(hit, far, torch.zeros_like(far))
        offset = torch.rand(n, device=dev, dtype=dt) if jitter else torch.full((n,), 0.5, device=dev, dtype=dt)

        rgb_acc = rays_o.new_zeros(n, 3)
        opacity_acc = rays_o.new_zeros(n)
        depth_acc = rays_o.new_zeros(n)
        normal_acc = rays_o.new_zeros(n, 3)
        transmittance = rays_o.new_ones(n)
        per_sample: dict[str, list[torch.Tensor]] = {"ray_indices": [], "weights": [], "t": [], "albedo": []}
        if want_normals:
            per_sample["normals"] = []
        n_samples = 0

        chord = (far - near).clamp(min=0.0)
        total_steps = int(math.ceil(float(chord.max()) / step)) if n > 0 and bool(hit.any()) else 0
        alive = hit
        k_local = torch.arange(c.steps_per_pass, device=dev, dtype=dt)
        for first in range(0, total_steps, c.steps_per_pass):
            # Step k covers [near + k*step, near + (k+1)*step] clipped to far; its sample sits inside it.
            starts = near[:, None] + (first + k_local)[None] * step  # (n, K)
            deltas = torch.minimum(far[:, None] - starts, torch.full_like(starts, step))
            valid = alive[:, None] & (deltas > 0)
            deltas = torch.where(valid, deltas, torch.zeros_like(deltas))
            t = starts + offset[:, None] * deltas
            if not bool(valid.any()):
                break
            pos = rays_o[:, None] + t[..., None] * rays_d[:, None]  # (n, K, 3)
            if occupancy is not None:
                valid = valid & occupancy.occupied(pos.reshape(-1, 3)).view(n, -1)
            flat = valid.flatten().nonzero().squeeze(1)  # packed samples (M,), index into (n * K)
            m = flat.numel()
            if m > 0:
                n_samples += m
                ray_idx = torch.div(flat, c.steps_per_pass, rounding_mode="floor")
                x = pos.reshape(-1, 3).index_select(0, flat)
                d = rays_d.index_select(0, ray_idx)
                t_packed = t.flatten().index_select(0, flat)
                out = field(x, view_dirs=d)
                sigma = out["density"]

                tau_packed = sigma * deltas.flatten().index_select(0, flat)
                tau = rays_o.new_zeros(n * c.steps_per_pass).index_put((flat,), tau_packed).view(n, -1)
                excl = torch.cumsum(tau, dim=1) - tau
                t_before = (transmittance[:, None] * torch.exp(-excl)).flatten().index_select(0, flat)
                w_packed = t_before * (1.0 - torch.exp(-tau_packed))  # (M,)
                normals = self._sample_normals(field, x, sigma, w_packed) if want_normals else None
                colour = self._shade(shading, out["albedo"], normals, d, light_dir, ray_idx, ambient)
                rgb_acc = rgb_acc.index_add(0, ray_idx, w_packed[:, None] * colour)
                opacity_acc = opacity_acc.index_add(0, ray_idx, w_packed)
                depth_acc = depth_acc.index_add(0, ray_idx, w_packed * t_packed)
                if normals is not None:
                    normal_acc = normal_acc.index_add(0, ray_idx, w_packed[:, None] * normals)
                    per_sample["normals"].append(normals)
                transmittance = transmittance * torch.exp(-tau.sum(dim=1))
                per_sample["ray_indices"].append(ray_idx)
                per_sample["weights"].append(w_packed)
                per_sample["t"].append(t_packed)
                per_sample["albedo"].append(out["albedo"])
            if c.min_transmittance > 0:
                alive = alive & (transmittance.detach() > c.min_transmittance)

        samples = {
            k: torch.cat(v) if v else _empty_like_sample(k, rays_o) for k, v in per_sample.items()
        }
        return {
            "rgb_fg": rgb_acc,
            "opacity": opacity_acc,
            "depth": depth_acc,
            "normal": normal_acc,
            "n_samples": n_samples,
            "samples": samples,
        }

    def _sample_normals(self, field: nn.Module, x: torch.Tensor, sigma: torch.Tensor,
                        weights: torch.Tensor) -> torch.Tensor:
        """Normals (M, 3) of the samples that show (weight above ``min_weight``); zero for the rest.

        The extra density evaluations of the normals are most of a lit step, and the samples behind
        the surface or in its faint fringe add nothing to the image.
        """
        shown = (weights.detach() > self.config.min_weight).nonzero().squeeze(1)
        normals = field.normals(x.index_select(0, shown), mode=self.config.normal_mode,
                                density=sigma.index_select(0, shown))
        return x.new_zeros(len(x), 3).index_copy(0, shown, normals.to(x.dtype))

    @staticmethod
    def _shade(
        shading: str,
        albedo: torch.Tensor,
        normals: torch.Tensor | None,
        dirs: torch.Tensor,
        light_dir: torch.Tensor | None,
        ray_idx: torch.Tensor,
        ambient: float,
    ) -> torch.Tensor:
        """Per-sample colour (M, 3)."""
        if shading == "albedo":
            return albedo
        if normals is None:
            raise ValueError(f"shading {shading!r} needs sample normals")
        if shading == "normal":
            return 0.5 * (normals + 1.0)
        light = -dirs if light_dir is None else light_dir[ray_idx]
        diffuse = (normals * light).sum(-1, keepdim=True).clamp(min=0.0)
        lit = ambient + (1.0 - ambient) * diffuse  # (M, 1)
        if shading == "textureless":
            return lit.expand(-1, 3)
        return albedo * lit

    def render_camera(
        self, field: nn.Module, camera: Camera, background: nn.Module | None = None, **kwargs
    ) -> dict:
        """Render a whole camera; image outputs come back as (H, W, ...) (rgb (H, W, 3), opacity (H, W), ...).

        ``samples`` and ``n_samples`` are passed through (ray indices are row-major pixel indices).
        Keyword arguments go to `render`.
        """
        origins, dirs = camera_rays(camera.c2w, camera.fov_y_deg, camera.width, camera.height)
        dev = field.aabb.device
        out = self.render(field, origins.reshape(-1, 3).to(dev), dirs.reshape(-1, 3).to(dev), background, **kwargs)
        h, w = camera.height, camera.width
        for key in ("rgb", "opacity", "depth", "normal", "background"):
            out[key] = out[key].reshape(h, w, *out[key].shape[1:])
        return out


def _empty_like_sample(key: str, ref: torch.Tensor) -> torch.Tensor:
    if key == "ray_indices":
        return torch.zeros(0, dtype=torch.long, device=ref.device)
    if key in ("normals", "albedo"):
        return ref.new_zeros(0, 3)
    return ref.new_zeros(0)


def render_camera(
    field: nn.Module,
    camera: Camera,
    background: nn.Module | None = None,
    renderer: VolumeRenderer | None = None,
    **kwargs,
) -> dict:
    """`VolumeRenderer.render_camera` with a default renderer when none is given."""
    return (renderer or VolumeRenderer()).render_camera(field, camera, background, **kwargs)


def surface_albedo(field: nn.Module, points: torch.Tensor, outside: float, inside: float,
                   samples: int = 12) -> torch.Tensor:
    """The albedo a ray looking at each surface point along its inward normal shows: points (N, 3) -> (N, 3).

    The ray runs from ``outside`` in front of the point to ``inside`` behind it (world units) and
    composites the field's albedo as a render does, at ``samples`` points (12 over the bake's six grid cells:
    the vocabulary's background-hue shares as with 24, at half the draft's bake time). A surface extracted at a density level lies in the
    outer fringe that renders barely show, whose albedo blends into the background's; this reads
    the colour the renders (and so the prior) saw instead.
    """
    normals = field.normals(points)
    t = torch.linspace(outside, -inside, samples, device=points.device, dtype=points.dtype)
    delta = (outside + inside) / (samples - 1)
    out = field((points[:, None] + t[None, :, None] * normals[:, None]).reshape(-1, 3))
    alpha = 1.0 - torch.exp(-out["density"].view(len(points), samples) * delta)
    transmittance = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1.0 - alpha[:, :-1]], dim=1), dim=1)
    weights = (alpha * transmittance)[..., None]
    albedo = out["albedo"].view(len(points), samples, 3)
    # Where nothing along the ray is dense (weights ~ 0) the albedo nearest the point stands.
    own = albedo[:, int(round((samples - 1) * outside / (outside + inside)))]
    eps = 1e-6
    return ((weights * albedo).sum(1) + eps * own) / (weights.sum(1) + eps)
