"""Procedural renders: determinism, normalisation, held-out cameras, metrics on ground truth."""
from __future__ import annotations

import torch

from engine_server.cameras import azimuth_elevation
from engine_server.models.bundled import procedural as P
from engine_server.models.bundled.evaluate import classify_color, foreground_mask
from engine_server.multiview import mask_iou
from engine_server.models.bundled.vocab import COLOR_NAMES, SHAPES, Caption


def test_every_shape_fits_the_unit_box_and_touches_it():
    g = torch.linspace(-0.7, 0.7, 57)
    pts = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), dim=-1).reshape(-1, 3)
    for shape in SHAPES:
        inside = pts[P.shape_sdf(shape)(pts) <= 0]
        lo, hi = inside.min(0).values, inside.max(0).values
        assert (lo >= -0.5 - 0.03).all() and (hi <= 0.5 + 0.03).all(), shape
        assert float((hi - lo).max()) > 0.9, shape  # largest side ~1
        assert ((lo + hi) / 2).abs().max() < 0.05, shape  # centred


def test_training_cameras_avoid_held_out_views_and_are_deterministic():
    a = P.sample_training_cameras(500, torch.Generator().manual_seed(3))
    b = P.sample_training_cameras(500, torch.Generator().manual_seed(3))
    assert torch.equal(a.c2w, b.c2w)
    assert not P.is_held_out(a.azimuth, a.elevation).any()
    held = P.held_out_cameras()
    assert P.is_held_out(held.azimuth, held.elevation).all()
    az, el = azimuth_elevation(a.c2w)
    assert torch.allclose(el, a.elevation, atol=1e-3)
    assert a.elevation.min() >= P.ELEVATION_RANGE[0] and a.elevation.max() <= P.ELEVATION_RANGE[1]


def test_render_is_deterministic_and_compose_matches_any_colour():
    cams = P.held_out_cameras()
    r1 = P.render_shape("torus", cams.c2w[:3], cams.fov[:3])
    r2 = P.render_shape("torus", cams.c2w[:3], cams.fov[:3])
    assert torch.equal(r1.shade, r2.shade) and torch.equal(r1.mask, r2.mask)
    assert r1.shade.shape == (3, 1, 32, 32)
    assert 0.02 < float(r1.mask.mean()) < 0.6
    out = P.render_caption(Caption("green", "torus"), P.orbit_cameras([10.0], [0.0], 2.5, 42.0))
    assert out["rgb"].shape == (1, 3, 32, 32) and out["depth"].shape == (1, 1, 32, 32)
    fg = out["mask"][0, 0] > 0.99
    d = out["depth"][0, 0][fg]
    assert (d > 2.5 - 0.9).all() and (d < 2.5 + 0.9).all()
    # background pixels are exactly the background colour
    bg = out["mask"][0, 0] == 0
    assert torch.allclose(out["rgb"][0][:, bg], torch.tensor(P.BACKGROUND_RGB)[:, None].expand(3, int(bg.sum())))


def test_front_view_of_a_cone_is_a_triangle_pointing_up():
    out = P.render_caption(Caption("red", "cone"), P.orbit_cameras([0.0], [0.0], 2.5, 42.0))
    m = out["mask"][0, 0] > 0.5
    rows = m.sum(1)
    top = rows.nonzero().min()
    bottom = rows.nonzero().max()
    assert rows[top] < rows[bottom] / 3  # narrow apex on top, wide base below


def test_metrics_are_exact_on_ground_truth():
    cams = P.held_out_cameras()
    # At 32 px the snowman's thin parts put the colour-based mask's own ceiling near 0.83 IoU.
    for shape, min_iou in (("cube", 0.85), ("snowman", 0.8)):
        r = P.render_shape(shape, cams.c2w, cams.fov)
        gt = r.mask[:, 0] > 0.5
        for color in COLOR_NAMES:
            rgb = P.compose(r.shade, r.mask, P.albedo_of(color).expand(len(gt), 3))
            pred = foreground_mask(rgb)
            assert mask_iou(pred, gt).min() > min_iou, (shape, color)
            assert all(classify_color(rgb[i], pred[i]) == color for i in range(len(gt))), (shape, color)
    empty = torch.zeros(2, 32, 32, dtype=torch.bool)
    assert torch.equal(mask_iou(empty, empty), torch.ones(2))


def test_turned_cameras_go_round_the_vertical_and_the_turns_show_each_shape_anew():
    from engine_server.models.bundled.evaluate import TURNS, turned
    from engine_server.multiview.rig import mask_iou

    cams = P.held_out_cameras()
    quarter = turned(cams.c2w, 90.0)
    assert torch.allclose(quarter[:, 2, 3], cams.c2w[:, 2, 3], atol=1e-5)  # same height and distance
    assert torch.allclose(quarter[:, :3, 3].norm(dim=-1), cams.c2w[:, :3, 3].norm(dim=-1), atol=1e-5)
    assert torch.allclose(quarter[:, 0, 3], -cams.c2w[:, 1, 3], atol=1e-5)  # x' = -y: a quarter turn about Z

    def masks(shape, c2w):
        return P.render_shape(shape, c2w, cams.fov, 32).mask[:, 0] > 0.5

    for shape, degrees in TURNS.items():
        same = masks(shape, cams.c2w)
        # A turn by the shape's whole symmetry shows the same object; the evaluation's turn (half of it) does not.
        assert float(mask_iou(same, masks(shape, turned(cams.c2w, 2 * degrees))).mean()) > 0.97, shape
        assert float(mask_iou(same, masks(shape, turned(cams.c2w, degrees))).mean()) < 0.9, shape
