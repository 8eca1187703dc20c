"""Image to 3D the DreamCraft3D way (issue 25): hybrid distillation, progressive views, geometry alignment.

Each option changes what it should, on the real bundled prior (its text and image modes are the
hybrid's two priors) and on tiny published-layout folders (Stable Diffusion + Zero123); bad values
fail with one clear error on the wire, the command line and the request.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine_server.cameras import Camera, look_at, orbit_camera, orbit_position
from engine_server.guidance import Conditioning, GuidanceConfig, build_guidance, load_prior, tiny
from engine_server.guidance.hybrid import HybridGuidance
from engine_server.pipelines.image_to_3d import (
    ImageFitConfig,
    ImageTo3D,
    ImageTo3DRequest,
    hull_surface,
    view_window,
)
from engine_server.pipelines.kinds import KINDS, KindError
from kernels.rasterize import render_mesh

SMALL = {"coarse_steps": 30, "learning_rate": 0.03, "views_per_step": 1, "samples_per_ray": 32,
         "occupancy_resolution": 32, "tet_resolution": 32, "texture_size": 64, "preview_every": 1000,
         "checkpoint_every": 1000}


@pytest.fixture(scope="module")
def prior():
    return load_prior("bundled")


def _reference_rgba(size: int = 64) -> np.ndarray:
    """A red disc on a transparent film: the mask comes from the alpha."""
    yy, xx = np.mgrid[:size, :size]
    inside = (yy - size / 2 + 0.5) ** 2 + (xx - size / 2 + 0.5) ** 2 < (0.3 * size) ** 2
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[inside] = (200, 30, 30, 255)
    return rgba


def _rig() -> list[Camera]:
    """The reference camera given (no camera search): azimuth 0, elevation 15, the bundled prior's framing."""
    return [orbit_camera(0.0, 15.0, 2.5, 42.0, 32)]


# ------------------------------------------------------------------------------------------ hybrid


def test_hybrid_gradient_is_the_text_priors_plus_mu_times_the_novel_view_priors(prior):
    cams = torch.stack([orbit_camera(az, 20.0, 2.5, 42.0, 32).c2w for az in (40.0, 200.0)])
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 32, 32, generator=gen).requires_grad_(True)
    cond = Conditioning(prompt="a red cube", reference_image=torch.rand(3, 32, 32, generator=gen),
                        reference_c2w=look_at(orbit_position(0.0, 15.0, 2.5)), fov_y_deg=42.0)

    def guidance(seed: int):
        return build_guidance(prior, GuidanceConfig(guidance_scale=3.0, seed=seed))

    def grad(g, c) -> torch.Tensor:
        images.grad = None
        g(images, cams, c, 10, 100).loss.backward()
        return images.grad.clone()

    hybrid = HybridGuidance(guidance(1), guidance(2), weight=2.0)
    together = grad(hybrid, cond)
    text = grad(guidance(1), Conditioning(prompt="a red cube"))  # the text branch sees no reference
    image = grad(guidance(2), cond)
    torch.testing.assert_close(together, text + 2.0 * image)
    assert (text - image).abs().mean() > 1e-3  # two different priors' gradients, not one twice
    assert (grad(guidance(1), cond) - text).abs().mean() > 1e-3  # dropping the reference matters


def test_hybrid_needs_a_prompt_and_refuses_a_bad_weight(prior):
    with pytest.raises(ValueError, match="hybrid guidance needs a prompt"):
        ImageTo3D(ImageTo3DRequest(image=_reference_rgba(), rig=_rig(), fit=ImageFitConfig(hybrid=True)), prior=prior)
    with pytest.raises(ValueError, match="hybrid_weight must be >= 0"):
        ImageFitConfig(hybrid=True, hybrid_weight=-1.0)
    with pytest.raises(ValueError, match="does not know this prompt"):
        ImageTo3D(ImageTo3DRequest(image=_reference_rgba(), rig=_rig(), prompt="a red teapot",
                                   fit=ImageFitConfig(hybrid=True)), prior=prior)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    root = tmp_path_factory.mktemp("published")
    tiny.make_stable_diffusion(root / "sd")
    tiny.make_novel_view(root / "zero123")
    return root


