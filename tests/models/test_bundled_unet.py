"""The bundled prior's own UNet is diffusers' ``UNet2DModel`` in all but the import: same parameter names,
same outputs, and the shipped weights load into either. The schedule computed without diffusers equals
diffusers' zero-terminal-SNR DDPM schedule."""
from __future__ import annotations

import torch
from diffusers import DDPMScheduler, UNet2DModel

from engine_server.models.bundled.model import BundledModelConfig, alphas_cumprod, load_model, make_scheduler
from engine_server.models.bundled.prior import DEFAULT_WEIGHTS_DIR
from engine_server.models.bundled.unet import BundledUNet2D


def _diffusers_twin(channels, layers, attention, groups) -> UNet2DModel:
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention))
    return UNet2DModel(sample_size=16, in_channels=7, out_channels=3, block_out_channels=channels,
                       layers_per_block=layers, down_block_types=down, up_block_types=up, norm_num_groups=groups,
                       attention_head_dim=min(32, min(channels)), class_embed_type="identity").eval()


def _ours(channels, layers, attention, groups) -> BundledUNet2D:
    return BundledUNet2D(7, 3, channels, layers, attention, groups, min(32, min(channels))).eval()


def test_same_parameters_and_outputs_as_diffusers_for_other_shapes_too():
    torch.manual_seed(0)
    # The shipped architecture and one with two layers per level, attention at two levels and four levels.
    for channels, layers, attention, groups in (((32, 64, 96), 1, (False, False, True), 16),
                                                ((16, 32, 32, 64), 2, (False, True, False, True), 8)):
        theirs, ours = _diffusers_twin(channels, layers, attention, groups), _ours(channels, layers, attention, groups)
        ref_state = theirs.state_dict()
        assert set(ours.state_dict()) == set(ref_state)
        for v in ref_state.values():  # diffusers zero-initialises some layers: make every weight count
            v.copy_(torch.randn_like(v) * 0.2)
        ours.load_state_dict(ref_state, strict=True)
        x = torch.randn(3, 7, 16, 16)
        t = torch.tensor([3, 500, 999])
        cond = torch.randn(3, 4 * channels[0])
        with torch.no_grad():
            expected = theirs(x, t, class_labels=cond).sample
            got = ours(x, t, cond)
        assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), float((got - expected).abs().max())


def test_shipped_weights_load_into_diffusers_and_agree():
    model = load_model(DEFAULT_WEIGHTS_DIR)
    cfg = model.config
    theirs = _diffusers_twin(tuple(cfg.block_out_channels), cfg.layers_per_block, tuple(cfg.attention_levels),
                             cfg.norm_num_groups)
    theirs.load_state_dict({k[len("unet."):]: v for k, v in model.state_dict().items() if k.startswith("unet.")},
                           strict=True)
    x, t, cond = torch.randn(2, 7, 32, 32), torch.tensor([10, 700]), torch.randn(2, cfg.embed_dim)
    with torch.no_grad():
        assert torch.allclose(model.unet(x, t, cond), theirs(x, t, class_labels=cond).sample, atol=1e-4)


def test_schedule_without_diffusers_matches_the_ddpm_scheduler():
    cfg = BundledModelConfig()
    ours = alphas_cumprod(cfg)
    theirs = make_scheduler(cfg, "ddpm").alphas_cumprod
    assert isinstance(make_scheduler(cfg, "ddpm"), DDPMScheduler)
    assert ours.shape == theirs.shape == (1000,)
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=1e-5)
    assert float(ours[-1]) == 0.0  # zero terminal SNR
