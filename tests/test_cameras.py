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
