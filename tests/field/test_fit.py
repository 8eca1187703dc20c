"""End to end: fit a RadianceField to views of an analytic coloured scene; empty-space skipping.

The scene (a sphere whose colour varies with position, and an orange cube) is
rendered by the same VolumeRenderer at a high step count. Training composites on
a random background colour per step, so empty space must become transparent
rather than take the background's colour.
"""
from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from engine_server.cameras import orbit_camera
from engine_server.field import (
    FieldConfig,
    FixedBackground,
    OccupancyConfig,
    OccupancyGrid,
    RadianceField,
    RendererConfig,
    VolumeRenderer,
)
from kernels.hashgrid import HashGridConfig

pytestmark = pytest.mark.slow  # every test reads one fitted field (about 6 s)

RES = 32
STEPS = 120
BATCH = 512
TRAIN_VIEWS = [(az, 10.0 if i % 2 == 0 else 35.0) for i, az in enumerate(range(0, 360, 30))]  # 12 views
TEST_VIEWS = [(15.0, 22.0), (105.0, 22.0), (195.0, 22.0), (285.0, 22.0)]  # azimuths never trained on


class AnalyticScene(nn.Module):
    """A sphere coloured by position and a constant-colour cube, with soft (1 cm) surfaces."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("aabb", torch.tensor([[-1.0] * 3, [1.0] * 3]))
        self.sphere_centre, self.sphere_radius = torch.tensor([-0.15, 0.05, 0.0]), 0.28
        self.cube_centre, self.cube_half = torch.tensor([0.22, -0.12, -0.12]), 0.15
        self.cube_rgb = torch.tensor([0.9, 0.5, 0.1])

    def sdfs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sphere = (x - self.sphere_centre).norm(dim=-1) - self.sphere_radius
        q = (x - self.cube_centre).abs() - self.cube_half
        cube = q.clamp(min=0).norm(dim=-1) + q.amax(-1).clamp(max=0)
        return sphere, cube

    def density(self, x: torch.Tensor) -> torch.Tensor:
        sphere, cube = self.sdfs(x)
        return 60.0 * torch.sigmoid(-torch.minimum(sphere, cube) / 0.01)

    def forward(self, x: torch.Tensor, view_dirs: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        sphere, cube = self.sdfs(x)
        sphere_rgb = (0.5 + 0.45 * (x - self.sphere_centre) / self.sphere_radius).clamp(0, 1)
        albedo = torch.where((sphere < cube)[:, None], sphere_rgb, self.cube_rgb.expand_as(x))
        return {"density": self.density(x), "albedo": albedo}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(-10.0 * torch.log10(((a - b) ** 2).mean()))


@pytest.fixture(scope="module")
def fitted():
    """Train once for the tests of this module; returns everything they need."""
    torch.manual_seed(0)
    scene = AnalyticScene()
    cams = [orbit_camera(az, el, 2.2, 40.0, RES) for az, el in TRAIN_VIEWS]
    test_cams = [orbit_camera(az, el, 2.2, 40.0, RES) for az, el in TEST_VIEWS]
    gt_renderer = VolumeRenderer(RendererConfig(num_steps=384))
    with torch.no_grad():  # premultiplied colour + opacity, composited on any background later
        gt = [gt_renderer.render_camera(scene, c, None) for c in cams]
        gt_test = [gt_renderer.render_camera(scene, c, None) for c in test_cams]
    target = torch.cat([torch.cat([g["rgb"], g["opacity"][..., None]], -1).reshape(-1, 4) for g in gt])
    rays = [c.rays() for c in cams]
    rays_o = torch.cat([o.reshape(-1, 3) for o, _ in rays])
    rays_d = torch.cat([d.reshape(-1, 3) for _, d in rays])

    field = RadianceField(
        FieldConfig(
            hashgrid=HashGridConfig(
                n_levels=8, n_features=2, log2_table_size=14, base_resolution=8, max_resolution=128
            ),
            density_hidden=32,
            density_layers=1,
            geo_feat_dim=7,
            color_hidden=32,
            color_layers=1,
        )
    )
    occupancy = OccupancyGrid(
        OccupancyConfig(resolution=32, update_every=8, warmup_steps=64, threshold=0.05), aabb=field.aabb
    )
    renderer = VolumeRenderer(RendererConfig(num_steps=128))
    optimizer = torch.optim.Adam(
        [
            {"params": field.encoder.parameters(), "lr": 2e-2},
            {"params": [*field.density_net.parameters(), *field.color_net.parameters()], "lr": 5e-3},
        ],
        betas=(0.9, 0.99),
        eps=1e-15,
    )
    start = time.perf_counter()
    for step in range(STEPS):
        occupancy.update(field.density, step)
        idx = torch.randint(0, rays_o.shape[0], (BATCH,))
        colour = torch.rand(3)
        out = renderer.render(
            field, rays_o[idx], rays_d[idx], FixedBackground(colour), occupancy=occupancy, jitter=True
        )
        want = target[idx, :3] + (1.0 - target[idx, 3:]) * colour
        loss = ((out["rgb"] - want) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    occupancy.update(field.density, STEPS, force=True)
    field.eval()
    return {
        "field": field,
        "occupancy": occupancy,
        "renderer": renderer,
        "test_cams": test_cams,
        "gt_test": [g["rgb"] + (1.0 - g["opacity"][..., None]) for g in gt_test],  # on white
        "train_seconds": time.perf_counter() - start,
    }


def test_fit_reaches_25db_on_held_out_views(fitted):
    white = FixedBackground((1.0, 1.0, 1.0))
    scores = []
    with torch.no_grad():
        for cam, gt in zip(fitted["test_cams"], fitted["gt_test"]):
            out = fitted["renderer"].render_camera(fitted["field"], cam, white, occupancy=fitted["occupancy"])
            scores.append(psnr(out["rgb"], gt))
    print(f"held-out PSNR {[round(s, 2) for s in scores]} after {fitted['train_seconds']:.1f} s of training")
    assert min(scores) >= 25.0


def test_occupancy_grid_cuts_samples_without_changing_the_image(fitted):
    field, renderer, trained = fitted["field"], fitted["renderer"], fitted["occupancy"]
    fresh = OccupancyGrid(trained.config, aabb=field.aabb)  # before any update: all occupied
    white = FixedBackground((1.0, 1.0, 1.0))
    with torch.no_grad():
        for cam in fitted["test_cams"][:2]:
            none = renderer.render_camera(field, cam, white)
            before = renderer.render_camera(field, cam, white, occupancy=fresh)
            after = renderer.render_camera(field, cam, white, occupancy=trained)
            assert before["n_samples"] == none["n_samples"]
            print(f"samples per image: {none['n_samples']} without the grid, {after['n_samples']} with it")
            assert after["n_samples"] < 0.5 * none["n_samples"]
            assert psnr(after["rgb"], none["rgb"]) > 40.0
            assert float((after["rgb"] - none["rgb"]).abs().max()) < 1e-2
    assert trained.stats()["occupied_fraction"] < 0.5
