"""Rasterizer: coverage, depth and interpolation against ray casting (engine_server.cameras), gradients, errors."""
from __future__ import annotations

import math

import pytest
import torch
import trimesh

from engine_server.cameras import camera_rays, look_at, orbit_camera
from kernels.rasterize import (
    BackendUnavailableError,
    antialias,
    backend_status,
    interpolate,
    perspective_projection,
    rasterize,
    rasterize_torch,
    render_mesh,
    transform_vertices,
)


def _mesh(*parts: trimesh.Trimesh) -> tuple[torch.Tensor, torch.Tensor]:
    m = trimesh.util.concatenate(parts)
    return torch.tensor(m.vertices, dtype=torch.float32), torch.tensor(m.faces, dtype=torch.int64)


def _asymmetric_mesh() -> tuple[torch.Tensor, torch.Tensor]:
    box = trimesh.creation.box(extents=(0.3, 0.5, 0.2))
    box.apply_translation((0.2, 0.0, 0.15))
    ball = trimesh.creation.icosphere(subdivisions=2, radius=0.25)
    ball.apply_translation((-0.2, 0.1, -0.1))
    return _mesh(box, ball)


def _ray_cast(origins, dirs, vertices, faces):
    """Nearest hit per ray (Moeller-Trumbore, float64): (t, face id, barycentrics (.., 3)); t = inf on a miss."""
    o, d = origins.reshape(-1, 3).double(), dirs.reshape(-1, 3).double()
    tri = vertices.double()[faces]  # (F, 3, 3)
    e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    p = torch.linalg.cross(d[:, None], e2[None])  # (R, F, 3)
    det = (e1[None] * p).sum(-1)
    ok = det.abs() > 1e-12
    inv = 1.0 / torch.where(ok, det, torch.ones_like(det))
    s = o[:, None] - tri[None, :, 0]
    u = (s * p).sum(-1) * inv
    q = torch.linalg.cross(s, e1[None].expand_as(s))
    v = (d[:, None] * q).sum(-1) * inv
    t = (e2[None] * q).sum(-1) * inv
    hit = ok & (u >= 0) & (v >= 0) & (u + v <= 1) & (t > 0)
    t = torch.where(hit, t, torch.full_like(t, math.inf))
    t_min, fid = t.min(-1)
    rows = torch.arange(fid.numel())
    bary = torch.stack([1 - u[rows, fid] - v[rows, fid], u[rows, fid], v[rows, fid]], -1)
    shape = origins.shape[:-1]
    return t_min.view(shape), fid.view(shape), bary.view(*shape, 3)


def _screen(vertices, c2w, fov):
    """NDC (x, y) of vertices seen by a square camera: what one view can tell about their positions."""
    clip = _clip(vertices, c2w, fov, 1, 1)[0]
    return clip[:, :2] / clip[:, 3:]


def _clip(vertices, c2w, fov, height, width):
    return transform_vertices(vertices, perspective_projection(c2w, fov, width / height))


def test_coverage_ids_and_depth_match_ray_casting():
    vertices, faces = _asymmetric_mesh()
    height, width, fov = 48, 64, 45.0
    c2w = torch.stack([orbit_camera(30, 20, 1.4, fov, width, height).c2w, orbit_camera(200, -35, 1.3, fov, width).c2w])
    out = render_mesh(vertices, faces, c2w, fov, height, width)
    origins, dirs = camera_rays(c2w, fov, width, height)  # (2, H, W, 3)
    t, fid, _ = _ray_cast(origins, dirs, vertices, faces)
    ray_mask = torch.isfinite(t)
    mask = out["mask"][..., 0] > 0
    assert 200 < int(mask[0].sum()) < height * width - 200  # a real, partial silhouette in both views
    assert 200 < int(mask[1].sum()) < height * width - 200
    # Pixel centres on an edge may go either way; nothing else may differ.
    assert int((mask != ray_mask).sum()) <= 4
    both = mask & ray_mask
    tri = out["rast"][..., 3].long() - 1
    assert (tri[both] == fid[both]).float().mean() > 0.98
    same = both & (tri == fid)
    forward = -c2w[:, None, None, :3, 2]  # the camera looks along its -Z
    ray_depth = (t * (dirs.double() * forward.double()).sum(-1)).float()
    torch.testing.assert_close(out["depth"][..., 0][same], ray_depth[same], atol=1e-4, rtol=1e-4)
    assert (out["depth"][~mask] == 0).all()


