"""Image to 3D on the real bundled prior, from reference images rendered by real Blender (bpy, child process).

A red cube (transparent film: the alpha gives the mask) and a blue sphere (cyan world:
background removal by colour) become a cube-like red mesh and a round blue one; the
generated views' silhouettes match the reconstructed mesh's from the same cameras; bad
images fail with one clear error.
"""
from __future__ import annotations

import colorsys
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine_server.cameras import look_at, orbit_position
from engine_server.multiview import DEFAULT_ELEVATION, mask_iou
from engine_server.pipelines.image_to_3d import (
    BadImageError,
    ImageFitConfig,
    ImageTo3D,
    ImageTo3DRequest,
    foreground_mask,
    read_image,
)
from kernels.rasterize import render_mesh

RENDER = Path(__file__).resolve().parents[1] / "multiview" / "blender_render.py"
HAS_BPY = importlib.util.find_spec("bpy") is not None
SMALL = {"coarse_steps": 40, "learning_rate": 0.03, "views_per_step": 1, "samples_per_ray": 32, "occupancy_resolution": 32,
         "tet_resolution": 32, "texture_size": 64, "preview_every": 12, "checkpoint_every": 1000}
FIT = ImageFitConfig(views_per_step=1, multiview_steps=8, distill_start=0.6)


