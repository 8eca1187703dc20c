"""surface_albedo reads the colour renders show at a surface extracted in a field's soft fringe."""
from __future__ import annotations

import torch
from torch import nn

from engine_server.field import surface_albedo
from engine_server.field.network import normals_finite_difference

RED, CYAN = torch.tensor([0.85, 0.1, 0.1]), torch.tensor([0.0, 0.75, 0.75])


class FringedBall(nn.Module):
    """A ball of radius ~0.3 with a soft fringe, red where dense, background cyan in the thin outer fringe.

    Density 200 sigmoid((0.3 - r) / 0.01); the albedo turns cyan beyond r = 0.3 + 0.01 ln 24 (density 8).
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("aabb", torch.tensor([[-1.0] * 3, [1.0] * 3]))

    def density(self, x):
        return 200.0 * torch.sigmoid((0.3 - x.norm(dim=-1)) / 0.01)

    def forward(self, x, view_dirs=None):
        red = (self.density(x)[:, None] > 8.0).float()
        return {"density": self.density(x), "albedo": red * RED + (1 - red) * CYAN}

    def normals(self, x, mode="finite_difference", density=None):
        return normals_finite_difference(self.density, x, 1e-3)


def _sphere_points(radius: float, n: int = 200) -> torch.Tensor:
    d = torch.nn.functional.normalize(torch.randn(n, 3, generator=torch.Generator().manual_seed(0)), dim=-1)
    return radius * d


def test_a_surface_in_the_fringe_gets_the_colour_behind_it():
    field = FringedBall()
    # Density 2 (a level an extraction threshold lands on) lies at r = 0.3 + 0.01 ln 99: albedo cyan there.
    points = _sphere_points(0.3 + 0.01 * torch.log(torch.tensor(99.0)).item())
    assert torch.allclose(field(points)["albedo"], CYAN.expand(len(points), 3))
    seen = surface_albedo(field, points, outside=0.08, inside=0.16)
    assert (seen - RED).abs().max() < 0.15, seen[:3]  # the fringe keeps about a tenth of the weight


def test_where_nothing_is_dense_the_points_own_albedo_stands():
    field = FringedBall()
    points = _sphere_points(0.9)  # far outside: weights vanish along the whole ray
    seen = surface_albedo(field, points, outside=0.05, inside=0.1)
    assert torch.allclose(seen, CYAN.expand(len(points), 3), atol=1e-3)