def test_image_orientation_row0_is_top():
    # Camera at azimuth 0 sits on -Y looking toward +Y: world +Z is up in the image, +X is right.
    fov, size = 40.0, 32
    c2w = orbit_camera(0, 0, 3.0, fov, size).c2w
    tri = torch.tensor([[0.2, 0.0, 0.2], [0.8, 0.0, 0.2], [0.2, 0.0, 0.8]])  # upper right of the view
    rast = rasterize(_clip(tri, c2w, fov, size, size), torch.tensor([[0, 1, 2]]), (size, size))
    rows, cols = (rast[0, ..., 3] > 0).nonzero().unbind(-1)
    assert rows.numel() > 10
    assert rows.float().mean() < size / 2 and cols.float().mean() > size / 2


def test_plane_depth_at_known_distance():
    near, far, dist, fov, size = 0.1, 10.0, 2.5, 50.0, 32
    quad = torch.tensor([[-3.0, 0.0, -3.0], [3.0, 0.0, -3.0], [3.0, 0.0, 3.0], [-3.0, 0.0, 3.0]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]], dtype=torch.int32)
    c2w = orbit_camera(0, 0, dist, fov, size).c2w  # faces the XZ plane head-on
    clip = transform_vertices(quad, perspective_projection(c2w, fov, 1.0, near, far))
    rast = rasterize(clip, faces, (size, size))
    assert (rast[..., 3] > 0).all()
    expected = (far + near) / (far - near) - 2 * far * near / ((far - near) * dist)
    torch.testing.assert_close(rast[..., 2], torch.full_like(rast[..., 2], expected), atol=1e-5, rtol=0)
    out = render_mesh(quad, faces, c2w, fov, size, size, near=near, far=far)
    torch.testing.assert_close(out["depth"], torch.full_like(out["depth"], dist), atol=1e-4, rtol=0)
    assert torch.allclose(out["normal"].abs()[..., 1], torch.ones(1, size, size))


def test_interpolate_is_perspective_correct():
    # A triangle slanting away from the camera: screen-space (affine) interpolation would be visibly wrong.
    tri = torch.tensor([[-0.6, -0.8, -0.5], [0.7, 1.5, -0.4], [0.0, -0.5, 0.6]])
    colors = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    faces = torch.tensor([[0, 1, 2]])
    fov, size = 50.0, 40
    c2w = look_at((0.0, -2.0, 0.3))
    rast = rasterize(_clip(tri, c2w, fov, size, size), faces, (size, size))
    img = interpolate(colors, rast, faces)
    t, _, bary = _ray_cast(*camera_rays(c2w, fov, size, size), tri, faces)
    both = (rast[0, ..., 3] > 0) & torch.isfinite(t)
    assert int(both.sum()) > 200
    expected = bary.float() @ colors
    torch.testing.assert_close(img[0][both], expected[both], atol=2e-5, rtol=0)
    # The test could fail: the rast (u, v) are the weights of vertices 0 and 1.
    torch.testing.assert_close(rast[0, ..., :2][both], bary[..., :2].float()[both], atol=2e-5, rtol=0)
    clip = _clip(tri, c2w, fov, size, size)[0]
    w_ratio = clip[:, 3].max() / clip[:, 3].min()
    assert w_ratio > 1.5  # strong perspective, so an affine interpolation would be off by far more than atol


def test_batch_and_chunking_match_single_renders():
    vertices, faces = _asymmetric_mesh()
    fov, size = 45.0, 32
    c2w = torch.stack([orbit_camera(a, 15, 2.2, fov, size).c2w for a in (0, 120, 250)])
    clip = _clip(vertices, c2w, fov, size, size)
    batched = rasterize(clip, faces, (size, size))
    for b in range(3):
        torch.testing.assert_close(batched[b : b + 1], rasterize(clip[b], faces, (size, size)))
    chunked = rasterize_torch(clip, faces, (size, size), max_candidates=500)
    torch.testing.assert_close(chunked, batched)


