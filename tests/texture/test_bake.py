"""Rasterizing UV atlases and baking colours: orientation, accuracy, seam dilation, UV reuse."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import trimesh
from scipy import ndimage

from engine_server.texture import (
    BakeConfig,
    UnwrapConfig,
    UVMesh,
    bake_onto_uvs,
    bake_texture,
    dilate,
    push_pull_fill,
    rasterize_uv,
    reuse_or_unwrap,
    unwrap,
)

RED = torch.tensor([1.0, 0.0, 0.0])
BLUE = torch.tensor([0.0, 0.0, 1.0])


def red_blue(p: torch.Tensor) -> torch.Tensor:
    """Red where x > 0, blue elsewhere."""
    return torch.where(p[:, :1] > 0, RED, BLUE)


def smooth_colour(p: torch.Tensor) -> torch.Tensor:
    """A colour that varies smoothly with position and is never black."""
    return (0.5 + p.float()).clamp(0.05, 1.0)


@pytest.fixture(scope="module")
def sphere_uv() -> UVMesh:
    m = trimesh.creation.icosphere(subdivisions=3, radius=0.45)
    return unwrap(m.vertices, m.faces, UnwrapConfig(texture_size=256))


def quad(uv_lo=(0.0, 0.0), uv_hi=(1.0, 1.0)) -> UVMesh:
    """Unit quad in the z = 0 plane whose vertex (x, y, 0) has UV lo + (x, y) * (hi - lo)."""
    xy = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    lo, hi = np.array(uv_lo), np.array(uv_hi)
    return UVMesh(
        vertices=np.column_stack([xy, np.zeros(4)]),
        faces=np.array([[0, 1, 2], [0, 2, 3]]),
        uvs=lo + xy * (hi - lo),
        vmapping=np.arange(4),
    )


def sample_nearest(texture: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Texel at glTF UVs (top-left origin): row = floor(v S), column = floor(u S); (N, 3) in [0, 1]."""
    h, w = texture.shape[:2]
    col = np.clip(np.floor(uv[:, 0] * w).astype(int), 0, w - 1)
    row = np.clip(np.floor(uv[:, 1] * h).astype(int), 0, h - 1)
    return texture[row, col, :3].astype(np.float64) / 255.0


