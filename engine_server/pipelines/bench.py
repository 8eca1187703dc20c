"""``engine-server bench pipeline``: where the time of a draft text-to-3D run goes.

One draft pipeline (bundled prior, "a red cube") is built and measured in one run:

- per distillation step (``4 * --repeat`` timed steps after 2 warm-up steps), split into
  field (hash-grid encoding + MLPs, forward; timed around every field call the renderer
  makes), renderer (ray marching and compositing: the render minus its field calls),
  prior (the denoiser's forward passes), guidance (the rest of the SDS step: noise,
  timestep, gradient), backward (``loss.backward()`` through prior-free image gradients,
  renderer and field), optimizer (Adam step) and occupancy (grid update);
- field_fwd_bwd: the field's forward + backward alone on the same number of samples as
  one step, to show how much of ``backward`` the field is;
- per stage: the draft's coarse stage estimated as steps x the median step, then extract,
  texture and export run for real on the partly trained field.
  Steps are also split by the step's shading (albedo, or lit: the renderer's normals and
  deferred shading, DreamFusion's augmentation), since lit steps cost more.

Shares are of the median step. Everything runs with the process's torch thread count.
"""
from __future__ import annotations

import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from engine_server.pipelines.text_to_3d import TextTo3D, TextTo3DRequest

logger = logging.getLogger(__name__)

BUCKETS = ("field", "renderer", "prior", "guidance", "backward", "optimizer", "occupancy")


