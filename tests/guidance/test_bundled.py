"""The thin adapter over the bundled pixel prior, on a randomly initialised BundledUNet (the real class)."""
from __future__ import annotations

import pytest
import torch

from engine_server.guidance import Conditioning, GuidanceConfig, PriorLoadError, build_guidance, load_prior
from engine_server.guidance.adapters.bundled import BundledPriorAdapter
from engine_server.models.bundled.model import BundledModelConfig, BundledUNet
from engine_server.models.bundled.prior import BundledPrior


@pytest.fixture(scope="module")
def bundled():
    torch.manual_seed(0)
    config = BundledModelConfig(block_out_channels=(32, 32, 32), norm_num_groups=8)
    return BundledPriorAdapter(BundledPrior(BundledUNet(config), "cpu"), distill_dtype=torch.float32)


def test_load_bundled_gives_the_adapter_or_a_clear_error():
    try:
        prior = load_prior("bundled")
    except PriorLoadError as exc:  # weights not shipped yet in this checkout
        assert "bundled model is not available" in str(exc) and "weights" in str(exc)
    else:
        assert isinstance(prior, BundledPriorAdapter) and prior.kind == "multiview"


def test_bundled_is_registered_like_the_other_adapters(tmp_path):
    from engine_server.guidance import registered_priors

    assert "bundled" in registered_priors()
    # The same adapter loads another folder by name; one without weights is a clear error naming it.
    with pytest.raises(PriorLoadError, match=f"could not load its weights from {tmp_path}"):
        load_prior(tmp_path, adapter="bundled")


def test_sds_step_on_the_bundled_prior(bundled, cameras):
    images = torch.rand(4, 3, 48, 48, requires_grad=True)  # resized to the prior's 32 px inside
    g = build_guidance(bundled, GuidanceConfig(guidance_scale=3.0))
    out = g(images, cameras, Conditioning(prompt="a red cube"), 0, 10)
    out.loss.backward()
    assert "prompts" not in out.extras  # camera-aware: no view suffixes
    assert images.grad.shape == images.shape and torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0


def test_cfg_matches_the_bundled_models_own_guidance(bundled, cameras):
    """Our batched [uncond; cond] CFG in eps equals the model's own CFG in v, converted (the map is affine)."""
    cond = Conditioning(prompt="a blue sphere", reference_image=torch.rand(3, 40, 40), reference_c2w=cameras[0])
    g = build_guidance(bundled, GuidanceConfig(guidance_scale=4.0))
    inputs, _ = g.prepare_inputs(cond, cameras)
    x = torch.randn(4, 3, 32, 32)
    t = torch.tensor([100, 300, 500, 900])
    ref = inputs.cond["reference"][0]
    with torch.no_grad():
        ours = g.guided_noise(x, t, inputs, cameras)
        v = bundled.bundled.predict(x, t, "a blue sphere", cameras, ref, guidance_scale=4.0)
        theirs = bundled.bundled.predict_eps(x, t, v)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_text_guidance_is_one_model_call_and_equals_the_branches_apart(bundled, cameras):
    """Both classifier-free branches of a text-only step go through the network as one batch of 2B (issue 21),
    with the same result as the two branches called apart."""
    g = build_guidance(bundled, GuidanceConfig(guidance_scale=7.5))
    inputs, _ = g.prepare_inputs(Conditioning(prompt="a green cone"), cameras)
    x, t = torch.randn(4, 3, 32, 32), torch.tensor([50, 400, 650, 980])
    calls = []
    hook = bundled.bundled.model.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            ours = g.guided_noise(x, t, inputs, cameras)
    finally:
        hook.remove()
    assert calls == [8]
    with torch.no_grad():
        cond = bundled.bundled.predict(x, t, "a green cone", cameras)
        uncond = bundled.bundled.predict(x, t, None, cameras)
        theirs = bundled.bundled.predict_eps(x, t, uncond + 7.5 * (cond - uncond))
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_distillation_runs_in_bf16_where_the_cpu_has_it_and_its_gradient_stays_close(cameras):
    """The shipped weights: the SDS gradient from the bf16 forward against fp32's, same noise and timesteps."""
    from engine_server.devices import cpu_has_native_bf16

    prior = load_prior("bundled")
    assert prior.distill_dtype == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    exact = BundledPriorAdapter(prior.bundled, distill_dtype=torch.float32)
    low = BundledPriorAdapter(prior.bundled, distill_dtype=torch.bfloat16)
    torch.manual_seed(0)
    images = torch.rand(4, 3, 32, 32) * 0.3 + 0.4
    grads = []
    for p in (exact, low):
        g = build_guidance(p, GuidanceConfig(guidance_scale=7.5, seed=3))
        x = images.clone().requires_grad_()
        g(x, cameras, Conditioning(prompt="a red cube"), 10, 100).loss.backward()
        grads.append(x.grad.flatten())
    cosine = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    relative = (grads[0] - grads[1]).norm() / grads[0].norm()
    assert cosine > 0.995 and relative < 0.1, (float(cosine), float(relative))


def test_bundled_carries_vsds_lora_and_refuses_unknown_prompts(bundled, cameras):
    # Its own copy: peft puts the LoRA into the network it is given (BSD needs VSD on the bundled prior).
    g = build_guidance(load_prior("bundled"), GuidanceConfig(mode="vsd"))
    assert g.lora_parameters() and g.camera_embedding is None  # the prior conditions each view on its camera
    with pytest.raises(ValueError, match="does not know this prompt"):
        bundled.prepare_conditioning(Conditioning(prompt="a photorealistic dragon"), cameras)