def test_published_priors_hybrid_through_the_same_interface(published):
    """Zero123 (the novel-view prior) + Stable Diffusion (text_model): one step scores both."""
    request = dict(image=_reference_rgba(), rig=_rig(), prompt="a red cube", model=str(published / "zero123"),
                   overrides={**SMALL, "render_resolution": 16}, fit=ImageFitConfig(hybrid=True, distill_start=0.0))
    with pytest.raises(ValueError, match="needs a text-to-image prior"):
        ImageTo3D(ImageTo3DRequest(**request))
    pipe = ImageTo3D(ImageTo3DRequest(**request, text_model=str(published / "sd")))
    assert pipe.guidance.text.prior.kind == "text" and pipe.guidance.image.prior.kind == "image"
    pipe.views = None
    loss, logs = pipe.coarse_loss()
    assert torch.isfinite(loss) and logs["sds_text"] > 0 and logs["sds_image"] > 0
    assert "text_guidance" in pipe.generators()  # its RNG travels with the checkpoints


# ------------------------------------------------------------------------------------------ progressive views


def test_progressive_views_widen_from_the_reference_to_all_around():
    fit = ImageFitConfig(distill_start=0.5, view_start_range=20.0, view_widen=0.5)
    start = view_window(fit, (30.0, 15.0), (-10.0, 60.0), 50, 100)
    assert start.azimuth == 30.0 and start.half_width == 20.0 and start.elevation == (-5.0, 35.0)
    middle = view_window(fit, (30.0, 15.0), (-10.0, 60.0), 62, 100)
    assert 20.0 < middle.half_width < 180.0 and -10.0 < middle.elevation[0] < -5.0
    end = view_window(fit, (30.0, 15.0), (-10.0, 60.0), 75, 100)
    assert end.half_width == 180.0 and end.elevation == (-10.0, 60.0)
    off = view_window(ImageFitConfig(), (30.0, 15.0), (-10.0, 60.0), 0, 100)
    assert off.half_width == 180.0 and off.elevation == (-10.0, 60.0)
    with pytest.raises(ValueError, match="view_start_range must be in"):
        ImageFitConfig(view_start_range=200.0)
    with pytest.raises(ValueError, match="view_widen must be in"):
        ImageFitConfig(view_widen=0.0)


def test_only_the_normal_alignment_is_on_by_default():
    """The one stage issue 25's table showed helping without a cost (see the ImageFitConfig field docs)."""
    fit = ImageFitConfig()
    assert fit.aligns and fit.normal_weight > 0 and fit.depth_weight == 0
    assert not fit.hybrid and fit.view_start_range is None


# ------------------------------------------------------------------------------------------ geometry alignment


def _sphere_masks(cams: torch.Tensor, fov: float, size: int, radius: float = 0.4) -> torch.Tensor:
    import trimesh

    s = trimesh.creation.icosphere(4, radius=radius)
    out = render_mesh(torch.as_tensor(s.vertices, dtype=torch.float32), torch.as_tensor(s.faces), cams, fov, size, size)
    return out["mask"][..., 0] > 0.5


def test_the_hull_estimate_of_a_sphere_has_its_depth_and_normals():
    views = torch.stack([orbit_camera(az, el, 2.5, 42.0, 32).c2w for az, el in
                         [(a, 10.0) for a in range(0, 360, 60)] + [(30.0, 55.0), (210.0, -5.0)]])
    masks = _sphere_masks(views, 42.0, 32)
    seen = torch.stack([orbit_camera(20.0, 25.0, 2.5, 42.0, 32).c2w])
    est = hull_surface(masks, views, torch.full((len(views),), 42.0), seen, torch.tensor([42.0]), 32)
    assert est["hit"].sum() > 100
    from engine_server.cameras import camera_rays

    o, d = (x.reshape(-1, 3) for x in camera_rays(seen[0], 42.0, 32, 32))
    hit = est["hit"].reshape(-1)
    b = (o * d).sum(-1)
    t_true = -b - (b * b - (o * o).sum(-1) + 0.4 ** 2).clamp_min(0).sqrt()
    err = (est["t"].reshape(-1) - t_true)[hit].abs()
    assert float(err.median()) < 0.03, float(err.median())  # about a voxel of the 64^3 lattice
    p = o + t_true[:, None] * d
    cos = (est["normal"].reshape(-1, 3) * torch.nn.functional.normalize(p, dim=-1)).sum(-1)[hit]
    assert float(cos.median()) > 0.97, float(cos.median())


