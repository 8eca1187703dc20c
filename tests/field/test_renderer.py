"""VolumeRenderer: ray/box clipping, compositing against closed forms, chunking, shading, gradients."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine_server.cameras import Camera, look_at, orbit_camera
from engine_server.field import (
    FieldConfig,
    FixedBackground,
    MLPBackground,
    RadianceField,
    RendererConfig,
    VolumeRenderer,
    intersect_aabb,
    render_camera,
)
from engine_server.field.network import normals_analytic, normals_finite_difference
from kernels.hashgrid import HashGridConfig

SMALL_GRID = HashGridConfig(n_levels=4, n_features=2, log2_table_size=12, base_resolution=8, max_resolution=64)


class ConstantBox(nn.Module):
    """Constant density and colour filling the whole box."""

    def __init__(self, sigma: float, rgb=(0.2, 0.6, 0.9), half: float = 0.5) -> None:
        super().__init__()
        self.register_buffer("aabb", torch.tensor([[-half] * 3, [half] * 3]))
        self.sigma, self.rgb = sigma, torch.tensor(rgb)

    def forward(self, x, view_dirs=None):
        return {"density": torch.full_like(x[:, 0], self.sigma), "albedo": self.rgb.expand_as(x)}

    def normals(self, x, mode="finite_difference", density=None):
        raise AssertionError("not needed")


class Ball(nn.Module):
    """An opaque ball of radius 0.3 with a soft edge; albedo 0.8 grey."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("aabb", torch.tensor([[-1.0] * 3, [1.0] * 3]))

    def density(self, x):
        return 200.0 * torch.sigmoid((0.3 - x.norm(dim=-1)) / 0.01)

    def forward(self, x, view_dirs=None):
        return {"density": self.density(x), "albedo": torch.full_like(x, 0.8)}

    def normals(self, x, mode="finite_difference", density=None):
        self.normal_points = getattr(self, "normal_points", 0) + len(x)
        if mode == "analytic":
            return normals_analytic(self.density, x)
        return normals_finite_difference(self.density, x, 1e-3, density)


def small_field() -> RadianceField:
    return RadianceField(FieldConfig(hashgrid=SMALL_GRID, density_hidden=16, color_hidden=16, geo_feat_dim=3))


def test_intersect_aabb_slab_test():
    aabb = torch.tensor([[-1.0] * 3, [1.0] * 3])
    o = torch.tensor([[0.0, -3.0, 0.0], [0.0, -3.0, 0.0], [0.2, 0.1, 0.0], [5.0, 5.0, 5.0], [0.0, -3.0, 2.0]])
    d = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    d = F.normalize(d, dim=-1)
    near, far, hit = intersect_aabb(o, d, aabb)
    assert hit.tolist() == [True, False, True, False, False]
    torch.testing.assert_close(near[0], torch.tensor(2.0))
    torch.testing.assert_close(far[0], torch.tensor(4.0))
    torch.testing.assert_close(near[2], torch.tensor(0.0))  # starts inside: clipped to min_near
    torch.testing.assert_close(far[2], torch.tensor(0.8))


def test_rays_that_miss_the_box_get_background_and_zero_opacity():
    field = small_field()  # blob init: dense in the middle
    bg = FixedBackground((0.1, 0.5, 0.9))
    # A camera at the side looking away from the box, and one looking at it.
    away = Camera(look_at((0.0, -3.0, 0.0), (0.0, -6.0, 0.0)), 40.0, 8, 8)
    toward = orbit_camera(0.0, 0.0, 3.0, 40.0, 8)
    r = VolumeRenderer(RendererConfig(num_steps=64))
    with torch.no_grad():
        out = r.render_camera(field, away, bg)
        seen = r.render_camera(field, toward, bg)
    assert out["n_samples"] == 0
    assert float(out["opacity"].abs().max()) == 0.0
    torch.testing.assert_close(out["rgb"], bg.rgb.expand(8, 8, 3))
    assert float(seen["opacity"][4, 4]) > 0.99 and seen["n_samples"] > 0


