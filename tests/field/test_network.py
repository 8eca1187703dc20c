"""RadianceField: activations, blob initialisation, normals, box masking; backgrounds."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine_server.field import FieldConfig, FixedBackground, MLPBackground, MLPBackgroundConfig, RadianceField
from engine_server.field.network import normals_analytic, normals_finite_difference, trunc_exp
from kernels.hashgrid import HashGridConfig

SMALL_GRID = HashGridConfig(n_levels=4, n_features=2, log2_table_size=12, base_resolution=8, max_resolution=64)


def small_field(**overrides) -> RadianceField:
    cfg = dict(hashgrid=SMALL_GRID, density_hidden=16, color_hidden=16, geo_feat_dim=3)
    cfg.update(overrides)
    return RadianceField(FieldConfig(**cfg))


def radial_field(**overrides) -> RadianceField:
    """A field whose density is exactly the blob: the density MLP's last layer is zeroed."""
    field = small_field(**overrides)
    with torch.no_grad():
        field.density_net[-1].weight.zero_()
        field.density_net[-1].bias.zero_()
    return field


def random_directions(n: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, 3), dim=-1)


def test_trunc_exp_is_exp_forward_with_clamped_gradient():
    x = torch.tensor([-3.0, 0.0, 3.0, 20.0], requires_grad=True)
    y = trunc_exp(x)
    torch.testing.assert_close(y, torch.exp(x.detach()))
    y.sum().backward()
    expected = torch.exp(torch.tensor([-3.0, 0.0, 3.0, 15.0]))
    torch.testing.assert_close(x.grad, expected)


def test_forward_shapes_ranges_and_gradients():
    field = small_field()
    x = torch.rand(50, 3) - 0.5
    out = field(x)
    assert out["density"].shape == (50,) and out["albedo"].shape == (50, 3) and out["geo_feat"].shape == (50, 3)
    assert bool((out["density"] >= 0).all())
    assert bool((out["albedo"] >= 0).all() and (out["albedo"] <= 1).all())
    (out["density"].sum() + out["albedo"].sum()).backward()
    assert field.encoder.table.grad is not None and float(field.encoder.table.grad.abs().sum()) > 0
    assert all(p.grad is not None for p in field.color_net.parameters())


def test_softplus_activation_and_density_is_zero_outside_the_box():
    field = small_field(density_activation="softplus", aabb=(-0.5, -0.5, -0.5, 0.5, 0.5, 0.5))
    inside = torch.rand(20, 3) - 0.5
    outside = inside + torch.tensor([1.2, 0.0, 0.0])
    assert bool((field.density(inside) > 0).all())
    assert bool((field.density(outside) == 0).all())


def test_view_dependent_field_needs_directions():
    field = small_field(view_dependent=True)
    x = torch.rand(8, 3) - 0.5
    with pytest.raises(ValueError, match="view_dirs"):
        field(x)
    a = field(x, view_dirs=random_directions(8))["albedo"]
    b = field(x, view_dirs=random_directions(8))["albedo"]
    assert not torch.allclose(a, b)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"density_activation": "relu"}, "density_activation"),
        ({"aabb": (0.0, 0.0, 0.0, 1.0, -1.0, 1.0)}, "aabb"),
        ({"blob_radius": 0.0}, "blob_radius"),
    ],
)
def test_bad_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FieldConfig(**kwargs)


def test_bad_points_are_refused():
    field = small_field()
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        field.density(torch.zeros(4, 2))
    with pytest.raises(TypeError, match="float32"):
        field.density(torch.zeros(4, 3, dtype=torch.float64))


def test_blob_init_is_densest_at_the_centre_and_falls_outward():
    field = small_field(blob_density=5.0, blob_radius=0.5)  # a fresh field: MLP output is near zero
    dirs = random_directions(16)
    radii = torch.tensor([0.0, 0.15, 0.3, 0.45, 0.6, 0.8])
    with torch.no_grad():
        d = torch.stack([field.density(dirs * r) for r in radii])  # (radii, dirs)
    assert bool((d[:-1] > d[1:]).all()), "density must fall along every ray from the centre"
    assert float(d[0].min()) > 50.0 and float(d[-1].max()) < 0.2
    # The densest point of a coarse grid over the box is the centre.
    g = torch.linspace(-1, 1, 17)
    pts = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    with torch.no_grad():
        best = pts[field.density(pts).argmax()]
    assert float(best.norm()) < 1e-6


