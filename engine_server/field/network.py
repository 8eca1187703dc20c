"""The radiance field: a hash-grid encoding with a density MLP and an albedo MLP.

World points live in an axis-aligned scene box (default [-1, 1]^3; generated
objects sit in [-0.5, 0.5]^3) and are mapped to [0, 1]^3 for the encoder.
Density is zero outside the box.

The pre-activation density gets a "blob" bias, ``blob_density * (1 - r / blob_radius)``
with ``r`` the distance to the box centre (DreamFusion), so a freshly made field
is a soft ball that score distillation can carve, instead of empty space.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kernels.hashgrid import HashGridConfig, HashGridEncoder

logger = logging.getLogger(__name__)

DENSITY_ACTIVATIONS = ("trunc_exp", "softplus")
NORMAL_MODES = ("finite_difference", "analytic")


class _TruncExp(torch.autograd.Function):
    """exp(x) whose gradient uses exp(min(x, 15)), so a large density cannot blow up a step."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        # Written with differentiable ops, so double backward (analytic normals in a loss) works.
        return grad * torch.exp(x.clamp(max=15.0))


def trunc_exp(x: torch.Tensor) -> torch.Tensor:
    """Truncated exponential: exp forward, gradient clamped at exp(15)."""
    return _TruncExp.apply(x)


def mlp(in_dim: int, hidden: int, n_hidden_layers: int, out_dim: int) -> nn.Sequential:
    """ReLU MLP with ``n_hidden_layers`` hidden layers of width ``hidden`` (0: one linear layer)."""
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(n_hidden_layers):
        layers += [nn.Linear(dim, hidden), nn.ReLU(inplace=True)]
        dim = hidden
    layers.append(nn.Linear(dim, out_dim))
    return nn.Sequential(*layers)


