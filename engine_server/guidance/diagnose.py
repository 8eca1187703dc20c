"""What a loaded prior is and what a guidance step costs: the library half of ``engine-server doctor``.

:func:`describe_prior` says which family, layout, weight variant, dtype and device were
found and the prior's defaults; :func:`measure_step` runs one timed SDS step and measures
what it keeps for the backward pass per view (autograd's saved tensors: the checkpointed
encoder's block outputs at the prior's resolution) and what its largest encoder block holds
while recomputed, plus the device's peak on CUDA;
:func:`memory_estimate` turns both into the memory a number of views per step needs.
:func:`coarse_step_memory` adds what the coarse stage holds besides the prior: the field's
weights, gradients and Adam moments, the renderer's activations (bytes per sample measured on
a small render of the real field, times the samples a step's views take) and the occupancy grid.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import nn

from engine_server.cameras import camera_rays, look_at, orbit_position
from engine_server.field import (FieldConfig, MLPBackground, RadianceField, RendererConfig, VolumeRenderer,
                                 intersect_aabb)
from engine_server.guidance.config import Conditioning, prior_defaults
from engine_server.guidance.prior import (
    BUNDLED,
    SINGLE_FILE_SUFFIXES,
    pick_weight_files,
    pipeline_components,
    preferred_variant,
    read_model_index,
    variant_label,
)
from engine_server.guidance.score import build_guidance
from kernels.hashgrid import HashGridConfig

logger = logging.getLogger(__name__)

GIB = 1024**3


def prior_modules(prior) -> dict[str, nn.Module]:
    """The networks a prior holds (its own attributes, and one level into a wrapped model), by name."""
    found: dict[str, nn.Module] = {}
    for name, value in vars(prior).items():
        if isinstance(value, nn.Module):
            found[name] = value
        elif hasattr(value, "__dict__") and not isinstance(value, (torch.Tensor, type)):
            found.update({f"{name}.{n}": v for n, v in vars(value).items() if isinstance(v, nn.Module)})
    seen: set[int] = set()
    return {n: m for n, m in found.items() if not (id(m) in seen or seen.add(id(m)))}


def parameter_bytes(prior) -> int:
    """Bytes of every parameter and buffer of the prior's networks."""
    return sum(t.numel() * t.element_size() for m in prior_modules(prior).values()
               for t in (*m.parameters(), *m.buffers()))


def layout_of(model: str, source: str) -> str:
    """How the prior was found: bundled weights, a single file, a hub id (through its cache) or a folder."""
    path = Path(source)
    if path.is_file() and path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        return "single-file checkpoint"
    if "snapshots" in path.parts and any(p.startswith("models--") for p in path.parts):
        return f"hub id {model!r} (Hugging Face cache)"
    if model == BUNDLED:
        return "bundled weights"
    return "diffusers folder" if (path / "model_index.json").is_file() else "model folder"


def weight_variants(source: str, dtype: torch.dtype) -> dict[str, str]:
    """Per component of a diffusers folder, the weight variant and file loaded for ``dtype``."""
    folder = Path(source)
    if not (folder / "model_index.json").is_file():
        return {}
    out = {}
    for component in pipeline_components(read_model_index(folder)):
        sub = folder / component
        if sub.is_dir():
            picked = pick_weight_files(sorted(p.name for p in sub.iterdir()), preferred_variant(dtype))
            if picked is not None:
                out[component] = f"{variant_label(picked[0])} ({picked[1][0]})"
    return out


def describe_prior(prior, model: str) -> dict:
    """Family, layout, variants, dtype, device, resolution, prediction type, parameters and defaults of a loaded
    prior; for a single file, the diffusers config it was built from and what chose it (else None)."""
    source = str(getattr(prior, "source", model))
    return {
        "model": model,
        "source": source,
        "family": getattr(prior, "registry_name", type(prior).__name__),
        "kind": prior.kind,
        "layout": layout_of(model, source),
        "variants": weight_variants(source, prior.dtype),
        "dtype": str(prior.dtype).removeprefix("torch."),
        "device": str(prior.device),
        "resolution": int(prior.resolution),
        "prediction_type": prior.prediction_type,
        "single_file_config": getattr(prior, "single_file_config", None),
        "parameters_gib": parameter_bytes(prior) / GIB,
        "defaults": prior_defaults(prior).as_dict(),
    }


