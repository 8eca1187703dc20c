"""Multi-view generation on the real bundled prior: rigs, masks, silhouette agreement, CLI."""
from __future__ import annotations

import json

import pytest
import torch

from engine_server.cameras import azimuth_elevation
from engine_server.multiview import (
    AGREEMENT_THRESHOLD,
    OVERHEAD_ELEVATION,
    MultiViewConfig,
    background_mask,
    default_rig,
    generate_views,
    silhouette_agreement,
)
from kernels.rasterize import render_mesh


def test_default_rig_is_a_ring_plus_an_overhead_view():
    rig = default_rig(7, 2.5, 42.0, 32, start_azimuth=30.0)
    az, el = azimuth_elevation(torch.stack([c.c2w for c in rig]))
    assert len(rig) == 7
    assert torch.allclose(az[:6], torch.tensor([30.0, 90.0, 150.0, 210.0, 270.0, 330.0]), atol=1e-3)
    assert el[6] == pytest.approx(OVERHEAD_ELEVATION, abs=1e-3) and (el[:6] < 20).all()
    assert all(abs(float(c.c2w[:3, 3].norm()) - 2.5) < 1e-5 for c in rig)
    with pytest.raises(ValueError, match="at least 2"):
        default_rig(1, 2.5, 42.0, 32)