def test_constant_density_matches_beer_lambert_opacity_and_depth():
    sigma = 3.0
    box = ConstantBox(sigma)
    torch.manual_seed(1)
    o = F.normalize(torch.randn(300, 3), dim=-1) * 2.0
    d = F.normalize(-o + 0.3 * torch.randn(300, 3), dim=-1)
    near, far, hit = intersect_aabb(o, d, box.aabb)
    r = VolumeRenderer(RendererConfig(num_steps=400, min_transmittance=0.0))
    out = r.render(box, o, d, FixedBackground((0.0, 0.0, 0.0)), jitter=True)
    chord = torch.where(hit, far - near, torch.zeros_like(far))
    expected_opacity = 1.0 - torch.exp(-sigma * chord)
    torch.testing.assert_close(out["opacity"], expected_opacity, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["rgb"], expected_opacity[:, None] * box.rgb, atol=1e-5, rtol=1e-5)
    # E[t] = near (1 - e^{-sL}) + (1 - e^{-sL}) / s - L e^{-sL}, on hit rays.
    e = torch.exp(-sigma * chord)
    expected_depth = torch.where(hit, near * (1 - e) + (1 - e) / sigma - chord * e, torch.zeros_like(e))
    step = r.step_size(box.aabb)
    assert float((out["depth"] - expected_depth).abs().max()) < step
    assert hit.sum() > 100 and (~hit).sum() > 10


def test_chunking_and_passes_do_not_change_the_result():
    field = small_field()
    cam = orbit_camera(30.0, 20.0, 2.5, 40.0, 10)
    big = VolumeRenderer(RendererConfig(num_steps=64, chunk_rays=4096, steps_per_pass=64))
    small = VolumeRenderer(RendererConfig(num_steps=64, chunk_rays=7, steps_per_pass=5))
    with torch.no_grad():
        a = big.render_camera(field, cam, FixedBackground(), shading="lambertian")
        b = small.render_camera(field, cam, FixedBackground(), shading="lambertian")
    for key in ("rgb", "opacity", "depth", "normal"):
        torch.testing.assert_close(a[key], b[key], atol=2e-5, rtol=1e-4)
    # Early termination differs only in when rays stop, which pass boundaries decide.
    assert abs(a["n_samples"] - b["n_samples"]) < 0.2 * a["n_samples"]


def test_early_termination_saves_samples_on_opaque_surfaces():
    ball = Ball()
    cam = orbit_camera(0.0, 10.0, 2.0, 15.0, 16)  # every ray hits the ball
    full = VolumeRenderer(RendererConfig(num_steps=256, min_transmittance=0.0, steps_per_pass=8))
    early = VolumeRenderer(RendererConfig(num_steps=256, min_transmittance=1e-4, steps_per_pass=8))
    a = full.render_camera(ball, cam, FixedBackground())
    b = early.render_camera(ball, cam, FixedBackground())
    assert b["n_samples"] < 0.8 * a["n_samples"]
    assert float((a["rgb"] - b["rgb"]).abs().max()) < 1e-3


def test_per_sample_outputs_add_up_to_the_ray_outputs():
    ball = Ball()
    cam = orbit_camera(45.0, 20.0, 2.0, 40.0, 10)
    r = VolumeRenderer(RendererConfig(num_steps=128, chunk_rays=33))
    out = r.render_camera(ball, cam, FixedBackground(), compute_normals=True)
    s = out["samples"]
    m = out["n_samples"]
    assert s["ray_indices"].shape == (m,) and s["weights"].shape == (m,) and s["normals"].shape == (m, 3)
    assert int(s["ray_indices"].max()) < 100
    opacity = torch.zeros(100).index_add(0, s["ray_indices"], s["weights"])
    torch.testing.assert_close(opacity, out["opacity"].reshape(-1), atol=1e-5, rtol=1e-5)
    depth = torch.zeros(100).index_add(0, s["ray_indices"], s["weights"] * s["t"])
    torch.testing.assert_close(depth, out["depth"].reshape(-1), atol=1e-5, rtol=1e-5)


