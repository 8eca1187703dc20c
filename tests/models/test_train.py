"""Training of the bundled prior: reproducible first losses, exact resume, EMA export loads."""
from __future__ import annotations

import pytest
import torch

from engine_server.models.bundled.model import BundledModelConfig
from engine_server.models.bundled.prior import BundledPrior
from engine_server.models.bundled.train import TrainConfig, build_dataset, make_batch, train


@pytest.fixture(scope="module")
def data():
    return build_dataset(views=4, resolution=32, seed=0, cache_dir=None, progress=False)


def tiny(tmp_path, **kw) -> TrainConfig:
    cfg = TrainConfig(out_dir=str(tmp_path), steps=4, batch_size=4, warmup=2, checkpoint_every=2, threads=1,
                      model=BundledModelConfig(block_out_channels=(16, 16, 16), norm_num_groups=8))
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_same_seed_gives_the_same_first_losses(tmp_path, data):
    a = train(tiny(tmp_path / "a", steps=3), progress=False, data=data)["losses"]
    b = train(tiny(tmp_path / "b", steps=3), progress=False, data=data)["losses"]
    c = train(tiny(tmp_path / "c", steps=3, seed=1), progress=False, data=data)["losses"]
    assert len(a) == 3 and a == b
    assert a != c


def test_interrupted_run_resumes_to_the_same_weights(tmp_path, data):
    straight = train(tiny(tmp_path / "straight"), progress=False, data=data)
    first = train(tiny(tmp_path / "resumed", steps=2), progress=False, data=data)
    assert first["step"] == 2
    resumed = train(tiny(tmp_path / "resumed"), progress=False, data=data)  # same folder: resumes at step 2
    assert resumed["step"] == 4
    assert resumed["losses"] == straight["losses"]
    sa = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    sb = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k
    for k, v in sa["ema"]["shadow"].items():
        assert torch.equal(v, sb["ema"]["shadow"][k]), k


def test_ema_export_loads_as_a_prior(tmp_path, data):
    train(tiny(tmp_path, steps=2), progress=False, data=data)
    prior = BundledPrior.load(tmp_path / "ema")
    assert prior.resolution == 32 and prior.prediction_type == "v_prediction"
    assert prior.background_rgb == pytest.approx((0.0, 0.75, 0.75))
    x = torch.randn(2, 3, 32, 32)
    out = prior.predict(x, torch.tensor([10, 900]), "a red cube", torch.eye(4).expand(2, 4, 4).clone())
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()


def test_batches_pair_reference_and_target_of_the_same_object(data):
    cfg = TrainConfig(batch_size=64, image_cond_prob=1.0)
    b = make_batch(data, cfg, torch.Generator().manual_seed(0))
    assert b["ref_present"].all() and b["cam_present"].all()
    # the reference shows the same colour as the target: compare mean foreground colours
    assert b["x0"].shape == b["ref_image"].shape == (64, 3, 32, 32)
    frac_prompt = float((b["shape_idx"] >= 0).float().mean())
    assert 0.1 < frac_prompt < 0.6  # prompt kept with probability prompt_with_image (0.3)


def test_a_shape_camera_branch_fine_tunes_from_weights_without_it(tmp_path, data):
    import dataclasses

    from engine_server.models.bundled.model import BundledUNet, camera_features, load_model, pose_features
    from engine_server.models.bundled.train import init_weights

    train(tiny(tmp_path / "base", steps=2), progress=False, data=data)
    base = load_model(tmp_path / "base" / "ema")
    cfg = tiny(tmp_path / "ft", steps=3, init_from=str(tmp_path / "base" / "ema"))
    cfg.model = dataclasses.replace(cfg.model, shape_camera=True)
    start = BundledUNet(cfg.model)
    assert all(k.startswith("shape_camera_embed.") for k in init_weights(start, cfg.init_from))
    # The branch starts at zero: the new network conditions exactly as the one it came from.
    cams = torch.eye(4).expand(3, 4, 4).clone()
    cams[:, :3, 3] = torch.tensor([[0.0, -2.5, 0.5], [2.5, 0.0, 0.5], [1.7, -1.7, 0.5]])
    args = (torch.tensor([0, 0, 8]), torch.tensor([1, 1, 2]), camera_features(cams), torch.ones(3, dtype=torch.bool),
            torch.zeros(3, 17), torch.zeros(3, dtype=torch.bool))
    with torch.no_grad():
        assert torch.equal(start.condition(*args), base.condition(*args))
    train(cfg, progress=False, data=data)  # trains it, at new_lr_scale times the rate
    tuned = load_model(tmp_path / "ft" / "ema")
    assert float(tuned.shape_camera_embed.linear_2.weight.detach().abs().max()) > 0
    # Azimuth harmonics of the three cameras (0, 90 and 45 degrees round): a cube's period is 90 degrees.
    harm = pose_features(camera_features(cams))
    assert torch.allclose(harm[0, 7], harm[1, 7], atol=1e-5)  # cos(4 az) at 0 and 90 degrees
    assert not torch.allclose(harm[0, 7], harm[2, 7], atol=1e-2)  # and not at 45


def test_init_from_refuses_weights_of_another_architecture(tmp_path, data):
    train(tiny(tmp_path / "base", steps=1), progress=False, data=data)
    cfg = tiny(tmp_path / "other", steps=1, init_from=str(tmp_path / "base" / "ema"))
    cfg.model = BundledModelConfig(block_out_channels=(16, 16, 32), norm_num_groups=8)
    with pytest.raises((ValueError, RuntimeError), match="do not fit|size mismatch"):
        train(cfg, progress=False, data=data)