def test_vertex_gradients_finite_and_only_on_visible_triangles():
    ball = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
    vertices, faces = _mesh(ball)
    vertices.requires_grad_(True)
    colors = torch.rand(vertices.shape[0], 3, requires_grad=True)
    fov, size = 40.0, 48
    out = render_mesh(vertices, faces, orbit_camera(45, 30, 2.5, fov, size).c2w, fov, size, size, vertex_colors=colors)
    loss = (out["rgb"] - 0.3).square().sum() + out["depth"].sum()
    loss.backward()
    grad = vertices.grad
    assert torch.isfinite(grad).all() and torch.isfinite(colors.grad).all()
    visible = torch.zeros(vertices.shape[0], dtype=torch.bool)
    visible[faces[out["rast"][..., 3].long().unique()[1:] - 1].reshape(-1)] = True
    moved = grad.norm(dim=-1) > 0
    assert moved.sum() > 100
    assert not (moved & ~visible).any()  # the far side gets nothing: visibility is not differentiable
    assert (colors.grad.norm(dim=-1) > 0)[visible].float().mean() > 0.9


def test_gradcheck_barycentrics_float64():
    clip = torch.tensor(
        [[-0.71, -0.62, 0.1, 1.0], [0.83, -0.35, 0.3, 1.4], [-0.12, 0.77, -0.2, 0.9], [0.52, 0.64, 0.4, 1.2]],
        dtype=torch.float64,
        requires_grad=True,
    )
    faces = torch.tensor([[0, 1, 2], [1, 3, 2]])
    attr = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)

    def f(c, a):
        rast = rasterize(c, faces, (9, 11))
        return interpolate(a, rast, faces), rast[..., :3]

    assert torch.autograd.gradcheck(f, (clip, attr), eps=1e-6, atol=1e-5)


def test_optimising_vertices_matches_a_target_render():
    # Interior gradients only: a big triangle's colours and depth pull its vertices to the target.
    fov, size = 50.0, 32
    c2w = orbit_camera(0, 0, 2.5, fov, size).c2w[None]
    colors = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    faces = torch.tensor([[0, 1, 2]])
    target_v = torch.tensor([[-0.9, 0.0, -0.8], [0.9, 0.0, -0.7], [0.0, 0.0, 0.9]])
    target = render_mesh(target_v, faces, c2w, fov, size, size, vertex_colors=colors)["rgb"]
    start = target_v + torch.tensor([[0.12, 0.0, 0.1], [-0.1, 0.0, 0.12], [0.08, 0.0, -0.1]])
    v = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([v], lr=0.01)
    losses = []
    for _ in range(30):
        out = render_mesh(v, faces, c2w, fov, size, size, vertex_colors=colors)
        both = out["mask"] * (target.sum(-1, keepdim=True) > 0)
        loss = ((out["rgb"] - target).square() * both).sum() / both.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0]
    start_err = (_screen(start, c2w, fov) - _screen(target_v, c2w, fov)).norm()
    assert (_screen(v.detach(), c2w, fov) - _screen(target_v, c2w, fov)).norm() < 0.2 * start_err


def test_antialias_gives_silhouette_gradients_and_fits_a_mask():
    fov, size = 40.0, 32
    c2w = orbit_camera(0, 0, 2.5, fov, size).c2w[None]
    faces = torch.tensor([[0, 1, 2]])
    target_v = torch.tensor([[-0.5, 0.0, -0.4], [0.5, 0.0, -0.4], [0.0, 0.0, 0.5]])
    target = render_mesh(target_v, faces, c2w, fov, size, size, antialias=True)["mask"].detach()

    v = target_v.clone().requires_grad_(True)
    hard = render_mesh(v, faces, c2w, fov, size, size)["mask"]
    assert not hard.requires_grad  # a plain white silhouette has no vertex gradient without antialias

    start = target_v + torch.tensor([0.15, 0.0, 0.1])
    v = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([v], lr=0.01)
    losses = []
    for _ in range(30):
        mask = render_mesh(v, faces, c2w, fov, size, size, antialias=True)["mask"]
        loss = (mask - target).square().mean()
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0]
    start_err = (_screen(start, c2w, fov) - _screen(target_v, c2w, fov)).norm()
    assert (_screen(v.detach(), c2w, fov) - _screen(target_v, c2w, fov)).norm() < 0.2 * start_err


