"""Latent priors' memory per view: a checkpointed encoder, called a chunk of views at a time, same gradients."""
from __future__ import annotations

import pytest
import torch

from engine_server.guidance import load_prior
from engine_server.guidance.diagnose import memory_estimate, recompute_gib_per_view


def _encode(prior, images: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Latents of ``images`` and the bytes autograd saved for the backward pass."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        latents = prior.encode_images(images)
    return latents, sum(saved.values())


def test_the_checkpointed_chunked_encoder_keeps_less_and_gives_the_same_gradient(model_dir):
    prior = load_prior(model_dir / "sd")
    encoder = prior.vae.encoder
    assert encoder.gradient_checkpointing and prior.encode_chunk == 1
    images = torch.rand(3, 3, prior.resolution, prior.resolution, generator=torch.Generator().manual_seed(0))
    weights = torch.randn(3, 4, prior.resolution // prior.vae_scale_factor, prior.resolution // prior.vae_scale_factor)
    grads, kept, lat = [], [], []
    for checkpointing, chunk in ((True, 1), (False, 3)):
        encoder.gradient_checkpointing, prior.encode_chunk = checkpointing, chunk
        x = images.clone().requires_grad_(True)
        latents, saved = _encode(prior, x)
        (latents * weights).sum().backward()
        grads.append(x.grad)
        kept.append(saved)
        lat.append(latents.detach())
    encoder.gradient_checkpointing, prior.encode_chunk = True, 1
    torch.testing.assert_close(lat[0], lat[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=2e-5 * float(grads[1].abs().max()))
    assert kept[0] < 0.6 * kept[1], kept


def test_the_estimate_counts_one_chunk_recomputed_and_every_view_saved(model_dir):
    prior = load_prior(model_dir / "sd")
    recompute = recompute_gib_per_view(prior, prior.resolution)
    assert recompute > 0 and recompute_gib_per_view(load_prior("bundled"), 32) == 0.0
    assert memory_estimate(1.0, 0.1, 0.5, views_per_step=8) == 1.0 + 0.8 + 0.5
    assert memory_estimate(1.0, 0.1, 0.5, views_per_step=8, encode_chunk=4) == 1.0 + 0.8 + 2.0


def test_the_coarse_step_estimate_grows_with_views_render_size_samples_table_and_grid():
    from kernels.hashgrid import HashGridConfig

    from engine_server.guidance.diagnose import GIB, TRAINED_COPIES, coarse_step_memory, object_samples

    grid = HashGridConfig(n_levels=4, n_features=2, log2_table_size=12, base_resolution=8, max_resolution=64)
    base = dict(hashgrid=grid, samples_per_ray=32, render_size=16, views_per_step=2, occupancy_resolution=16,
                distance=2.5, fov=40.0)

    def estimate(**change) -> dict:
        return coarse_step_memory(**{**base, **change})

    ref = estimate()
    assert ref["total_gib"] == pytest.approx(ref["field_gib"] + ref["render_gib"] + ref["occupancy_gib"])
    assert ref["samples"] == 2 * object_samples(16, 32, 2.5, 40.0) > 0
    assert estimate(views_per_step=4)["render_gib"] == pytest.approx(2 * ref["render_gib"], rel=1e-6)
    assert 3.5 < estimate(render_size=32)["render_gib"] / ref["render_gib"] < 4.5  # the rays grow as R^2
    assert 1.7 < estimate(samples_per_ray=64)["samples"] / ref["samples"] < 2.3  # half the step, twice the samples
    bigger = estimate(hashgrid=HashGridConfig(n_levels=4, n_features=2, log2_table_size=13, base_resolution=8,
                                              max_resolution=64))
    assert (bigger["field_gib"] - ref["field_gib"]) * GIB == TRAINED_COPIES * 4 * 2 * (2**13 - 2**12) * 4
    assert estimate(occupancy_resolution=32)["occupancy_gib"] == 8 * ref["occupancy_gib"]
    assert object_samples(16, 32, 5.0, 40.0) < 0.5 * object_samples(16, 32, 2.5, 40.0)  # fewer pixels see it