def _box_masks(rig, half=(0.5, 0.5, 0.5)):
    corners = torch.tensor([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=torch.float32)
    verts = corners * torch.tensor(half)
    faces = torch.tensor([[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
                          [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]])
    c2w = torch.stack([c.c2w for c in rig])
    out = render_mesh(verts, faces, c2w, rig[0].fov_y_deg, 32, 32)
    return out["mask"][..., 0] > 0.5, c2w


def test_silhouettes_of_one_solid_agree_and_a_wrong_one_does_not():
    rig = default_rig(6, 2.5, 42.0, 32)
    masks, c2w = _box_masks(rig)
    fovs = torch.full((6,), 42.0)
    agree = silhouette_agreement(masks, c2w, fovs)
    assert agree.min() > 0.85, agree
    wrong = masks.clone()
    wrong[2] = torch.roll(wrong[2], shifts=6, dims=1)  # a view whose object sits elsewhere
    bad = silhouette_agreement(wrong, c2w, fovs)
    assert bad[2] < agree[2] - 0.08 and bad.mean() < agree.mean() - 0.03, (agree, bad)


def test_background_mask_uses_the_background_colour():
    img = torch.empty(1, 3, 8, 8)
    img[:] = torch.tensor([0.0, 0.75, 0.75]).view(1, 3, 1, 1)
    img[0, :, 2:5, 3:6] = torch.tensor([0.8, 0.1, 0.1]).view(3, 1, 1)
    m = background_mask(img, (0.0, 0.75, 0.75))
    assert int(m.sum()) == 9 and bool(m[0, 3, 4])


@pytest.fixture(scope="module")
def prior():
    from engine_server.guidance import load_prior

    return load_prior("bundled")


@pytest.mark.slow
def test_text_views_agree_show_the_prompt_and_are_seeded(prior):
    torch.set_num_threads(1)
    rig = default_rig(5, 2.5, 42.0, 32)
    cfg = MultiViewConfig(strategy="anchor", steps=10, seed=1)
    result = generate_views(prior, rig, prompt="a red cube", config=cfg)
    assert result.images.shape == (5, 3, 32, 32) and result.masks.shape == (5, 32, 32)
    assert torch.equal(result.c2w, torch.stack([c.c2w for c in rig]))
    fg = result.masks.float().mean((1, 2))
    assert ((fg > 0.08) & (fg < 0.8)).all(), fg  # an object on the background in every view
    colour = torch.stack([result.images[i][:, result.masks[i]].median(dim=1).values for i in range(5)])
    assert (colour[:, 0] > colour[:, 1] + 0.3).all() and (colour[:, 0] > colour[:, 2] + 0.3).all(), colour
    assert result.agreement.min() > 0.8, result.agreement
    again = generate_views(prior, rig, prompt="a red cube", config=cfg)
    assert torch.equal(again.images, result.images)


def test_generate_views_needs_a_condition(prior):
    with pytest.raises(ValueError, match="prompt or a reference"):
        generate_views(prior, default_rig(3, 2.5, 42.0, 32))
    with pytest.raises(ValueError, match="strategy"):
        MultiViewConfig(strategy="joint-ish")


def test_multiview_cli_writes_views_and_cameras(tmp_path, capsys):
    from engine_server.cli import main

    rc = main(["multiview", "a blue sphere", "--out", str(tmp_path / "mv"), "--views", "4", "--steps", "6"])
    assert rc == 0
    meta = json.loads((tmp_path / "mv" / "cameras.json").read_text())
    assert len(meta["views"]) == 4 and all((tmp_path / "mv" / v["image"]).is_file() for v in meta["views"])
    assert len(meta["views"][0]["c2w"]) == 4
    assert isinstance(meta["redrawn"], int) and 0 <= meta["redrawn"] <= 4
    assert main(["multiview", "--out", str(tmp_path / "none")]) == 2
    assert "PROMPT or --image" in capsys.readouterr().err


@pytest.mark.parametrize("strategy", ["sequential", "independent"])
def test_every_strategy_draws_the_prompt_in_every_view(prior, strategy):
    torch.set_num_threads(1)
    rig = default_rig(4, 2.5, 42.0, 32)
    result = generate_views(prior, rig, prompt="a blue cone", config=MultiViewConfig(strategy=strategy, steps=8))
    assert result.strategy == strategy and result.images.shape == (4, 3, 32, 32)
    fg = result.masks.float().mean((1, 2))
    assert ((fg > 0.05) & (fg < 0.8)).all(), fg
    colour = torch.stack([result.images[i][:, result.masks[i]].median(dim=1).values for i in range(4)])
    assert (colour[:, 2] > colour[:, :2].amax(dim=1) + 0.2).all(), colour  # blue, lit or in shade
    assert result.agreement.min() > 0.7, result.agreement


@pytest.fixture(scope="module")
def diffusers_priors(tmp_path_factory):
    """Tiny random Zero123-family, MVDream-style and Stable Diffusion folders, loaded through from_pretrained."""
    from engine_server.guidance import load_prior, tiny

    root = tmp_path_factory.mktemp("priors")
    tiny.make_novel_view(root / "zero123")
    tiny.make_multiview(root / "mvdream")
    tiny.make_stable_diffusion(root / "sd")
    return {name: load_prior(root / name) for name in ("zero123", "mvdream", "sd")}


def test_latent_priors_sample_views_through_their_vae(diffusers_priors):
    from engine_server.multiview import ViewReference

    zero123 = diffusers_priors["zero123"]
    res = zero123.resolution
    rig = default_rig(3, 2.5, 40.0, res)
    gen = torch.Generator().manual_seed(0)
    refs = [ViewReference(torch.rand(3, res, res, generator=gen), rig[0].c2w, 40.0) for _ in range(2)]
    cfg = MultiViewConfig(strategy="sequential", steps=2)
    a = generate_views(zero123, rig[1:], reference=refs[0], config=cfg)
    b = generate_views(zero123, rig[1:], reference=refs[1], config=cfg)
    assert a.images.shape == (2, 3, res, res) and torch.isfinite(a.images).all()
    assert a.images.min() >= 0 and a.images.max() <= 1
    assert not torch.allclose(a.images, b.images)  # the reference reaches the sampler
    with pytest.raises(ValueError, match="novel-view"):
        generate_views(zero123, rig, prompt="a red cup", config=cfg)
    # MVDream-style: the rig is denoised jointly, in groups of the model's views (3 views: one padded group).
    mvdream = diffusers_priors["mvdream"]
    mv = generate_views(mvdream, default_rig(5, 2.5, 40.0, res), prompt="a red cup", config=MultiViewConfig(steps=2))
    assert mv.strategy == "joint" and mv.images.shape == (5, 3, res, res) and torch.isfinite(mv.images).all()
    with pytest.raises(ValueError, match="prompt only"):
        generate_views(mvdream, rig, reference=refs[0], config=cfg)
    with pytest.raises(ValueError, match="text-only"):
        generate_views(diffusers_priors["sd"], rig, reference=refs[0], config=cfg)


def _procedural_masks(shape: str, rig) -> torch.Tensor:
    from engine_server.models.bundled.procedural import render_shape

    c2w = torch.stack([c.c2w for c in rig])
    return render_shape(shape, c2w, torch.full((len(rig),), rig[0].fov_y_deg)).mask[:, 0] > 0.5


@pytest.mark.parametrize("other", ["cube", "cone", "squashed"])
def test_a_view_of_another_shape_drops_below_the_threshold(other):
    """The issue's case: flattened ellipses beside discs scored 0.87-1.00 against the hull of all views."""
    rig = default_rig(8, 2.5, 42.0, 32)
    c2w, fovs = torch.stack([c.c2w for c in rig]), torch.full((8,), 42.0)
    spheres = _procedural_masks("sphere", rig)
    agree = silhouette_agreement(spheres, c2w, fovs, trusted=(0,))
    assert agree.min() >= AGREEMENT_THRESHOLD + 0.05, agree
    mixed = spheres.clone()
    if other == "squashed":  # the sphere's disc flattened to 60% of its height: an ellipse
        rows = torch.arange(32).float()
        src = ((rows - 16) / 0.6 + 16).round().long().clamp(0, 31)
        mixed[2] = spheres[2][src] & ((rows - 16).abs() < 0.6 * 16)[:, None]
    else:
        mixed[2] = _procedural_masks(other, rig)[2]
    bad = silhouette_agreement(mixed, c2w, fovs, trusted=(0,))
    assert bad[2] < AGREEMENT_THRESHOLD, bad
    assert (torch.cat([bad[:2], bad[3:]]) >= AGREEMENT_THRESHOLD).all(), bad  # the odd one is singled out
