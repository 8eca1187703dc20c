"""The reference camera's distance read from the silhouette, the framing it is read in, and ``multiview --image``
preparing and placing the reference as ``generate --image`` does."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from engine_server.cameras import azimuth_elevation, camera_rays, look_at, orbit_position
from engine_server.multiview.reference import (
    DISTANCE_RANGE,
    framing,
    matte_reference,
    prepare_reference,
    silhouette_distance,
)


def _ball_mask(distance: float, fov: float, res: int = 64, radius: float = 0.5) -> torch.Tensor:
    """Silhouette (res, res) of a ball of ``radius`` at the origin seen from ``distance`` with vertical FOV ``fov``."""
    origins, dirs = camera_rays(look_at(orbit_position(30.0, 20.0, distance)), fov, res, res)
    along = -(origins * dirs).sum(-1)  # closest approach of each ray to the centre
    closest = origins + along[..., None] * dirs
    return closest.norm(dim=-1) <= radius


@pytest.mark.parametrize("distance, fov", [(2.5, 42.0), (2.0, 42.0), (3.2, 30.0)])
def test_the_distance_of_a_unit_ball_is_read_from_its_silhouette(distance, fov):
    found = silhouette_distance(_ball_mask(distance, fov), fov, 2.5)
    assert abs(found - distance) / distance < 0.05, found


def test_the_distance_stays_near_the_prior_s():
    lo, hi = DISTANCE_RANGE
    assert silhouette_distance(_ball_mask(30.0, 42.0), 42.0, 2.5) == pytest.approx(hi * 2.5)  # a speck
    full = torch.ones(64, 64, dtype=torch.bool)
    assert silhouette_distance(full, 42.0, 2.5) == pytest.approx(lo * 2.5)


def test_an_object_smaller_than_the_prior_s_is_framed_as_the_prior_s():
    # Blender's default camera shows the 2 m cube from 40 degrees at 0.41 of its frame: centred, but small.
    mask = np.zeros((256, 256), bool)
    mask[75:181, 90:166] = True  # 106 px tall, centred
    cy, cx, side = framing(mask)
    assert (cy, cx) == (128.0, 128.0) and side == math.ceil(106 / 0.6)
    image, small = prepare_reference(np.ones((256, 256, 4), np.float32), mask, (0.0, 0.75, 0.75), 32)
    rows = torch.nonzero(small.any(1)).flatten()
    assert abs((rows.max() - rows.min() + 1) / 32 - 0.6) <= 1 / 32
    # One already framed as the prior's is left as it is.
    mask = np.zeros((256, 256), bool)
    mask[52:205, 52:205] = True
    assert framing(mask) == (128.0, 128.0, 256)


@pytest.mark.slow  # the prior's camera search and a few views (~1 min on a shared CPU)
def test_multiview_image_places_the_reference_as_generate_image_does(tmp_path):
    from PIL import Image

    from engine_server.cli import main as cli
    from engine_server.guidance import load_prior, prior_defaults
    from engine_server.multiview import DEFAULT_ELEVATION
    from engine_server.multiview.reference import estimate_reference_camera, prepare_matte, read_image

    # A red ball on a grey-to-white gradient backdrop, small and off-centre: matted, lit, framed, then placed.
    h = w = 96
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = (0.45 + 0.4 * yy / h)[..., None] * np.ones(3)
    ball = np.hypot(yy - 60, xx - 35) < 14
    rgb[ball] = (0.8, 0.1, 0.08)
    path = tmp_path / "ref.png"
    Image.fromarray((rgb * 255).astype(np.uint8)).save(path)

    assert cli(["multiview", "--image", str(path), "--views", "3", "--steps", "2", "--out", str(tmp_path / "v")]) == 0
    views = json.loads((tmp_path / "v" / "cameras.json").read_text())["views"]
    prior = load_prior("bundled")
    defaults = prior_defaults(prior)
    image, _ = prepare_matte(matte_reference(read_image(path)), defaults.background_rgb, prior.resolution)
    ranges = defaults.camera_ranges
    cam = estimate_reference_camera(prior, image, ranges["default_distance"], ranges["default_fov"],
                                    DEFAULT_ELEVATION)
    first = torch.tensor(views[0]["c2w"])
    assert float(first[:3, 3].norm()) == pytest.approx(cam.distance, rel=1e-4)  # the ring at the reference's distance
    assert float(azimuth_elevation(first)[0]) == pytest.approx(cam.azimuth_deg, abs=1e-3)  # starting at its azimuth
    assert views[0]["fov_y_deg"] == pytest.approx(cam.fov_y_deg)


def _outline(mesh, azimuth: float, elevation: float, res: int = 256) -> np.ndarray:
    """Coverage (res, res) of a unit-box mesh seen as Blender's default camera sees its 2 m primitives: 5.6 units
    away (11.2 m from a 2 m object), the 50 mm lens's 39.6 degrees."""
    from kernels.rasterize import render_mesh

    v = torch.as_tensor(np.asarray(mesh.vertices), dtype=torch.float32)
    v = (v - 0.5 * (v.amin(0) + v.amax(0))) / float((v.amax(0) - v.amin(0)).max())
    c2w = look_at(orbit_position(azimuth, elevation, 5.6))
    out = render_mesh(v, torch.as_tensor(np.asarray(mesh.faces)), c2w, 39.6, res, res, antialias=True)
    return out["mask"][0, ..., 0].numpy()


@pytest.mark.parametrize("azimuth, elevation", [(46.7, 0.0), (46.7, 20.0), (46.7, 40.0), (20.0, 30.0), (70.0, 30.0)])
def test_a_box_s_outline_gives_its_camera(azimuth, elevation):
    import trimesh

    from engine_server.multiview.reference import prism_view

    view = prism_view(_outline(trimesh.creation.box((1.0, 1.0, 1.0)), azimuth, elevation))
    assert view is not None
    assert abs(view.elevation_deg - elevation) <= 7.5, view  # perspective reads a few degrees high
    if elevation >= 20.0:  # a top face tall enough to tell its corners apart
        assert abs(view.azimuth_deg - azimuth) <= 6.0, view
    turn = math.radians(azimuth)
    assert abs(view.width - (math.cos(turn) + math.sin(turn))) <= 0.1, view  # the box is wider on its corner


def test_a_cylinder_is_a_prism_and_a_sphere_or_a_cone_is_not():
    import trimesh

    from engine_server.multiview.reference import prism_view

    view = prism_view(_outline(trimesh.creation.cylinder(radius=0.5, height=1.0, sections=64), 10.0, 30.0))
    # Its caps leave the sides tangentially, which makes the sides look longer: it reads a few degrees low.
    assert view is not None and abs(view.elevation_deg - 30.0) <= 6.0 and abs(view.width - 1.0) <= 0.1, view
    for mesh in (trimesh.creation.icosphere(4), trimesh.creation.cone(radius=0.5, height=1.0, sections=64)):
        for elevation in (0.0, 20.0, 40.0):
            assert prism_view(_outline(mesh, 46.7, elevation)) is None
    # Hard-edged discs, small and large: a small one's pixel steps would pass for straight sides.
    yy, xx = np.mgrid[0:256, 0:256]
    for radius in (14, 60):
        assert prism_view((np.hypot(yy - 128, xx - 128) < radius).astype(np.float32)) is None