@dataclass
class FieldConfig:
    """Shape of a `RadianceField`."""

    hashgrid: HashGridConfig = field(default_factory=HashGridConfig)
    """Hash-grid encoding of positions."""
    backend: str = "auto"
    """Hash-grid backend ("auto" or a name from `kernels.hashgrid.backend_names()`)."""
    aabb: tuple[float, float, float, float, float, float] = (-1.0, -1.0, -1.0, 1.0, 1.0, 1.0)
    """Scene box (xmin, ymin, zmin, xmax, ymax, zmax) in world units; density is zero outside."""
    density_hidden: int = 64
    """Width of the density MLP's hidden layers."""
    density_layers: int = 1
    """Hidden layers of the density MLP."""
    geo_feat_dim: int = 15
    """Geometry features the density MLP passes to the albedo MLP (0: none)."""
    color_hidden: int = 64
    """Width of the albedo MLP's hidden layers."""
    color_layers: int = 2
    """Hidden layers of the albedo MLP."""
    view_dependent: bool = False
    """Feed the view direction to the albedo MLP (score distillation wants it off)."""
    density_activation: str = "trunc_exp"
    """"trunc_exp" (exp with clamped gradient) or "softplus"."""
    density_shift: float = 0.0
    """Constant added to the pre-activation density."""
    blob_density: float = 5.0
    """Pre-activation density bias at the box centre (0: no blob); distillation takes it from its preset
    (``Preset.blob_density``)."""
    blob_radius: float = 0.5
    """Radius where the blob bias crosses zero; it keeps falling linearly beyond it."""
    normal_eps: float = 1e-2
    """Finite-difference step for normals, in world units."""

    def __post_init__(self) -> None:
        if self.density_activation not in DENSITY_ACTIVATIONS:
            raise ValueError(
                f"density_activation must be one of {', '.join(DENSITY_ACTIVATIONS)}, got {self.density_activation!r}"
            )
        if len(self.aabb) != 6 or any(self.aabb[i] >= self.aabb[i + 3] for i in range(3)):
            raise ValueError(f"aabb must be (xmin, ymin, zmin, xmax, ymax, zmax) with min < max, got {self.aabb}")
        if self.blob_radius <= 0:
            raise ValueError(f"blob_radius must be > 0, got {self.blob_radius}")
        if self.normal_eps <= 0:
            raise ValueError(f"normal_eps must be > 0, got {self.normal_eps}")
        for name in ("density_hidden", "color_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("density_layers", "color_layers", "geo_feat_dim"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


class RadianceField(nn.Module):
    """Density and view-independent albedo at world points.

    The interface the renderer relies on (any object with it can be rendered):
    ``aabb`` (2, 3), ``density(x)``, ``forward(x, view_dirs)`` and ``normals(x, mode)``.
    """

    def __init__(self, config: FieldConfig | None = None) -> None:
        super().__init__()
        self.config = c = config or FieldConfig()
        self.register_buffer("aabb", torch.tensor(c.aabb, dtype=torch.float32).view(2, 3), persistent=False)
        self.encoder = HashGridEncoder(c.hashgrid, backend=c.backend)
        enc_dim = self.encoder.output_dim
        self.density_net = mlp(enc_dim, c.density_hidden, c.density_layers, 1 + c.geo_feat_dim)
        color_in = enc_dim + c.geo_feat_dim + (3 if c.view_dependent else 0)
        self.color_net = mlp(color_in, c.color_hidden, c.color_layers, 3)

    # -- geometry -----------------------------------------------------------------------------

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """World points (N, 3) -> box coordinates in [0, 1]^3 (unclamped)."""
        lo, hi = self.aabb[0], self.aabb[1]
        return (x - lo) / (hi - lo)

    def blob_bias(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3) -> (N,) pre-activation bias: blob_density * (1 - r / blob_radius) + density_shift."""
        c = self.config
        centre = 0.5 * (self.aabb[0] + self.aabb[1])
        bias = torch.full_like(x[:, 0], c.density_shift)
        if c.blob_density != 0.0:
            r = (x - centre).norm(dim=-1)
            bias = bias + c.blob_density * (1.0 - r / c.blob_radius)
        return bias

    def activate(self, raw: torch.Tensor) -> torch.Tensor:
        if self.config.density_activation == "trunc_exp":
            return trunc_exp(raw)
        return F.softplus(raw)

    def _check_points(self, x: torch.Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != 3:
            raise ValueError(f"field points must be (N, 3), got {tuple(x.shape)}")
        if x.dtype != torch.float32:
            raise TypeError(f"field points must be float32, got {x.dtype}")

    def _density_and_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, 3) -> density (N,), encoding (N, E), geometry features (N, G)."""
        self._check_points(x)
        u = self.normalize(x)
        inside = ((u >= 0.0) & (u <= 1.0)).all(dim=-1)
        enc = self.encoder(u.clamp(0.0, 1.0))
        h = self.density_net(enc)
        sigma = self.activate(h[:, 0] + self.blob_bias(x))
        sigma = torch.where(inside, sigma, torch.zeros_like(sigma))
        return sigma, enc, h[:, 1:]

    def density(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3) world points -> (N,) density (zero outside the box)."""
        return self._density_and_features(x)[0]

    def forward(self, x: torch.Tensor, view_dirs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """x: (N, 3) world points; view_dirs: (N, 3) unit ray directions (only used if view_dependent).

        Returns density (N,), albedo (N, 3) in [0, 1], geo_feat (N, G).
        """
        sigma, enc, geo = self._density_and_features(x)
        parts = [enc, geo]
        if self.config.view_dependent:
            if view_dirs is None:
                raise ValueError("this field is view dependent: forward() needs view_dirs (N, 3)")
            parts.append(view_dirs.to(enc.dtype))
        albedo = torch.sigmoid(self.color_net(torch.cat(parts, dim=-1)))
        return {"density": sigma, "albedo": albedo, "geo_feat": geo}

    def normals(self, x: torch.Tensor, mode: str = "finite_difference",
                density: torch.Tensor | None = None) -> torch.Tensor:
        """x: (N, 3) -> (N, 3) outward unit normals, -grad(density) normalized (zero where flat).

        "finite_difference": differences over ``normal_eps`` either side of x (central), or, when
        the caller already has ``density`` (N,) at x, over ``normal_eps`` ahead of x (forward: half
        the density evaluations, the normal of a point ``normal_eps / 2`` away); works with every
        hash-grid backend and is differentiable w.r.t. the field parameters.
        "analytic": autograd w.r.t. x; differentiable w.r.t. the parameters when grad mode
        is on (needs a backend with double backward).
        """
        self._check_points(x)
        if mode == "finite_difference":
            return normals_finite_difference(self.density, x, self.config.normal_eps, density)
        if mode == "analytic":
            return normals_analytic(self.density, x)
        raise ValueError(f"normal mode must be one of {', '.join(NORMAL_MODES)}, got {mode!r}")


def normals_finite_difference(density_fn, x: torch.Tensor, eps: float,
                              density: torch.Tensor | None = None) -> torch.Tensor:
    """Outward normals from differences of ``density_fn`` in one batched call: central (6N points), or
    forward from the given ``density`` at x (3N points)."""
    offsets = torch.eye(3, device=x.device, dtype=x.dtype) * eps  # (3, 3)
    if density is None:
        probes = torch.cat([x[None] + offsets[:, None], x[None] - offsets[:, None]], dim=0)  # (6, N, 3)
        d = density_fn(probes.reshape(-1, 3)).view(2, 3, -1)  # (+/-, axis, N)
        grad = ((d[0] - d[1]) / (2.0 * eps)).t()  # (N, 3)
    else:
        d = density_fn((x[None] + offsets[:, None]).reshape(-1, 3)).view(3, -1)  # (axis, N)
        grad = ((d - density.to(d.dtype)[None]) / eps).t()
    return F.normalize(-grad, dim=-1, eps=1e-12)


def normals_analytic(density_fn, x: torch.Tensor) -> torch.Tensor:
    """Outward normals from the autograd gradient of ``density_fn`` w.r.t. x."""
    create_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        d = density_fn(xg)
        (grad,) = torch.autograd.grad(d.sum(), xg, create_graph=create_graph)
    return F.normalize(-grad, dim=-1, eps=1e-12)