class _Clock:
    """Accumulates seconds per bucket; nested calls of the same bucket count once."""

    def __init__(self) -> None:
        self.total: dict[str, float] = dict.fromkeys(BUCKETS, 0.0)
        self._depth: dict[str, int] = dict.fromkeys(BUCKETS, 0)
        self.paused = False

    def wrap(self, bucket: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            if self.paused or self._depth[bucket]:
                return fn(*args, **kwargs)
            self._depth[bucket] += 1
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total[bucket] += time.perf_counter() - t
                self._depth[bucket] -= 1

        return timed

    def reset(self) -> None:
        self.total = dict.fromkeys(BUCKETS, 0.0)


def _instrument(pipe: TextTo3D, clock: _Clock) -> None:
    """Time the field's and the prior's calls on this pipeline's instances (no global patching)."""
    pipe.field.forward = clock.wrap("field", pipe.field.forward)
    pipe.field.density = clock.wrap("field", pipe.field.density)
    prior = pipe.guidance.prior
    prior.predict_noise = clock.wrap("prior", prior.predict_noise)


def _step(pipe: TextTo3D, clock: _Clock) -> dict[str, float]:
    """One coarse step as ``TextTo3D.coarse`` does it, timed per bucket (seconds)."""
    clock.reset()
    t = time.perf_counter()
    clock.paused = True
    pipe.occupancy.update(pipe.field.density, pipe.step)
    clock.paused = False
    clock.total["occupancy"] = time.perf_counter() - t

    t_render = {}
    render_views = pipe.render_views

    def timed_render(*args, **kwargs):
        field_before = clock.total["field"]
        t0 = time.perf_counter()
        out = render_views(*args, **kwargs)
        t_render["s"] = t_render.get("s", 0.0) + time.perf_counter() - t0 - (clock.total["field"] - field_before)
        return out

    guidance = pipe.guidance
    t_guid = {}

    def timed_guidance(*args, **kwargs):
        prior_before = clock.total["prior"]
        t0 = time.perf_counter()
        out = guidance(*args, **kwargs)
        t_guid["s"] = time.perf_counter() - t0 - (clock.total["prior"] - prior_before)
        return out

    pipe.render_views, pipe.guidance = timed_render, timed_guidance
    try:
        loss, logs = pipe.coarse_loss()
    finally:
        pipe.render_views, pipe.guidance = render_views, guidance
        del pipe.__dict__["render_views"]
    clock.total["renderer"] = t_render.get("s", 0.0)
    clock.total["guidance"] = t_guid.get("s", 0.0)
    t = time.perf_counter()
    pipe.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clock.total["backward"] = time.perf_counter() - t
    t = time.perf_counter()
    pipe.optimizer.step()
    clock.total["optimizer"] = time.perf_counter() - t
    pipe.step += 1
    return dict(clock.total), str(logs.get("shading", "albedo"))


def _field_fwd_bwd(pipe: TextTo3D, n: int, repeat: int) -> float:
    """Median seconds of the field's forward + backward on n random points in the object box."""
    x = torch.rand(n, 3, device=pipe.device) - 0.5
    d = torch.nn.functional.normalize(torch.randn(n, 3, device=pipe.device), dim=-1)
    times = []
    for _ in range(repeat + 1):
        t = time.perf_counter()
        out = pipe.field(x, view_dirs=d)
        (out["density"].sum() + out["albedo"].sum()).backward()
        times.append(time.perf_counter() - t)
    pipe.optimizer.zero_grad(set_to_none=True)
    return statistics.median(times[1:])


def run(args: Any) -> dict:
    repeat = max(int(getattr(args, "repeat", 5)), 1)
    steps = int(getattr(args, "steps", None) or 4 * repeat)
    prompt = getattr(args, "prompt", None) or "a red cube"
    pipe = TextTo3D(TextTo3DRequest(prompt=prompt, preset="draft", seed=0))
    clock = _Clock()
    _instrument(pipe, clock)
    for _ in range(2):  # warm-up (first-call allocations, lazy init)
        _step(pipe, clock)
    timed = [_step(pipe, clock) for _ in range(steps)]
    per_step = [t for t, _ in timed]
    by_shading: dict[str, list[float]] = {}
    for t, shading in timed:
        by_shading.setdefault(shading, []).append(sum(t.values()))
    totals = [sum(s.values()) for s in per_step]
    median_step = statistics.median(totals)
    med = {b: statistics.median(s[b] for s in per_step) for b in BUCKETS}
    rows: list[dict] = []
    for b in BUCKETS:
        rows.append({"what": f"step: {b}", "ms": round(1000 * med[b], 1),
                     "share": f"{100 * med[b] / max(sum(med.values()), 1e-12):.0f}%"})
    rows.append({"what": "step: total (median)", "ms": round(1000 * median_step, 1), "share": "100%"})
    for shading, times in sorted(by_shading.items()):
        rows.append({"what": f"step: total, {shading} views ({len(times)} steps)",
                     "ms": round(1000 * statistics.median(times), 1), "share": ""})
    with torch.no_grad():
        c2w, fovs = pipe.cameras.sample(pipe.preset.views_per_step)
        n_samples = int(pipe.render_views(c2w, fovs, jitter=True)["n_samples"])
    fb = _field_fwd_bwd(pipe, max(n_samples, 1), repeat)
    rows.append({"what": f"field fwd+bwd alone ({n_samples} samples)", "ms": round(1000 * fb, 1),
                 "share": f"{100 * fb / median_step:.0f}%"})

    coarse_s = statistics.mean(totals) * pipe.preset.coarse_steps
    rows.append({"what": f"stage: coarse (est. {pipe.preset.coarse_steps} x mean step)", "ms": round(1000 * coarse_s),
                 "share": ""})
    stage_s = {}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        v, f = pipe.extract()
        stage_s["extract"] = time.perf_counter() - t
        t = time.perf_counter()
        uv_mesh, tex = pipe.texture(v, f)
        stage_s["texture"] = time.perf_counter() - t
        from engine_server.export import export_glb

        t = time.perf_counter()
        export_glb(Path(tmp) / "bench.glb", uv_mesh.vertices.astype("float32"), uv_mesh.faces, uv_mesh.uvs, tex,
                   name="bench")
        stage_s["export"] = time.perf_counter() - t
    for name, s in stage_s.items():
        rows.append({"what": f"stage: {name}", "ms": round(1000 * s), "share": ""})
    total = coarse_s + sum(stage_s.values())
    rows.append({"what": "draft run (est.)", "ms": round(1000 * total), "share": ""})
    notes = [
        f"draft preset, prompt {prompt!r}, {pipe.preset.views_per_step} views x {pipe.resolution}^2 px, "
        f"{pipe.preset.samples_per_ray} samples/ray, {steps} timed steps, torch threads {torch.get_num_threads()}",
        "field/prior are forward passes; backward covers the field, renderer and image-space gradient "
        "(the prior is not differentiated: SDS); 'field fwd+bwd alone' shows the field's part of it.",
        f"draft estimate {total:.1f} s (coarse {coarse_s:.1f} s); the machine's load changes these numbers.",
    ]
    return {"title": "pipeline (text-to-3D, draft)", "rows": rows, "notes": notes}
