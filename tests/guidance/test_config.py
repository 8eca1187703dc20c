"""Timestep schedule and config validation."""
from __future__ import annotations

import pytest
import torch

from engine_server.guidance import GuidanceConfig, TimestepSchedule


def test_schedule_defaults_anneal_from_dreamcraft3d_start_to_end():
    s = TimestepSchedule()  # (0.7, 0.85) -> (0.2, 0.5) over the first half of the run
    assert s.range_at(0, 1000) == pytest.approx((0.7, 0.85))
    assert s.range_at(250, 1000) == pytest.approx((0.45, 0.675))  # halfway through the annealing
    assert s.range_at(500, 1000) == pytest.approx((0.2, 0.5))
    assert s.range_at(1000, 1000) == pytest.approx((0.2, 0.5))


def test_schedule_hold_and_anneal_fractions():
    s = TimestepSchedule(start=(0.6, 0.9), end=(0.1, 0.3), hold_fraction=0.2, anneal_fraction=0.4)
    assert s.range_at(100, 1000) == pytest.approx((0.6, 0.9))  # still held
    assert s.range_at(200, 1000) == pytest.approx((0.6, 0.9))  # annealing starts here
    assert s.range_at(400, 1000) == pytest.approx((0.35, 0.6))  # middle: halfway between
    assert s.range_at(600, 1000) == pytest.approx((0.1, 0.3))
    assert s.range_at(900, 1000) == pytest.approx((0.1, 0.3))


def test_schedule_samples_integer_timesteps_inside_the_range():
    s = TimestepSchedule()
    gen = torch.Generator().manual_seed(0)
    early = s.sample(0, 100, 1000, 4096, gen)
    late = s.sample(100, 100, 1000, 4096, gen)
    assert early.dtype == torch.long
    assert early.min() >= 700 and early.max() <= 850
    assert late.min() >= 200 and late.max() <= 500
    # uniform over the range: both ends are reached and the mean sits in the middle
    assert early.min() <= 702 and early.max() >= 848
    assert abs(early.float().mean().item() - 775) < 5
    assert s.timestep_bounds(0, 100, 1000) == (700, 850)


def test_schedule_is_reproducible_from_the_seed():
    s = TimestepSchedule()
    a = s.sample(3, 10, 1000, 16, torch.Generator().manual_seed(7))
    b = s.sample(3, 10, 1000, 16, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs", [
    {"start": (0.9, 0.1)},
    {"end": (0.2, 1.5)},
    {"hold_fraction": 0.7, "anneal_fraction": 0.5},
])
def test_bad_schedule_is_refused(kwargs):
    with pytest.raises(ValueError, match="TimestepSchedule"):
        TimestepSchedule(**kwargs)


@pytest.mark.parametrize("kwargs,field", [
    ({"mode": "dds"}, "mode"),
    ({"weighting": "snr"}, "weighting"),
    ({"grad_clip": -1.0}, "grad_clip"),
    ({"grad_clip_mode": "max"}, "grad_clip_mode"),
])
def test_bad_guidance_config_is_refused(kwargs, field):
    with pytest.raises(ValueError, match=f"GuidanceConfig.{field}"):
        GuidanceConfig(**kwargs)


def test_conditioning_checks_reference_shapes():
    from engine_server.guidance import Conditioning

    with pytest.raises(ValueError, match=r"reference_image must be \(3, H, W\)"):
        Conditioning(reference_image=torch.rand(32, 32, 3))
    with pytest.raises(ValueError, match=r"reference_c2w must be \(4, 4\)"):
        Conditioning(reference_image=torch.rand(3, 8, 8), reference_c2w=torch.eye(3))
    assert Conditioning(prompt="a cup").negative_prompt == ""