def sample_bilinear(texture: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear lookup at glTF UVs with texel centres at (j + 0.5) / S, clamp to edge."""
    img = texture[..., :3].astype(np.float64) / 255.0
    h, w = img.shape[:2]
    x = uv[:, 0] * w - 0.5
    y = uv[:, 1] * h - 0.5
    x0 = np.floor(x).astype(int)
    y0 = np.floor(y).astype(int)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]

    def at(r, c):
        return img[np.clip(r, 0, h - 1), np.clip(c, 0, w - 1)]

    return (at(y0, x0) * (1 - fx) * (1 - fy) + at(y0, x0 + 1) * fx * (1 - fy)
            + at(y0 + 1, x0) * (1 - fx) * fy + at(y0 + 1, x0 + 1) * fx * fy)


def test_texel_centres_follow_gltf_uv_orientation():
    # Colour = position = UV here, so texel (row i, col j) must hold ((j + .5) / S, (i + .5) / S):
    # row 0 of the image is v = 0 (top), column 0 is u = 0 (left).
    S = 16
    tex = bake_texture(quad(), lambda p: torch.stack([p[:, 0], p[:, 1], torch.zeros_like(p[:, 0])], 1), size=S)
    centres = (np.arange(S) + 0.5) / S
    np.testing.assert_allclose(tex[0, :, 0] / 255.0, centres, atol=1 / 255)  # red grows left to right
    np.testing.assert_allclose(tex[:, 0, 1] / 255.0, centres, atol=1 / 255)  # green grows top to bottom
    assert tex[0, 0, 1] < 10 and tex[-1, 0, 1] > 245  # top row is v = 0


def test_partial_quad_lands_in_the_top_left_of_the_image():
    # UVs u in [0, 0.5], v in [0, 0.25]: glTF puts that in the top-left corner of the image.
    S = 32
    r = rasterize_uv(quad((0.0, 0.0), (0.5, 0.25)), S, conservative=False)
    rows, cols = np.nonzero(r.mask.numpy())
    assert rows.min() == 0 and rows.max() == S // 4 - 1
    assert cols.min() == 0 and cols.max() == S // 2 - 1
    assert r.mask.sum().item() == (S // 4) * (S // 2)
    # positions: texel (i, j) shows the point with x = u / 0.5, y = v / 0.25
    i, j = 3, 5
    expect = [((j + 0.5) / S) / 0.5, ((i + 0.5) / S) / 0.25, 0.0]
    np.testing.assert_allclose(r.positions[i, j].numpy(), expect, atol=1e-6)


def test_rasterize_matches_brute_force_reference():
    rng = np.random.default_rng(1)
    n_faces, S = 12, 24
    uvs = rng.uniform(0.0, 1.0, size=(n_faces * 3, 2))
    verts = rng.normal(size=(n_faces * 3, 3))
    mesh = UVMesh(vertices=verts, faces=np.arange(n_faces * 3).reshape(-1, 3), uvs=uvs, vmapping=np.arange(n_faces * 3))
    r = rasterize_uv(mesh, S, conservative=False, chunk=50)  # tiny chunks exercise the chunking
    centres = (np.stack(np.meshgrid(np.arange(S), np.arange(S), indexing="xy"), -1).reshape(-1, 2) + 0.5) / S
    ref_face = np.full(S * S, -1)
    ref_pos = np.zeros((S * S, 3))
    for f in range(n_faces):  # reference: per face, vectorized over texels, last (highest) face wins
        a, b, c = mesh.uvs[mesh.faces[f]].astype(np.float64)
        m = np.array([[b[0] - a[0], c[0] - a[0]], [b[1] - a[1], c[1] - a[1]]])
        lb, lc = np.linalg.solve(m, (centres - a).T)
        la = 1 - lb - lc
        inside = (la >= -1e-9) & (lb >= -1e-9) & (lc >= -1e-9)
        ref_face[inside] = f
        corners = mesh.vertices[mesh.faces[f]].astype(np.float64)
        ref_pos[inside] = (np.stack([la, lb, lc], 1)[inside, :, None] * corners).sum(1)
    got_face = r.face_id.numpy().reshape(-1)
    same = got_face == ref_face
    assert same.mean() > 0.995  # only texel centres on an edge may be decided differently
    ok = same & (ref_face >= 0)
    assert ok.sum() > 50
    np.testing.assert_allclose(r.positions.numpy().reshape(-1, 3)[ok], ref_pos[ok], atol=1e-4)
    np.testing.assert_allclose(r.barycentrics.numpy().reshape(-1, 3)[ok].sum(1), 1.0, atol=1e-5)


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    t = np.clip(((p - a) * ab).sum(1) / np.maximum((ab * ab).sum(1), 1e-20), 0.0, 1.0)
    return np.linalg.norm(a + t[:, None] * ab - p, axis=1)


def test_conservative_adds_texels_overlapping_triangles(sphere_uv):
    S = 128
    strict = rasterize_uv(sphere_uv, S, conservative=False)
    cons = rasterize_uv(sphere_uv, S, conservative=True)
    assert torch.equal(strict.inside, cons.inside)
    assert torch.equal(strict.mask, strict.inside)
    extra = (cons.mask & ~cons.inside).numpy()
    assert extra.any()
    # each added texel's centre is within half a texel diagonal of the triangle it shows ...
    rows, cols = np.nonzero(extra)
    centre = np.stack([cols, rows], 1) + 0.5
    tri = sphere_uv.uvs[sphere_uv.faces[cons.face_id.numpy()[rows, cols]]].astype(np.float64) * S
    dist = np.min([_segment_distance(centre, tri[:, i], tri[:, (i + 1) % 3]) for i in range(3)], axis=0)
    assert dist.max() <= np.sqrt(0.5) + 1e-3
    # ... and shows the point of that triangle nearest to it in UV space
    lam = cons.barycentrics.numpy()[rows, cols].astype(np.float64)
    assert lam.min() >= 0 and np.allclose(lam.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm((lam[:, :, None] * tri).sum(1) - centre, axis=1), dist, atol=1e-3)
    # every texel shows a point on the surface (radius 0.45 sphere, flat facets slightly inside)
    radius = cons.positions[cons.mask].norm(dim=1)
    assert radius.max() <= 0.45 + 1e-5 and radius.min() > 0.42


def test_baked_colour_matches_field_at_face_centres(sphere_uv):
    tex = bake_texture(sphere_uv, smooth_colour, size=128)
    assert tex.shape == (128, 128, 3) and tex.dtype == np.uint8
    tri_uv = sphere_uv.uvs[sphere_uv.faces].mean(1)
    centre = sphere_uv.vertices[sphere_uv.faces].mean(1)
    expect = smooth_colour(torch.from_numpy(centre)).numpy()
    err = np.abs(sample_bilinear(tex, tri_uv) - expect)
    assert err.mean() < 0.01 and err.max() < 0.05


def test_red_blue_sphere_samples_back(sphere_uv):
    tex = bake_texture(sphere_uv, red_blue, size=128)
    centre = sphere_uv.vertices[sphere_uv.faces].mean(1)
    got = sample_nearest(tex, sphere_uv.uvs[sphere_uv.faces].mean(1))
    expect = red_blue(torch.from_numpy(centre)).numpy()
    far = np.abs(centre[:, 0]) > 0.05  # faces not straddling the colour boundary
    assert np.abs(got[far] - expect[far]).max() < 1 / 255 + 1e-9
    assert np.abs(got - expect).max(1).mean() < 0.02


@pytest.mark.parametrize("radius", [2, 6])
def test_dilation_fills_the_seam_band_and_no_further(sphere_uv, radius):
    S = 128
    tex = bake_texture(sphere_uv, smooth_colour, size=S, dilate=radius, fill_rest=False)
    valid = rasterize_uv(sphere_uv, S).mask.numpy()
    band = ndimage.binary_dilation(valid, structure=np.ones((3, 3)), iterations=radius)
    background = (tex == 0).all(axis=2)
    assert not (band & background).any()  # no background texel within `radius` of a valid one
    assert (~band & ~background).sum() == 0  # dilation stops at the radius
    # dilated texels copy neighbouring colours (all channels >= 0.05 in smooth_colour)
    assert tex[band].min() >= int(0.05 * 255)


def test_fill_rest_leaves_no_background(sphere_uv):
    tex = bake_texture(sphere_uv, smooth_colour, size=64)
    assert not (tex == 0).all(axis=2).any()


def test_dilate_and_push_pull_keep_valid_texels():
    img = torch.zeros(9, 9, 3)
    mask = torch.zeros(9, 9, dtype=torch.bool)
    img[4, 4] = torch.tensor([0.2, 0.4, 0.6])
    mask[4, 4] = True
    out, m = dilate(img, mask, 2)
    assert m.sum().item() == 25 and torch.allclose(out[m], torch.tensor([0.2, 0.4, 0.6]))
    filled = push_pull_fill(out, m)
    assert torch.allclose(filled, torch.tensor([0.2, 0.4, 0.6]).expand(9, 9, 3), atol=1e-6)
    with pytest.raises(ValueError):
        dilate(img, mask[:3], 1)


def test_bake_rejects_bad_colour_functions(sphere_uv):
    with pytest.raises(ValueError, match="color_fn must return"):
        bake_texture(sphere_uv, lambda p: p[:, :2], size=16)
    with pytest.raises(ValueError, match="NaN"):
        bake_texture(sphere_uv, lambda p: torch.full_like(p, float("nan")), size=16)
    with pytest.raises(TypeError):
        bake_texture(sphere_uv, smooth_colour, sizes=16)  # typo in an override
    with pytest.raises(ValueError, match="size"):
        BakeConfig(size=0)


def test_bake_chunks_colour_queries(sphere_uv):
    sizes = []

    def fn(p):
        sizes.append(len(p))
        return smooth_colour(p)

    a = bake_texture(sphere_uv, fn, size=64, chunk=500)
    assert max(sizes) <= 500 and len(sizes) > 1
    b = bake_texture(sphere_uv, smooth_colour, size=64)
    np.testing.assert_array_equal(a, b)


def test_bake_onto_uvs_reuses_vertex_and_corner_uvs(sphere_uv):
    v, f, uv = sphere_uv.vertices, sphere_uv.faces, sphere_uv.uvs
    mesh, tex = bake_onto_uvs(v, f, uv, smooth_colour, size=64)
    np.testing.assert_array_equal(mesh.uvs, uv)
    np.testing.assert_array_equal(mesh.faces, f)
    np.testing.assert_array_equal(tex, bake_texture(sphere_uv, smooth_colour, size=64))
    # the same layout given per corner (as Blender stores it) bakes the same texture
    corner_mesh, corner_tex = bake_onto_uvs(torch.from_numpy(v), torch.from_numpy(f), uv[f], smooth_colour, size=64)
    np.testing.assert_array_equal(corner_mesh.uvs[corner_mesh.faces], uv[f])
    np.testing.assert_array_equal(corner_tex, tex)


def test_reuse_or_unwrap_unwraps_missing_or_unusable_uvs(sphere_uv, caplog):
    src = trimesh.creation.icosphere(subdivisions=1, radius=0.5)
    fresh = reuse_or_unwrap(src.vertices, src.faces, None, UnwrapConfig(texture_size=64))
    assert len(fresh.vertices) > len(src.vertices)  # xatlas split seams
    with caplog.at_level(logging.WARNING):
        again = reuse_or_unwrap(src.vertices, src.faces, np.zeros((len(src.vertices), 2)), UnwrapConfig(texture_size=64))
    assert "unusable" in caplog.text
    np.testing.assert_array_equal(again.vmapping[again.faces], src.faces)
    with pytest.raises(ValueError, match="uvs must be"):
        reuse_or_unwrap(src.vertices, src.faces, np.zeros((3, 2)))


def test_build_asset_supersamples_small_maps_and_not_2048_ones():
    from engine_server.texture.asset import AssetConfig, build_asset, default_supersample

    assert default_supersample(512) == 2 and default_supersample(2048) == 1 and default_supersample(4096) == 1
    sphere = trimesh.creation.icosphere(subdivisions=3)
    mesh, report = build_asset(sphere.vertices, sphere.faces, lambda p: torch.full_like(p, 0.5),
                               AssetConfig(faces=200, texture_size=64))
    assert report["supersample"] == 2 and report["faces"] <= 200 and len(mesh.faces) == report["faces"]
    assert mesh.normal_map is not None and mesh.normal_map.shape == (64, 64, 3)