def _conditioning(prior, cameras: torch.Tensor) -> Conditioning:
    """A prompt and a plain reference view, whichever the prior reads."""
    ref = torch.ones(3, prior.resolution, prior.resolution)
    ref[:, prior.resolution // 4: 3 * prior.resolution // 4, prior.resolution // 4: 3 * prior.resolution // 4] = \
        torch.tensor([0.8, 0.1, 0.1]).view(3, 1, 1)
    return Conditioning(prompt="a red cube", reference_image=ref, reference_c2w=cameras[0])


def measure_step(prior, render_size: int | None = None, mode: str = "sds") -> dict:
    """One timed guidance step of one object's views (1, or a multi-view prior's group) at ``render_size``.

    Returns the views, the seconds of the step, the bytes autograd saved for the backward pass per
    view (renders upsampled to the prior's resolution, then encoded), the peak device memory on
    CUDA (else None) and the gradient norm (finite on a working prior).
    """
    defaults = prior_defaults(prior)
    views = int(getattr(prior, "num_views", 1))
    size = int(render_size or defaults.render_resolution(prior.resolution))
    dist = float(defaults.camera_ranges.get("default_distance", 2.5))
    cameras = torch.stack([look_at(orbit_position(360.0 * i / views, 15.0, dist)) for i in range(views)])
    cameras = cameras.to(prior.device)
    cond = _conditioning(prior, cameras)
    guidance = build_guidance(prior, defaults.guidance_config(mode, seed=0))
    guidance.prepare_inputs(cond, cameras)  # text / reference encoding is cached, not part of a step
    images = torch.rand(views, 3, size, size, device=prior.device, requires_grad=True)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    cuda = prior.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(prior.device)
        torch.cuda.reset_peak_memory_stats(prior.device)
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = guidance(images, cameras, cond, 0, 1)
    out.loss.backward()
    if cuda:
        torch.cuda.synchronize(prior.device)
    seconds = time.perf_counter() - start
    grad = images.grad
    recompute = recompute_gib_per_view(prior, prior.resolution)
    return {
        "views": views,
        "render_size": size,
        "encoder_size": int(prior.resolution),
        "seconds": seconds,
        "saved_gib_per_view": sum(saved.values()) / views / GIB,
        "recompute_gib_per_view": recompute,
        "encode_chunk": int(getattr(prior, "encode_chunk", 1)),
        "peak_gib": torch.cuda.max_memory_allocated(prior.device) / GIB if cuda else None,
        "grad_norm": float(grad.norm()) if grad is not None else float("nan"),
        "finite": bool(grad is not None and torch.isfinite(grad).all()),
    }


def recompute_gib_per_view(prior, size: int, probe: int = 128) -> float:
    """GiB one view's largest gradient-checkpointed encoder block holds while it is recomputed in the backward
    pass, at ``size`` px: measured at ``probe`` px without checkpointing and scaled by the pixel count (the
    blocks are convolutions; within 2% of a 256 px measurement for SD's VAE). 0 for a prior without a VAE."""
    vae = getattr(prior, "vae", None)
    if vae is None:
        return 0.0
    encoder = vae.encoder
    blocks = {f"down_blocks.{i}": b for i, b in enumerate(encoder.down_blocks)} | {"mid_block": encoder.mid_block}
    per_block: dict[str, int] = {}
    current: list[str] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        if current:
            per_block[current[-1]] = per_block.get(current[-1], 0) + t.untyped_storage().nbytes()
        return t

    def enter(name: str):
        return lambda module, args: current.append(name)

    def leave(module, args, output) -> None:
        current.pop()

    handles = []
    for name, block in blocks.items():
        handles.append(block.register_forward_pre_hook(enter(name)))
        handles.append(block.register_forward_hook(leave))
    checkpointing = encoder.gradient_checkpointing
    encoder.gradient_checkpointing = False
    try:
        x = torch.rand(1, 3, probe, probe, device=prior.device, dtype=prior.dtype, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            vae.encode(x)
    finally:
        encoder.gradient_checkpointing = checkpointing
        for h in handles:
            h.remove()
    return max(per_block.values(), default=0) * (size / probe) ** 2 / GIB


def memory_estimate(parameters_gib: float, saved_gib_per_view: float, recompute_gib_per_view: float,
                    views_per_step: int, encode_chunk: int = 1) -> float:
    """GiB the prior needs for ``views_per_step`` views: its weights, each view's saved activations, and the
    largest encoder block of one chunk of ``encode_chunk`` views, recomputed in the backward pass.

    The field and renderer are :func:`coarse_step_memory`'s part.
    """
    return (parameters_gib + views_per_step * saved_gib_per_view
            + min(views_per_step, encode_chunk) * recompute_gib_per_view)


TRAINED_COPIES = 4
"""Copies of a trained parameter a coarse step holds: the weight, its gradient and Adam's two moments."""
BACKWARD_FACTOR = 2.0
"""The renderer's peak over the activations autograd saves: as much again while the backward pass runs
(the activations' gradients and the allocator's slack); against peak RSS of lit draft and standard coarse
steps with the bundled prior on CPU, estimates with it were 0.8x and 1.0x the measured."""
OBJECT_BOX = 0.5
"""Half-size of the box generated objects sit in (the field's box is [-1, 1]^3): the samples a view
takes are counted on rays through it, as the occupancy grid skips the empty space around an object."""


def object_samples(render_size: int, samples_per_ray: int, distance: float, fov: float,
                   box: float = 1.0) -> int:
    """Samples one ``render_size``^2 view at ``distance`` and ``fov`` degrees takes inside the object's box,
    marched at the field's step (the diagonal of its ``[-box, box]^3`` over ``samples_per_ray``), none skipped."""
    origins, dirs = camera_rays(look_at(orbit_position(30.0, 15.0, distance)), fov, render_size, render_size)
    near, far, hit = intersect_aabb(origins.reshape(-1, 3), dirs.reshape(-1, 3),
                                    torch.tensor([[-OBJECT_BOX] * 3, [OBJECT_BOX] * 3]))
    step = 2.0 * box * 3**0.5 / samples_per_ray
    return int(torch.where(hit, ((far - near) / step).ceil(), torch.zeros_like(far)).sum())


def render_bytes_per_sample(hashgrid: HashGridConfig, samples_per_ray: int, device: torch.device,
                            probe: int = 16) -> float:
    """Bytes autograd keeps per ray-marching sample of a lit coarse render (normals by finite differences,
    the heaviest step) of a field with ``hashgrid``: measured on a ``probe``^2 render of a fixed fresh field
    with every sample kept and given a normal (no occupancy grid, no early termination, no samples skipped
    for their small weight: an upper bound); the field's own parameters are not counted."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        field = RadianceField(FieldConfig(hashgrid=hashgrid)).to(device)
    params = {p.untyped_storage().data_ptr() for p in field.parameters()}
    renderer = VolumeRenderer(RendererConfig(num_steps=samples_per_ray, min_transmittance=0.0, min_weight=0.0))
    origins, dirs = camera_rays(look_at(orbit_position(30.0, 15.0, 2.5)), 40.0, probe, probe)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved.setdefault(ptr, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = renderer.render(field, origins.reshape(-1, 3).to(device), dirs.reshape(-1, 3).to(device),
                              MLPBackground().to(device), compute_normals=True)
    return sum(saved.values()) / max(out["n_samples"], 1)


def coarse_step_memory(hashgrid: HashGridConfig, samples_per_ray: int, render_size: int, views_per_step: int,
                       occupancy_resolution: int, distance: float, fov: float,
                       device: torch.device = torch.device("cpu")) -> dict:
    """GiB a coarse step holds besides the prior: the field (hash table + MLPs + learned background, each
    weight with its gradient and Adam moments), the renderer's activations for ``views_per_step`` views at
    ``render_size`` px (bytes per sample times :func:`object_samples`) and the occupancy grid (a float
    estimate and a bool per cell). Cameras at ``distance`` with ``fov`` degrees (the prior's defaults).

    The renderer's saved activations, times :data:`BACKWARD_FACTOR`, are the step's peak (the forward's
    transients are freed before it); Adam's update runs after the backward pass has freed them."""
    field = RadianceField(FieldConfig(hashgrid=hashgrid))
    weights = sum(p.numel() * p.element_size() for m in (field, MLPBackground()) for p in m.parameters())
    per_sample = render_bytes_per_sample(hashgrid, samples_per_ray, device)
    samples = views_per_step * object_samples(render_size, samples_per_ray, distance, fov)
    parts = {
        "field_gib": TRAINED_COPIES * weights / GIB,
        "render_gib": BACKWARD_FACTOR * per_sample * samples / GIB,
        "occupancy_gib": occupancy_resolution**3 * 5 / GIB,
    }
    return {**parts, "bytes_per_sample": per_sample, "samples": samples, "total_gib": sum(parts.values())}