def blender_render(tmp: Path, shape: str, colour, transparent: bool) -> Path:
    spec = {"shape": shape, "color": colour, "fov_y_deg": 42.0, "size": 128, "transparent": transparent,
            "background": [0.0, 0.75, 0.75], "c2w": look_at(orbit_position(0.0, DEFAULT_ELEVATION, 2.5)).tolist()}
    (tmp / f"{shape}.json").write_text(json.dumps(spec))
    out = tmp / f"{shape}.png"
    proc = subprocess.run([sys.executable, str(RENDER), str(tmp / f"{shape}.json"), str(out)],
                          capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0 and out.is_file(), f"Blender render failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return out


@pytest.fixture(scope="module")
def prior():
    from engine_server.guidance import load_prior

    return load_prior("bundled")


def _reconstruct(prior, tmp: Path, shape: str, colour, transparent: bool):
    if not HAS_BPY:
        pytest.skip("Blender-as-a-module is not installed: pip install bpy==5.0.1 (needs Python 3.11)")
    torch.set_num_threads(2)
    image = blender_render(tmp, shape, colour, transparent)
    events = []
    pipe = ImageTo3D(ImageTo3DRequest(image=image, seed=0, overrides=dict(SMALL), views=4, fit=FIT),
                     progress=events.append, prior=prior, checkpoint_dir=tmp / f"{shape}-ckpt")
    result = pipe.run(tmp / f"{shape}.glb")
    return pipe, result, events


@pytest.fixture(scope="module")
def cube(prior, tmp_path_factory):
    return _reconstruct(prior, tmp_path_factory.mktemp("cube"), "cube", [0.8, 0.05, 0.05], transparent=True)


@pytest.fixture(scope="module")
def sphere(prior, tmp_path_factory):
    return _reconstruct(prior, tmp_path_factory.mktemp("sphere"), "sphere", [0.05, 0.1, 0.85], transparent=False)


VIEWS = {"front": ((0.0, -6.0, 0.0), (0.0, 0.0, 1.0)), "side": ((6.0, 0.0, 0.0), (0.0, 0.0, 1.0)),
         "top": ((0.0, 0.0, 6.0), (0.0, 1.0, 0.0))}


def _squareness(result, view: str) -> float:
    """Silhouette area over its bounding-box area from an axis view: 1 for an axis-aligned box, pi/4 for a sphere."""
    eye, up = VIEWS[view]
    c2w = look_at(eye, up=up)
    out = render_mesh(torch.as_tensor(result.vertices, dtype=torch.float32),
                      torch.as_tensor(result.faces, dtype=torch.int64), c2w, 14.0, 96, 96)
    mask = (out["mask"][0, ..., 0] > 0.5).numpy()
    rows, cols = np.nonzero(mask)
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    return float(mask.sum()) / float(box)


def _hue(result) -> tuple[float, float]:
    """Hue (degrees) and saturation of the median texture colour at the mesh's vertices."""
    tex = result.texture.astype(np.float32) / 255.0
    h, w = tex.shape[:2]
    uv = result.uvs
    px = np.clip((uv[:, 0] * w).astype(int), 0, w - 1)
    py = np.clip(((1.0 - uv[:, 1]) * h).astype(int), 0, h - 1)  # glTF UVs: v up from the bottom row
    rgb = np.median(tex[py, px, :3], axis=0)
    hue, _, sat = colorsys.rgb_to_hls(*rgb)
    return hue * 360.0, sat


def _silhouette_ious(pipe) -> torch.Tensor:
    verts, faces = pipe.field_mesh
    views = pipe.views
    out = render_mesh(torch.as_tensor(verts, dtype=torch.float32), torch.as_tensor(faces, dtype=torch.int64),
                      views.c2w, float(views.fovs[0]), 32, 32)
    return mask_iou(out["mask"][..., 0] > 0.5, views.masks)


@pytest.mark.slow
def test_red_cube_becomes_a_cube_like_red_mesh(cube, sphere):
    pipe, result, _ = cube
    extent = result.vertices.max(0) - result.vertices.min(0)
    assert extent.min() / extent.max() > 0.8, extent  # as wide as deep as tall
    # Box-like seen from the front (the reference's side) and from the side (generated views only).
    # The top view is still round (~0.78, like the sphere's): the prior's novel views are blobby.
    # Margin 0.07, was 0.08: image results are smoothed 4x as long as text ones (issue 16's dihedral bar), which
    # took this cube's front 0.868 -> 0.858 and its side 0.860 -> 0.891, and the sphere's front 0.776 -> 0.787
    # (a disc is pi/4 = 0.785).
    front, sphere_front = _squareness(result, "front"), _squareness(sphere[1], "front")
    assert front > 0.83 and front > sphere_front + 0.07, (front, sphere_front)
    assert _squareness(result, "side") > _squareness(sphere[1], "side") + 0.03
    hue, sat = _hue(result)
    assert (hue < 20 or hue > 340) and sat > 0.4, (hue, sat)
    assert pipe.mask_source == "alpha"


@pytest.mark.slow
def test_blue_sphere_becomes_a_round_blue_mesh(sphere):
    pipe, result, _ = sphere
    extent = result.vertices.max(0) - result.vertices.min(0)
    assert extent.min() / extent.max() > 0.8, extent
    assert all(0.65 < _squareness(result, v) < 0.82 for v in VIEWS)  # a disc (pi/4) from every side
    hue, sat = _hue(result)
    assert 200 < hue < 260 and sat > 0.4, (hue, sat)
    assert pipe.mask_source == "colour"


@pytest.mark.slow
@pytest.mark.parametrize("which", ["cube", "sphere"])
def test_generated_views_match_the_reconstruction(which, request):
    pipe, _, _ = request.getfixturevalue(which)
    ious = _silhouette_ious(pipe)
    assert ious.min() >= 0.7, ious


@pytest.mark.slow
def test_stages_events_and_sidecar(cube):
    pipe, result, events = cube
    stages = [e.stage for e in events]
    order = [s for i, s in enumerate(stages) if i == 0 or stages[i - 1] != s]
    assert order == ["views", "coarse", "extract", "texture", "export"]
    assert any(e.preview is not None for e in events if e.stage == "coarse")
    side = json.loads(result.glb_path.with_suffix(".json").read_text())
    assert side["kind"] == "image" and side["reference"]["mask_source"] == "alpha"
    assert side["views"]["count"] == len(pipe.views.images) == 4
    assert (pipe.checkpoint_dir / "views.pt").is_file()


def _png(arr: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"this is not an image at all", "cannot read reference image"),
    ("too-large", "too large"),
    ("plain", "no foreground"),
    ("noise", "no plain background"),
])
def test_bad_images_fail_with_one_clear_error(data, message, tmp_path):
    rng = np.random.default_rng(0)
    if data == "too-large":
        data = _png(np.zeros((4, 9000, 3), np.uint8))
    elif data == "plain":
        data = _png(np.full((64, 64, 3), (0, 191, 191), np.uint8))
    elif data == "noise":
        data = _png(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    path = tmp_path / "ref.png"
    path.write_bytes(data)
    with pytest.raises(BadImageError, match=message) as info:
        ImageTo3D(ImageTo3DRequest(image=path))
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


def test_missing_image_and_cli_error_line(tmp_path, capsys):
    from engine_server.cli import main

    with pytest.raises(BadImageError, match="does not exist"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"GIF89a-broken")
    assert main(["generate", "--image", str(tmp_path / "bad.png"), "--out", str(tmp_path / "x.glb")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot read reference image" in err[0]


def test_alpha_mask_and_colour_key_agree_on_a_synthetic_image():
    rgba = np.zeros((40, 40, 4), np.float32)
    rgba[..., :3] = (1.0, 1.0, 1.0)  # white studio background, opaque
    rgba[..., 3] = 1.0
    rgba[10:30, 12:28, :3] = (0.1, 0.8, 0.1)
    by_colour, how = foreground_mask(rgba)
    assert how == "colour" and by_colour.sum() == 20 * 16
    rgba[..., 3] = 0.0
    rgba[10:30, 12:28, 3] = 1.0
    by_alpha, how = foreground_mask(rgba)
    assert how == "alpha" and np.array_equal(by_alpha, by_colour)


TEXT_ONLY = dict(prompt="a blue sphere", seed=4, views=3, fit=ImageFitConfig(views_per_step=1, multiview_steps=4))
TINY = {**SMALL, "coarse_steps": 8, "checkpoint_every": 3, "preview_every": 1000}


def _text_only(prior, ckpt: Path, cancel_at: int | None = None) -> tuple[ImageTo3D, list]:
    events = []

    def cancelled() -> bool:
        coarse = [e.step for e in events if e.stage == "coarse"]
        return cancel_at is not None and bool(coarse) and coarse[-1] >= cancel_at

    return ImageTo3D(ImageTo3DRequest(overrides=dict(TINY), **TEXT_ONLY), progress=events.append,
                     cancelled=cancelled, prior=prior, checkpoint_dir=ckpt), events


@pytest.mark.slow
def test_without_an_image_the_reference_is_drawn_from_the_prompt_and_a_cancelled_run_resumes(prior, tmp_path):
    """The multiview route (text -> views -> 3D): cancel mid-fit, resume from the checkpoint, same mesh."""
    from engine_server.pipelines.events import Cancelled

    torch.set_num_threads(2)
    whole, events = _text_only(prior, tmp_path / "whole")
    result = whole.run(tmp_path / "whole.glb")
    assert whole.mask_source == "generated" and (tmp_path / "whole" / "reference.pt").is_file()
    # The drawn reference shows the prompt: blue, on the prior's cyan background.
    ref = whole.reference_image[:, whole.reference_mask]
    assert ref.shape[1] > 20 and float(ref[2].median()) > float(ref[0].median()) + 0.3
    strip = next(e.preview for e in events if e.stage == "views" and e.preview is not None)
    assert strip.shape == (32, 3 * 32, 3)
    assert json.loads(result.glb_path.with_suffix(".json").read_text())["kind"] == "multiview"

    first, _ = _text_only(prior, tmp_path / "split", cancel_at=4)
    with pytest.raises(Cancelled):
        first.run(tmp_path / "split.glb")
    second, events = _text_only(prior, tmp_path / "split")
    resumed = second.run(tmp_path / "split.glb")
    coarse = [e.step for e in events if e.stage == "coarse"]
    assert coarse[:2] == [3, 4], coarse  # begun at the step-3 checkpoint (the stage's first event), not from scratch
    assert torch.equal(second.reference_image, whole.reference_image)
    assert torch.equal(second.views.images, whole.views.images)
    assert np.array_equal(resumed.faces, result.faces) and np.allclose(resumed.vertices, result.vertices, atol=1e-6)


def test_without_an_image_or_a_prompt_there_is_nothing_to_draw(prior):
    with pytest.raises(ValueError, match="reference image, or a prompt"):
        ImageTo3D(ImageTo3DRequest(prompt="  "), prior=prior)


def test_multiview_cli_reconstructs_a_glb_from_the_views(tmp_path, capsys):
    from engine_server.cli import main

    rc = main(["multiview", "a red cube", "--out", str(tmp_path / "mv"), "--views", "3", "--steps", "4",
               "--strategy", "independent", "--glb", str(tmp_path / "cube.glb"), "--fit-steps", "6"])
    assert rc == 0, capsys.readouterr().err
    meta = json.loads((tmp_path / "mv" / "cameras.json").read_text())
    assert len(meta["views"]) == 3 and meta["strategy"] == "independent"
    from engine_server.export import load_glb

    assert len(load_glb(tmp_path / "cube.glb").faces) > 0
    assert main(["multiview", "a red cube", "--out", str(tmp_path / "x"), "--glb", str(tmp_path / "x.obj")]) == 2
    assert "--glb must be a .glb file" in capsys.readouterr().err
