"""The shipped bundled prior: loads offline, validates inputs, draws the prompted object."""
from __future__ import annotations

import pytest
import torch

from engine_server.models.bundled import procedural as P
from engine_server.models.bundled.evaluate import classify_color, foreground_mask
from engine_server.multiview import mask_iou
from engine_server.models.bundled.prior import DEFAULT_WEIGHTS_DIR, BundledPrior, Reference, UnknownPromptError
from engine_server.models.bundled.vocab import Caption


@pytest.fixture(scope="module")
def prior():
    return BundledPrior.load()


def test_shipped_weights_are_small_and_load_offline(prior, monkeypatch):
    total = sum(f.stat().st_size for f in DEFAULT_WEIGHTS_DIR.iterdir() if f.is_file())
    assert total <= 20 * 1024 * 1024
    assert (DEFAULT_WEIGHTS_DIR / "MODEL_CARD.md").is_file()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = BundledPrior.load()
    assert again.resolution == 32 and again.prediction_type == "v_prediction"
    assert set(again.vocabulary["colors"]) >= {"red", "green", "blue", "yellow", "orange", "purple", "white", "black"}


def test_missing_or_broken_weights_fail_naming_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        BundledPrior.load(tmp_path)
    (tmp_path / "config.json").write_text((DEFAULT_WEIGHTS_DIR / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(Exception, match="safetensors|header|model"):
        BundledPrior.load(tmp_path)


def test_unknown_prompt_is_refused_with_the_vocabulary(prior):
    with pytest.raises(UnknownPromptError, match="cube"):
        prior.predict(torch.zeros(1, 3, 32, 32), torch.tensor([500]), "a golden dragon", torch.eye(4)[None])
    with pytest.raises(ValueError, match="x_t must be"):
        prior.predict(torch.zeros(1, 3, 16, 16), torch.tensor([500]), "a red cube", torch.eye(4)[None])


def test_guidance_mixes_conditional_and_unconditional_branches(prior):
    cams = P.held_out_cameras().c2w[:2]
    x = torch.randn(2, 3, 32, 32)
    t = torch.tensor([700, 700])
    c = prior.predict(x, t, "a blue cone", cams)
    u = prior.predict(x, t, None, cams)
    g = prior.predict(x, t, "a blue cone", cams, guidance_scale=3.0)
    assert torch.allclose(g, u + 3.0 * (c - u), atol=1e-4)
    assert not torch.allclose(c, u, atol=1e-3)  # the prompt matters


def test_text_samples_at_held_out_cameras_show_the_prompted_object(prior):
    held = P.held_out_cameras()
    idx = torch.tensor([1, 6, 11])
    cams = P.orbit_cameras(held.azimuth[idx], held.elevation[idx], P.DEFAULT_DISTANCE, P.DEFAULT_FOV)
    imgs = prior.sample("a yellow cube", cams.c2w, steps=15, generator=torch.Generator().manual_seed(0))
    gt = P.render_caption(Caption("yellow", "cube"), cams)["rgb"]
    iou = mask_iou(foreground_mask(imgs), foreground_mask(gt))
    assert float(iou.mean()) > 0.6
    masks = foreground_mask(imgs)
    assert [classify_color(imgs[i], masks[i]) for i in range(3)].count("yellow") >= 2


def test_image_conditioned_novel_view_follows_the_reference(prior):
    ref_cam = P.orbit_cameras([0.0], [15.0], P.DEFAULT_DISTANCE, P.DEFAULT_FOV)
    target = P.orbit_cameras([100.0], [30.0], P.DEFAULT_DISTANCE, P.DEFAULT_FOV)
    scores = {}
    for shape in ("cube", "torus"):
        ref = P.render_caption(Caption("blue", shape), ref_cam)["rgb"][0]
        gt = P.render_caption(Caption("blue", shape), target)["rgb"]
        img = prior.sample(None, target.c2w, reference=Reference(ref, ref_cam.c2w[0]), steps=15,
                           generator=torch.Generator().manual_seed(0))
        scores[shape] = float(mask_iou(foreground_mask(img), foreground_mask(gt))[0])
    assert min(scores.values()) > 0.5, scores
