"""Cameras in Blender's convention, shared by every renderer in the engine.

World: right-handed, Z up. A camera looks along its local -Z with +Y up
(Blender/OpenGL); its pose is the 4x4 camera-to-world ``matrix_world``.
Orbit angles: azimuth 0 is Blender's front view (camera on -Y looking at +Y),
azimuth 90 the right view (camera on +X); elevation is above the XY plane.
Pixel (row i, column j) has its centre at (j + 0.5, i + 0.5); row 0 is the top.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Camera:
    """One pinhole camera: pose, vertical field of view and resolution."""

    c2w: torch.Tensor
    """(4, 4) camera-to-world matrix (Blender ``matrix_world``)."""
    fov_y_deg: float
    """Vertical field of view in degrees."""
    width: int
    """Image width in pixels."""
    height: int
    """Image height in pixels."""

    def rays(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Ray origins and unit directions, each (height, width, 3)."""
        return camera_rays(self.c2w, self.fov_y_deg, self.width, self.height)


def look_at(eye, target=(0.0, 0.0, 0.0), up=(0.0, 0.0, 1.0)) -> torch.Tensor:
    """Camera-to-world (4, 4) float32 for a camera at ``eye`` looking at ``target``."""
    eye = torch.as_tensor(eye, dtype=torch.float32)
    target = torch.as_tensor(target, dtype=torch.float32)
    up = torch.as_tensor(up, dtype=torch.float32)
    back = eye - target  # the camera's +Z points away from what it looks at
    back = back / back.norm()
    right = torch.linalg.cross(up, back)
    if right.norm() < 1e-6:  # looking straight up or down: any right vector will do
        right = torch.linalg.cross(torch.tensor([0.0, 1.0, 0.0]), back)
    right = right / right.norm()
    true_up = torch.linalg.cross(back, right)
    c2w = torch.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = right, true_up, back, eye
    return c2w


def orbit_position(azimuth_deg: float, elevation_deg: float, distance: float) -> torch.Tensor:
    """Point on a sphere around the origin, (3,), in the orbit convention above."""
    az, el = math.radians(azimuth_deg), math.radians(elevation_deg)
    return torch.tensor(
        [distance * math.cos(el) * math.sin(az), -distance * math.cos(el) * math.cos(az), distance * math.sin(el)],
        dtype=torch.float32,
    )


def orbit_camera(
    azimuth_deg: float, elevation_deg: float, distance: float, fov_y_deg: float, width: int, height: int | None = None
) -> Camera:
    """A camera on an orbit around the origin, looking at the origin."""
    c2w = look_at(orbit_position(azimuth_deg, elevation_deg, distance))
    return Camera(c2w=c2w, fov_y_deg=fov_y_deg, width=width, height=height or width)


