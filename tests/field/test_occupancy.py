"""OccupancyGrid: cell lookup, update schedule, running estimate, thresholding."""
from __future__ import annotations

import math

import pytest
import torch

from engine_server.field import OccupancyConfig, OccupancyGrid


def ball_density(x: torch.Tensor, radius: float = 0.3) -> torch.Tensor:
    return torch.where(x.norm(dim=-1) < radius, 50.0, 0.0)


def test_fresh_grid_is_fully_occupied_inside_the_box_only():
    grid = OccupancyGrid(OccupancyConfig(resolution=8))
    inside = torch.rand(100, 3) * 2 - 1
    outside = inside + torch.tensor([0.0, 0.0, 2.5])
    assert bool(grid.occupied(inside).all())
    assert not bool(grid.occupied(outside).any())
    assert grid.stats()["occupied_fraction"] == 1.0


def test_update_marks_the_cells_of_a_ball():
    grid = OccupancyGrid(OccupancyConfig(resolution=32, threshold=1.0))
    assert grid.update(ball_density, step=0)
    centre_cells = torch.rand(200, 3) * 0.3 - 0.15  # well inside the ball: every probe hits it
    far_away = torch.rand(200, 3) * 0.4 + 0.55  # a corner of the box
    assert bool(grid.occupied(centre_cells).all())
    assert not bool(grid.occupied(far_away).any())
    ball_fraction = (4 / 3 * math.pi * 0.3**3) / 8.0
    frac = grid.stats()["occupied_fraction"]
    assert 0.5 * ball_fraction < frac < 2.0 * ball_fraction


def test_update_runs_only_every_k_steps_unless_forced():
    grid = OccupancyGrid(OccupancyConfig(resolution=8, update_every=4))
    assert not grid.update(ball_density, step=3)
    assert grid.stats()["updates"] == 0
    assert grid.update(ball_density, step=8)
    assert grid.update(ball_density, step=9, force=True)
    assert grid.stats()["updates"] == 2


def test_estimate_decays_when_density_drops_and_follows_increases():
    cfg = OccupancyConfig(resolution=4, decay=0.9, subset_fraction=1.0)
    grid = OccupancyGrid(cfg)
    grid.update(lambda x: torch.full_like(x[:, 0], 10.0), step=0)
    torch.testing.assert_close(grid.density_grid, torch.full((4, 4, 4), 10.0))
    grid.update(lambda x: torch.zeros_like(x[:, 0]), step=1, force=True)
    torch.testing.assert_close(grid.density_grid, torch.full((4, 4, 4), 9.0))
    grid.update(lambda x: torch.full_like(x[:, 0], 20.0), step=2, force=True)
    torch.testing.assert_close(grid.density_grid, torch.full((4, 4, 4), 20.0))


def test_threshold_is_capped_by_the_mean_density():
    # Everything is faint (density 0.01 << threshold 1), but a brighter region still stands out.
    grid = OccupancyGrid(OccupancyConfig(resolution=16, threshold=1.0))
    grid.update(lambda x: torch.where(x[:, 0] > 0, 0.05, 0.01), step=0)
    stats = grid.stats()
    assert stats["threshold"] < 0.05
    assert abs(stats["occupied_fraction"] - 0.5) < 1e-6


def test_subset_updates_after_warm_up_keep_probing_occupied_cells():
    grid = OccupancyGrid(OccupancyConfig(resolution=16, warmup_steps=1, subset_fraction=0.1, update_every=1))
    grid.update(ball_density, step=0)
    before = grid.binary.clone()
    calls = []

    def counting(x):
        calls.append(x.shape[0])
        return ball_density(x)

    grid.update(counting, step=5)
    assert sum(calls) < 16**3 * 0.2  # a subset, not every cell
    assert sum(calls) >= int(before.sum())  # but every occupied cell was probed
    assert torch.equal(grid.binary, before)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="subset_fraction"):
        OccupancyConfig(subset_fraction=0.0)
    with pytest.raises(ValueError, match="aabb"):
        OccupancyGrid(aabb=(0, 0, 0, 1, -1, 1))
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        OccupancyGrid().occupied(torch.zeros(3))