def test_shading_modes_on_a_ball_seen_from_the_front():
    ball = Ball()
    cam = orbit_camera(0.0, 0.0, 2.0, 30.0, 15)  # on -Y looking at +Y
    r = VolumeRenderer(RendererConfig(num_steps=256, ambient=0.2))
    bg = FixedBackground((0.0, 0.0, 0.0))
    normal = r.render_camera(ball, cam, bg, shading="normal")
    centre = normal["normal"][7, 7]
    assert float(F.cosine_similarity(centre, torch.tensor([0.0, -1.0, 0.0]), dim=0)) > 0.99
    torch.testing.assert_close(normal["rgb"][7, 7], torch.tensor([0.5, 0.0, 0.5]), atol=0.02, rtol=0)
    # Headlight: the centre faces the light fully; the rim is darker but at least ambient.
    lit = r.render_camera(ball, cam, bg, shading="lambertian")
    assert abs(float(lit["rgb"][7, 7, 0]) - 0.8) < 0.02
    plain = r.render_camera(ball, cam, bg, shading="textureless")
    assert abs(float(plain["rgb"][7, 7, 1]) - 1.0) < 0.02
    mask = plain["opacity"] > 0.99
    assert float(plain["rgb"][..., 0][mask].min()) >= 0.2 - 1e-4
    # A light from behind leaves only the ambient term on the visible side.
    back = r.render_camera(ball, cam, bg, shading="textureless", light_dir=torch.tensor([0.0, 1.0, 0.0]))
    assert abs(float(back["rgb"][7, 7, 0]) - 0.2) < 0.02
    # The analytic normal mode gives the same picture as finite differences.
    r_an = VolumeRenderer(RendererConfig(num_steps=256, ambient=0.2, normal_mode="analytic"))
    an = r_an.render_camera(ball, cam, bg, shading="normal")
    assert float((an["rgb"].detach() - normal["rgb"]).abs().max()) < 0.02


def test_lit_renders_take_normals_only_where_samples_show():
    cam = orbit_camera(30.0, 20.0, 2.0, 40.0, 16)
    images, counts = {}, {}
    for min_weight in (0.0, 1e-4):
        ball = Ball()
        r = VolumeRenderer(RendererConfig(num_steps=256, min_transmittance=0.0, min_weight=min_weight))
        out = r.render_camera(ball, cam, FixedBackground(), shading="lambertian", compute_normals=True)
        images[min_weight], counts[min_weight] = out["rgb"], ball.normal_points
        hidden = out["samples"]["weights"] <= min_weight
        assert bool(hidden.any()) and float(out["samples"]["normals"][hidden].abs().max()) == 0.0
    shown = out["samples"]["normals"][~hidden].norm(dim=-1)
    torch.testing.assert_close(shown, torch.ones_like(shown))
    assert counts[1e-4] < 0.5 * counts[0.0]  # the faint fringe gets none either
    assert float((images[1e-4] - images[0.0]).abs().max()) < 2e-3


def test_rendering_is_differentiable_wrt_field_and_background():
    field = small_field()
    bg = MLPBackground()
    out = render_camera(field, orbit_camera(10.0, 15.0, 2.5, 50.0, 8), bg, VolumeRenderer(RendererConfig(num_steps=48)),
                        jitter=True, shading="lambertian")
    assert out["rgb"].shape == (8, 8, 3) and out["opacity"].shape == (8, 8) and out["depth"].shape == (8, 8)
    assert out["normal"].shape == (8, 8, 3)
    out["rgb"].mean().backward()
    assert float(field.encoder.table.grad.abs().sum()) > 0
    assert all(p.grad is not None for p in field.density_net.parameters())
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in bg.parameters())


def test_bad_inputs_are_refused():
    field, r = small_field(), VolumeRenderer()
    o, d = torch.zeros(4, 3), torch.ones(4, 3)
    with pytest.raises(ValueError, match="shading"):
        r.render(field, o, d, shading="phong")
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        r.render(field, o[:, :2], d[:, :2])
    with pytest.raises(ValueError, match="light_dir"):
        r.render(field, o, d, shading="lambertian", light_dir=torch.ones(3, 3))
    with pytest.raises(ValueError, match="num_steps"):
        RendererConfig(num_steps=0)


def test_empty_ray_batch():
    out = VolumeRenderer().render(small_field(), torch.zeros(0, 3), torch.zeros(0, 3), FixedBackground())
    assert out["rgb"].shape == (0, 3) and out["opacity"].shape == (0,) and out["n_samples"] == 0
    assert math.isclose(float(out["opacity"].sum()), 0.0)