def azimuth_elevation(c2w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Orbit azimuth in [0, 360) and elevation in [-90, 90] degrees of camera(s) (..., 4, 4)."""
    pos = c2w[..., :3, 3]
    az = torch.rad2deg(torch.atan2(pos[..., 0], -pos[..., 1])) % 360.0
    el = torch.rad2deg(torch.atan2(pos[..., 2], pos[..., :2].norm(dim=-1)))
    return az, el


def camera_rays(c2w: torch.Tensor, fov_y_deg: float, width: int, height: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rays through pixel centres.

    c2w: (4, 4) or (B, 4, 4). Returns origins and unit directions with shape
    (height, width, 3), or (B, height, width, 3) for a batch.
    """
    focal = 0.5 * height / math.tan(math.radians(fov_y_deg) / 2)
    dev, dt = c2w.device, c2w.dtype
    j = (torch.arange(width, device=dev, dtype=dt) + 0.5 - width / 2) / focal
    i = (torch.arange(height, device=dev, dtype=dt) + 0.5 - height / 2) / focal
    y, x = torch.meshgrid(-i, j, indexing="ij")
    dirs_cam = torch.stack([x, y, -torch.ones_like(x)], dim=-1)  # (H, W, 3), looking down -Z
    rot = c2w[..., :3, :3]
    dirs = torch.einsum("...ij,hwj->...hwi", rot, dirs_cam)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    origins = c2w[..., None, None, :3, 3].expand_as(dirs)
    return origins, dirs


def square_fov_deg(camera: Camera) -> float:
    """Vertical FOV of a square render of ``camera``'s frame centre: its smaller angle (vertical, or horizontal
    from its aspect), so the square shows only what the camera's frame shows."""
    half_y = math.radians(camera.fov_y_deg) / 2
    half_x = math.atan(math.tan(half_y) * camera.width / camera.height)
    return math.degrees(2 * min(half_x, half_y))


class CameraSampler:
    """Random training views: orbits around the object, or jittered copies of rig cameras.

    Rig cameras are relative to the object's frame (the placement; the object is made at its
    origin). A rig view keeps its camera's distance and field of view (the square centre of
    its frame, :func:`square_fov_deg`), so the object fills the renders as it fills the
    artist's frames; its direction is jittered a little and it looks at the object's centre.
    """

    RIG_JITTER = 0.1
    """Standard deviation of the unit direction's jitter (about 6 degrees)."""
    RIG_DISTANCE_JITTER = 0.05
    """Relative spread of a rig view's distance."""
    MIN_RIG_DISTANCE = 1.0
    """A rig camera closer to the object's centre is moved out to this distance (outside the unit box)."""

    def __init__(self, ranges: dict, rig: list[Camera] | None, generator: torch.Generator) -> None:
        self.distance = tuple(ranges.get("distance", (2.2, 2.8)))
        self.fov = tuple(ranges.get("fov", (38.0, 46.0)))
        self.elevation = tuple(ranges.get("elevation", (-10.0, 60.0)))
        self.ring = int(ranges.get("ring", 1))
        """Views per ring: a prior trained on rings (MVDream: 4 views 90 degrees apart at one elevation,
        distance and FOV) gets its orbit views in such rings; 1: independent views."""
        self.rig = rig
        self.rig_fovs = [square_fov_deg(cam) for cam in rig] if rig else []
        self.gen = generator

    def _uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=self.gen))

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, 4, 4) camera-to-world and (n,) vertical FOVs in degrees.

        With rings (``ranges["ring"]`` = k > 1) and no rig, n must be a multiple of k: each k consecutive
        views share elevation, distance and FOV, at azimuths a, a + 360/k, ... (the ring's start a is random).
        """
        if self.ring > 1 and not self.rig:
            return self._rings(n)
        poses, fovs = [], []
        for _ in range(n):
            if self.rig:
                k = int(torch.randint(len(self.rig), (), generator=self.gen))
                eye = self.rig[k].c2w[:3, 3].float()
                dist = max(float(eye.norm()), self.MIN_RIG_DISTANCE)
                direction = eye / eye.norm().clamp_min(1e-6) + self.RIG_JITTER * torch.randn(3, generator=self.gen)
                spread = self.RIG_DISTANCE_JITTER
                eye = direction / direction.norm() * dist * self._uniform(1.0 - spread, 1.0 + spread)
                poses.append(look_at(eye))
                fovs.append(self.rig_fovs[k])
            else:
                az = self._uniform(0.0, 360.0)
                el = self._uniform(*self.elevation)
                poses.append(look_at(orbit_position(az, el, self._uniform(*self.distance))))
                fovs.append(self._uniform(*self.fov))
        return torch.stack(poses), torch.tensor(fovs)

    def _rings(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if n % self.ring:
            raise ValueError(f"this prior is trained on rings of {self.ring} views; views per step must be a "
                             f"multiple of {self.ring}, got {n}")
        poses, fovs = [], []
        for _ in range(n // self.ring):
            start = self._uniform(0.0, 360.0)
            el, dist, fov = self._uniform(*self.elevation), self._uniform(*self.distance), self._uniform(*self.fov)
            for k in range(self.ring):
                poses.append(look_at(orbit_position(start + 360.0 * k / self.ring, el, dist)))
                fovs.append(fov)
        return torch.stack(poses), torch.tensor(fovs)

    def preview(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The progress previews' fixed view: a front three-quarter one at the middle of the ranges.

        Returns (1, 4, 4) camera-to-world and (1,) vertical FOV in degrees; draws no random numbers.
        """
        dist = 0.5 * (self.distance[0] + self.distance[1])
        return look_at(orbit_position(30.0, 20.0, dist))[None], torch.tensor([0.5 * (self.fov[0] + self.fov[1])])