def test_no_blob_gives_a_near_uniform_fresh_field():
    field = small_field(blob_density=0.0)
    with torch.no_grad():
        d = field.density(torch.rand(200, 3) * 1.6 - 0.8)
    assert float(d.max() / d.min()) < 2.0


def ellipsoid_density(x: torch.Tensor) -> torch.Tensor:
    return 50.0 * torch.exp(-((x / torch.tensor([0.4, 0.25, 0.15])) ** 2).sum(-1))


def test_normal_helpers_match_an_analytic_ellipsoid():
    x = random_directions(64) * 0.3
    expected = F.normalize(x / torch.tensor([0.4, 0.25, 0.15]) ** 2, dim=-1)  # -grad density, normalised
    fd = normals_finite_difference(ellipsoid_density, x, eps=1e-3)
    forward = normals_finite_difference(ellipsoid_density, x, eps=1e-3, density=ellipsoid_density(x))
    an = normals_analytic(ellipsoid_density, x)
    assert float((fd * expected).sum(-1).min()) > 0.999
    assert float((forward * expected).sum(-1).min()) > 0.999
    assert float((an.detach() * expected).sum(-1).min()) > 0.9999


@pytest.mark.parametrize("mode", ["finite_difference", "analytic"])
def test_field_normals_point_outward_on_a_sphere_like_density(mode):
    field = radial_field(backend="torch")
    x = random_directions(64) * (0.1 + 0.4 * torch.rand(64, 1))
    n = field.normals(x, mode=mode)
    expected = F.normalize(x, dim=-1)
    assert n.shape == (64, 3)
    assert float((n.detach() * expected).sum(-1).min()) > 0.999
    if mode == "finite_difference":  # the forward differences the renderer takes, given the density at x:
        forward = field.normals(x, mode=mode, density=field.density(x))  # first order: within 6 degrees here
        assert float((forward.detach() * expected).sum(-1).min()) > 0.995
    torch.testing.assert_close(n.norm(dim=-1), torch.ones(64))


@pytest.mark.parametrize("mode", ["finite_difference", "analytic"])
def test_normals_are_differentiable_wrt_field_parameters(mode):
    field = small_field(backend="torch")  # the reference backend has double backward
    x = random_directions(32) * 0.3
    n = field.normals(x, mode=mode)
    # DreamFusion's orientation penalty against a fixed view direction.
    loss = ((n * torch.tensor([0.0, 1.0, 0.0])).sum(-1).clamp(min=0) ** 2).mean()
    loss.backward()
    g = field.encoder.table.grad
    assert g is not None and bool(torch.isfinite(g).all()) and float(g.abs().sum()) > 0


def test_unknown_normal_mode_is_refused():
    with pytest.raises(ValueError, match="normal mode"):
        small_field().normals(torch.zeros(2, 3), mode="sobel")


def test_fixed_background():
    bg = FixedBackground((0.2, 0.4, 0.6))
    out = bg(random_directions(5))
    torch.testing.assert_close(out, torch.tensor([[0.2, 0.4, 0.6]]).expand(5, 3))
    with pytest.raises(ValueError, match="3 values"):
        FixedBackground((1.0, 0.0))


def test_mlp_background_depends_on_direction_and_trains():
    bg = MLPBackground(MLPBackgroundConfig(n_frequencies=2, hidden=16))
    dirs = random_directions(32)
    out = bg(dirs)
    assert out.shape == (32, 3) and bool(((out >= 0) & (out <= 1)).all())
    assert float(out.detach().std(0).min()) > 0
    out.sum().backward()
    assert all(p.grad is not None for p in bg.parameters())


def test_mlp_background_random_colour_augmentation_only_in_training():
    bg = MLPBackground(MLPBackgroundConfig(random_aug_prob=1.0))
    dirs = random_directions(16)
    out = bg.train()(dirs)
    assert float(out.std(0).max()) == 0.0  # one colour for every direction
    assert float(bg.eval()(dirs).detach().std(0).max()) > 0