def _coarse(prior, fit: ImageFitConfig) -> ImageTo3D:
    torch.set_num_threads(2)
    pipe = ImageTo3D(ImageTo3DRequest(image=_reference_rgba(), rig=_rig(), prompt="a red sphere", seed=0,
                                      overrides=dict(SMALL), views=4, fit=fit), prior=prior)
    pipe.coarse()
    return pipe


def _normal_term(pipe: ImageTo3D, estimate: dict) -> float:
    """The normal term at the reference view against ``estimate``, on a fixed render."""
    torch.manual_seed(0)
    pipe.alignment = estimate
    fit, pipe.fit = pipe.fit, ImageFitConfig(normal_weight=1.0)
    with torch.no_grad():
        _, terms = pipe._fit_loss(pipe.reference_c2w[None], torch.tensor([pipe.reference_fov]),
                                  pipe.reference_image[None], pipe.reference_mask[None], [0])
    pipe.fit = fit
    return float(terms["normal"])


@pytest.mark.slow
def test_alignment_pulls_the_fit_toward_the_estimated_normals_and_progressive_views_stay_near(prior):
    # The fit alone (no distillation): fast and steady.
    plain = _coarse(prior, ImageFitConfig(views_per_step=1, multiview_steps=4, distill_start=1.0, normal_weight=0.0))
    aligned = _coarse(prior, ImageFitConfig(views_per_step=1, multiview_steps=4, distill_start=1.0,
                                            depth_weight=1.0, normal_weight=2.0))
    estimate = aligned.alignment
    assert estimate is not None and plain.alignment is None and bool(estimate["hit"][0].any())
    assert _normal_term(aligned, estimate) < 0.8 * _normal_term(plain, estimate)
    # Progressive views: at the start of distillation every view is within the window around the reference.
    aligned.fit = ImageFitConfig(distill_start=0.5, view_start_range=20.0)
    aligned.step = int(0.5 * aligned.preset.coarse_steps)
    from engine_server.cameras import azimuth_elevation

    az, el = azimuth_elevation(aligned.distill_cameras(32)[0])
    off = (az - 0.0 + 180.0) % 360.0 - 180.0
    assert off.abs().max() <= 20.0 + 1e-3 and (el >= -5.0 - 1e-3).all() and (el <= 35.0 + 1e-3).all()


# ------------------------------------------------------------------------------------------ options


def test_wire_options_reach_the_fit_and_bad_values_are_refused():
    kind = KINDS["image"]
    run, overrides = kind.split_options({"hybrid": True, "hybrid_weight": 3, "view_start_range": 30,
                                         "depth_weight": 0.5, "normal_weight": 1.0, "coarse_steps": 10})
    assert overrides == {"coarse_steps": 10}
    from engine_server.pipelines.kinds import _view_settings

    fit = _view_settings(dict(run))["fit"]
    assert (fit.hybrid, fit.hybrid_weight, fit.view_start_range, fit.depth_weight, fit.normal_weight) == \
        (True, 3, 30, 0.5, 1.0)
    for options, message in [({"hybrid": "yes"}, "options.hybrid must be true or false"),
                             ({"hybrid_weight": -2}, "options.hybrid_weight must be >= 0"),
                             ({"view_start_range": 400}, "options.view_start_range must be in"),
                             ({"view_widen": 0}, "options.view_widen must be in"),
                             ({"normal_weight": "lots"}, "options.normal_weight must be a number")]:
        with pytest.raises(KindError, match=message):
            _view_settings(kind.split_options(options)[0])
    with pytest.raises(ValueError):  # a text job has no such option: a preset override it does not know
        from engine_server.pipelines.presets import get_preset

        get_preset("draft", **KINDS["text"].split_options({"hybrid": True})[1])


def test_cli_flags_are_checked_before_any_work(tmp_path, capsys):
    from engine_server.cli import main

    out = str(tmp_path / "x.glb")
    assert main(["generate", "a red cube", "--hybrid", "--out", out]) == 2
    assert "--hybrid apply to image to 3D: give --image" in capsys.readouterr().err
    assert main(["generate", "a red cube", "--image", "ref.png", "--hybrid-weight", "-1", "--out", out]) == 2
    assert "--hybrid-weight must be >= 0" in capsys.readouterr().err
    assert main(["generate", "--image", "ref.png", "--view-start-range", "190", "--out", out]) == 2
    assert "--view-start-range must be in [0, 180]" in capsys.readouterr().err