@pytest.mark.parametrize("edge_px", [9.3, 9.7])
def test_antialias_gives_box_filter_coverage_at_a_straight_edge(edge_px):
    # A quad facing the camera whose right edge sits at a known sub-pixel position (pixel centres at integers).
    fov, size, dist = 40.0, 16, 2.0
    half = dist * math.tan(math.radians(fov) / 2)  # world half-width of the view on the plane y = 0
    x_edge = ((edge_px + 0.5) / (size / 2) - 1.0) * half
    quad = torch.tensor([[-3.0, 0.0, -3.0], [x_edge, 0.0, -3.0], [x_edge, 0.0, 3.0], [-3.0, 0.0, 3.0]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    mask = render_mesh(quad, faces, orbit_camera(0, 0, dist, fov, size).c2w, fov, size, size, antialias=True)["mask"]
    coverage = (edge_px + 0.5 - torch.arange(size, dtype=torch.float32)).clamp(0.0, 1.0)
    torch.testing.assert_close(mask[0, :, :, 0], coverage.expand(size, size), atol=1e-4, rtol=0)


def test_antialias_changes_only_silhouette_pixels():
    ball = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
    vertices, faces = _mesh(ball)
    fov, size = 40.0, 48
    clip = _clip(vertices, orbit_camera(10, 20, 2.5, fov, size).c2w, fov, size, size)
    rast = rasterize(clip, faces, (size, size))
    color = interpolate(torch.rand(vertices.shape[0], 3), rast, faces)
    out = antialias(color, rast, clip, faces)
    changed = (out - color).abs().sum(-1)[0] > 1e-6
    mask = rast[0, ..., 3] > 0
    edge = torch.zeros_like(mask)  # pixels with a 4-neighbour on the other side of the silhouette
    edge[:, 1:] |= mask[:, 1:] != mask[:, :-1]
    edge[:, :-1] |= mask[:, 1:] != mask[:, :-1]
    edge[1:] |= mask[1:] != mask[:-1]
    edge[:-1] |= mask[1:] != mask[:-1]
    assert changed.any()
    assert not (changed & ~edge).any()  # interior edges between triangles are left alone


def test_texture_lookup_and_vertex_normals():
    quad = torch.tensor([[-1.0, 0.0, -1.0], [1.0, 0.0, -1.0], [1.0, 0.0, 1.0], [-1.0, 0.0, 1.0]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    uv = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    texture = torch.zeros(2, 2, 3)
    texture[0, :, 0] = 1.0  # top texture row red: v near 1, the top of the quad (world +Z)
    texture[1, :, 1] = 1.0  # bottom row green
    fov, size = 30.0, 32
    out = render_mesh(
        quad, faces, orbit_camera(0, 0, 3.0, fov, size).c2w, fov, size, size, uv=uv, texture=texture,
        background=(0.0, 0.0, 1.0), normals="vertex",
    )
    rgb, mask = out["rgb"][0], out["mask"][0, ..., 0] > 0
    assert rgb[2, size // 2, 0] > 0.99 and rgb[size - 3, size // 2, 1] > 0.99
    assert torch.allclose(rgb[~mask], torch.tensor([0.0, 0.0, 1.0]))
    n = out["normal"][0][mask]
    torch.testing.assert_close(n.abs(), torch.tensor([0.0, 1.0, 0.0]).expand_as(n), atol=1e-5, rtol=0)


def test_empty_mesh_and_geometry_behind_camera_give_empty_images():
    vertices = torch.zeros(0, 3, requires_grad=True)
    faces = torch.zeros(0, 3, dtype=torch.int64)
    c2w = orbit_camera(0, 0, 2.0, 40.0, 16).c2w
    out = render_mesh(vertices, faces, c2w, 40.0, 16, 24, background=0.5)
    assert out["rast"].shape == (1, 16, 24, 4) and (out["rast"] == 0).all()
    assert (out["mask"] == 0).all() and (out["rgb"] == 0.5).all()
    rast = rasterize(torch.zeros(1, 0, 4), faces, (8, 8))
    assert rast.shape == (1, 8, 8, 4) and (rast == 0).all()
    assert (antialias(torch.ones(1, 8, 8, 3), rast, torch.zeros(1, 0, 4), faces) == 1).all()
    behind = torch.tensor([[-0.5, -4.0, -0.5], [0.5, -4.0, -0.5], [0.0, -4.0, 0.5]])  # camera at y = -2 looks to +y
    assert (render_mesh(behind, torch.tensor([[0, 1, 2]]), c2w, 40.0, 16, 16)["mask"] == 0).all()


def test_bad_inputs_raise_clear_errors():
    clip = torch.rand(5, 4)
    faces = torch.tensor([[0, 1, 2]])
    with pytest.raises(ValueError, match="clip_pos"):
        rasterize(torch.rand(5, 3), faces, (8, 8))
    with pytest.raises(ValueError, match="faces"):
        rasterize(clip, torch.tensor([[0, 1, 2, 3]]), (8, 8))
    with pytest.raises(TypeError, match="int32 or int64"):
        rasterize(clip, faces.float(), (8, 8))
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        rasterize(clip, torch.tensor([[0, 1, 5]]), (8, 8))
    with pytest.raises(ValueError, match="resolution"):
        rasterize(clip, faces, (0, 8))
    with pytest.raises(ValueError, match="resolution"):
        rasterize(clip, faces, (8,))
    rast = rasterize(clip, faces, (8, 8))
    with pytest.raises(ValueError, match="batch"):
        interpolate(torch.rand(3, 5, 2), rast, faces)
    with pytest.raises(ValueError, match="attr"):
        interpolate(torch.rand(5), rast, faces)
    with pytest.raises(ValueError, match="color"):
        antialias(torch.rand(1, 4, 4, 3), rast, clip, faces)
    with pytest.raises(ValueError, match="c2w"):
        perspective_projection(torch.eye(3), 40.0, 1.0)
    with pytest.raises(ValueError, match="near"):
        perspective_projection(torch.eye(4), 40.0, 1.0, near=1.0, far=0.5)
    with pytest.raises(BackendUnavailableError, match="unknown"):
        rasterize(clip, faces, (8, 8), backend="opengl")
    if not backend_status()["nvdiffrast"].available:
        with pytest.raises(BackendUnavailableError, match="nvdiffrast"):
            rasterize(clip, faces, (8, 8), backend="nvdiffrast")


@pytest.mark.cuda
def test_nvdiffrast_matches_torch_backend():
    if not backend_status()["nvdiffrast"].available:
        pytest.skip(backend_status()["nvdiffrast"].reason)
    vertices, faces = _asymmetric_mesh()
    fov, height, width = 45.0, 48, 64
    c2w = orbit_camera(30, 20, 2.2, fov, width, height).c2w
    clip = _clip(vertices, c2w, fov, height, width).cuda()
    faces = faces.cuda()
    colors = torch.rand(vertices.shape[0], 3, device="cuda")
    ref = rasterize(clip, faces, (height, width), backend="torch")
    nv = rasterize(clip, faces, (height, width), backend="nvdiffrast")
    same = ref[..., 3] == nv[..., 3]
    assert same.float().mean() > 0.99
    torch.testing.assert_close(nv[same], ref[same], atol=1e-4, rtol=1e-4)
    img_ref = interpolate(colors, ref, faces, backend="torch")
    img_nv = interpolate(colors, nv, faces, backend="nvdiffrast")
    torch.testing.assert_close(img_nv[same], img_ref[same], atol=1e-4, rtol=1e-4)
