"""engine_server.cameras: the rig branch of CameraSampler keeps each rig camera's distance and field of view."""
from __future__ import annotations

import math

import torch

from engine_server.cameras import Camera, CameraSampler, look_at, square_fov_deg


def _cam(eye, fov_y, width, height) -> Camera:
    return Camera(look_at(eye), fov_y, width, height)


def test_rig_views_stay_near_each_camera_with_its_distance_and_fov():
    near = _cam((0.0, -4.0, 0.0), 30.0, 640, 480)  # landscape: the square centre spans the full vertical FOV
    high = _cam((3.0, 0.0, 3.0), 50.0, 480, 960)   # portrait: the horizontal angle is the smaller one
    sampler = CameraSampler({}, [near, high], torch.Generator().manual_seed(0))
    poses, fovs = sampler.sample(200)
    eyes = poses[:, :3, 3]
    to_near = eyes @ torch.tensor([0.0, -1.0, 0.0]) / eyes.norm(dim=-1)
    picked_near = to_near > 0.8
    assert 40 < int(picked_near.sum()) < 160  # both cameras are used
    portrait_fov = math.degrees(2 * math.atan(math.tan(math.radians(25.0)) * 0.5))
    assert torch.allclose(fovs[picked_near], torch.tensor(30.0))
    assert torch.allclose(fovs[~picked_near], torch.tensor(portrait_fov))
    assert torch.all((eyes[picked_near].norm(dim=-1) - 4.0).abs() <= 0.21)
    assert torch.all((eyes[~picked_near].norm(dim=-1) - math.hypot(3.0, 3.0)).abs() <= 0.22)
    # every view looks at the object's centre (the placement's origin)
    forward = -poses[:, :3, 2]
    assert torch.allclose((forward * -eyes / eyes.norm(dim=-1, keepdim=True)).sum(-1), torch.ones(200), atol=1e-5)
    # the directions stay within a few degrees of the camera's
    high_dir = torch.tensor([1.0, 0.0, 1.0]) / math.sqrt(2)
    assert float((eyes[~picked_near] / eyes[~picked_near].norm(dim=-1, keepdim=True) @ high_dir).min()) > 0.9


def test_square_fov_is_the_frames_smaller_angle():
    assert square_fov_deg(_cam((0, -3, 0), 40.0, 1920, 1080)) == 40.0
    assert square_fov_deg(_cam((0, -3, 0), 40.0, 500, 1000)) < 40.0


def test_a_rig_camera_inside_the_object_is_moved_out():
    sampler = CameraSampler({}, [_cam((0.0, -0.2, 0.0), 40.0, 64, 64)], torch.Generator().manual_seed(1))
    poses, _ = sampler.sample(20)
    assert float(poses[:, :3, 3].norm(dim=-1).min()) >= CameraSampler.MIN_RIG_DISTANCE * 0.94


def test_ring_priors_get_rings_of_views_90_degrees_apart_at_one_elevation_distance_and_fov():
    from engine_server.cameras import azimuth_elevation

    ranges = {"distance": (2.2, 2.75), "fov": (30.0, 50.0), "elevation": (0.0, 30.0), "ring": 4}
    c2w, fovs = CameraSampler(ranges, None, torch.Generator().manual_seed(3)).sample(8)
    az, el = azimuth_elevation(c2w)
    dist = c2w[:, :3, 3].norm(dim=-1)
    for ring in range(2):
        s = slice(4 * ring, 4 * ring + 4)
        steps = (az[s].roll(-1) - az[s]) % 360.0
        torch.testing.assert_close(steps, torch.full((4,), 90.0), atol=1e-3, rtol=0)
        assert float(el[s].max() - el[s].min()) < 1e-3 and float(dist[s].max() - dist[s].min()) < 1e-4
        assert float(fovs[s].max() - fovs[s].min()) == 0.0
    assert abs(float(el[0] - el[4])) > 1e-3  # each ring draws its own elevation
    assert 0.0 <= float(el.min()) and float(el.max()) <= 30.0
    try:
        CameraSampler(ranges, None, torch.Generator()).sample(6)
    except ValueError as exc:
        assert "multiple of 4" in str(exc)
    else:
        raise AssertionError("6 views of a 4-view ring prior were accepted")


def _mvdream_blender_camera(elevation_deg: float, azimuth_deg: float) -> torch.Tensor:
    """MVDream's published camera convention (its get_camera with blender_coord=True), from its definition:
    an OpenGL look-at from (cos e sin a, sin e, cos e cos a) at the origin with +Y up, then world Y/Z swapped
    into Blender's axes (x, y, z) -> (x, -z, y)."""
    e, a = math.radians(elevation_deg), math.radians(azimuth_deg)
    pos = torch.tensor([math.cos(e) * math.sin(a), math.sin(e), math.cos(e) * math.cos(a)])
    forward = -pos / pos.norm()
    right = torch.linalg.cross(forward, torch.tensor([0.0, 1.0, 0.0]))
    right = right / right.norm()
    up = torch.linalg.cross(right, forward)
    gl = torch.eye(4)
    gl[:3, 0], gl[:3, 1], gl[:3, 2], gl[:3, 3] = right, up, -forward, pos
    flip = torch.tensor([[1.0, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]])
    return flip @ gl


def test_engine_orbit_cameras_are_mvdreams_camera_convention():
    from engine_server.cameras import orbit_position
    from engine_server.guidance.prior import camera_vector

    for elevation, azimuth in [(0.0, 0.0), (15.0, 90.0), (30.0, 200.0), (10.0, 315.0)]:
        ours = camera_vector(look_at(orbit_position(azimuth, elevation, 2.5))[None])[0]
        theirs = _mvdream_blender_camera(elevation, azimuth).reshape(16)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
