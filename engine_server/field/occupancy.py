"""Occupancy grid for empty-space skipping (Instant-NGP).

A coarse grid over the scene box keeps a running density estimate per cell.
Every ``update_every`` steps some cells are probed at one random point each and
their estimate becomes ``max(decay * old, new)`` (the decaying running maximum
Instant-NGP calls an EMA: it follows shrinking density without letting one unlucky
probe empty a cell). A cell is occupied when its estimate exceeds
``min(mean estimate, threshold)``. The renderer evaluates the field only at
samples in occupied cells.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

logger = logging.getLogger(__name__)

DensityFn = Callable[[torch.Tensor], torch.Tensor]
"""World points (M, 3) -> densities (M,)."""


@dataclass
class OccupancyConfig:
    """Shape and update rule of an `OccupancyGrid`."""

    resolution: int = 64
    """Cells per axis."""
    update_every: int = 16
    """Steps between updates (`update` is a no-op on other steps)."""
    decay: float = 0.95
    """Per-update decay of the running density estimate."""
    threshold: float = 1.0
    """Density above which a cell is occupied (capped by the mean estimate)."""
    warmup_steps: int = 256
    """Before this step every update probes all cells."""
    subset_fraction: float = 0.25
    """After warm-up, the fraction of cells probed per update (plus every occupied cell); 1: all."""
    eval_chunk: int = 65536
    """Points per density evaluation during an update."""

    def __post_init__(self) -> None:
        if self.resolution < 1 or self.update_every < 1 or self.eval_chunk < 1:
            raise ValueError(
                f"resolution, update_every and eval_chunk must be >= 1, got "
                f"{self.resolution}, {self.update_every}, {self.eval_chunk}"
            )
        if not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {self.decay}")
        if not 0.0 < self.subset_fraction <= 1.0:
            raise ValueError(f"subset_fraction must be in (0, 1], got {self.subset_fraction}")
        if self.threshold < 0:
            raise ValueError(f"threshold must be >= 0, got {self.threshold}")


class OccupancyGrid(nn.Module):
    """Binary occupancy over the scene box; everything is occupied until the first update."""

    def __init__(
        self, config: OccupancyConfig | None = None, aabb: torch.Tensor | tuple[float, ...] = (-1, -1, -1, 1, 1, 1)
    ) -> None:
        super().__init__()
        self.config = c = config or OccupancyConfig()
        aabb = torch.as_tensor(aabb, dtype=torch.float32).reshape(2, 3)
        if not bool((aabb[0] < aabb[1]).all()):
            raise ValueError(f"occupancy aabb needs min < max per axis, got {aabb.tolist()}")
        r = c.resolution
        self.register_buffer("aabb", aabb.clone())
        self.register_buffer("density_grid", torch.zeros(r, r, r))
        self.register_buffer("binary", torch.ones(r, r, r, dtype=torch.bool))
        self.register_buffer("n_updates", torch.zeros((), dtype=torch.long))

    @property
    def resolution(self) -> int:
        return self.config.resolution

    def cell_of(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (N, 3) world -> integer cells (N, 3) (clamped) and whether x is inside the box (N,)."""
        u = (x - self.aabb[0]) / (self.aabb[1] - self.aabb[0])
        inside = ((u >= 0.0) & (u <= 1.0)).all(dim=-1)
        cell = (u * self.resolution).floor().long().clamp(0, self.resolution - 1)
        return cell, inside

    @torch.no_grad()
    def occupied(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, 3) world points -> (N,) bool; False outside the box."""
        if x.dim() != 2 or x.shape[1] != 3:
            raise ValueError(f"occupancy query points must be (N, 3), got {tuple(x.shape)}")
        cell, inside = self.cell_of(x)
        return self.binary[cell[:, 0], cell[:, 1], cell[:, 2]] & inside

    @torch.no_grad()
    def update(self, density_fn: DensityFn, step: int, force: bool = False) -> bool:
        """Probe cells with ``density_fn`` if ``step`` is an update step (or ``force``); True if updated."""
        c = self.config
        if not force and step % c.update_every != 0:
            return False
        r = c.resolution
        n_cells = r**3
        dev = self.density_grid.device
        if step < c.warmup_steps or c.subset_fraction >= 1.0 or int(self.n_updates) == 0:
            cells = torch.arange(n_cells, device=dev)
        else:
            n_random = max(1, int(n_cells * c.subset_fraction))
            random_cells = torch.randint(0, n_cells, (n_random,), device=dev)
            cells = torch.unique(torch.cat([random_cells, self.binary.flatten().nonzero().squeeze(1)]))
        ijk = torch.stack([cells // (r * r), (cells // r) % r, cells % r], dim=-1)  # (M, 3)
        cell_size = (self.aabb[1] - self.aabb[0]) / r
        points = self.aabb[0] + (ijk.float() + torch.rand(ijk.shape, device=dev)) * cell_size
        new = torch.cat([density_fn(p).float().reshape(-1) for p in points.split(c.eval_chunk)])
        flat = self.density_grid.view(-1)
        flat[cells] = torch.maximum(flat[cells] * c.decay, new.clamp(min=0.0))
        # Cells not probed this time decay too, so stale estimates fade.
        if cells.numel() < n_cells:
            probed = torch.zeros(n_cells, dtype=torch.bool, device=dev)
            probed[cells] = True
            flat[~probed] *= c.decay
        mean = self.density_grid.mean()
        threshold = torch.clamp(mean, max=c.threshold)
        self.binary = self.density_grid > threshold
        self.n_updates += 1
        return True

    def stats(self) -> dict[str, float]:
        """Occupied fraction, mean density estimate, effective threshold and update count."""
        mean = float(self.density_grid.mean())
        return {
            "occupied_fraction": float(self.binary.float().mean()),
            "mean_density": mean,
            "threshold": min(mean, self.config.threshold),
            "updates": int(self.n_updates),
        }
