"""``engine-server bench pipeline``: where the time of a draft text-to-3D run goes; ``bench draft``: the
draft's shape quality and time against its values before issue 21 (:func:`run_draft`).

One draft pipeline (bundled prior, "a red cube") is built and measured in one run:

- per distillation step (every step of the draft's coarse stage, on the field as it trains), split into
  field (hash-grid encoding + MLPs, forward; timed around every field call the renderer
  makes), renderer (ray marching and compositing: the render minus its field calls),
  prior (the denoiser's forward passes), guidance (the rest of the SDS step: noise,
  timestep, gradient), backward (``loss.backward()`` through prior-free image gradients,
  renderer and field), optimizer (Adam step) and occupancy (grid update);
- field_fwd_bwd: the field's forward + backward alone on the same number of samples as
  one step, to show how much of ``backward`` the field is;
- per stage: the coarse stage as the sum of its timed steps, then extract, texture and export run
  on the trained field;
- the whole draft run measured as a job runs it (build to GLB, the prior already loaded), beside that sum:
  what the run does besides its steps (events, previews, checkpoints) is the difference.

Steps are also split by the step's shading (albedo, or lit: the renderer's normals and
deferred shading, DreamFusion's augmentation), since lit steps cost more.

Shares are of the mean step. Everything runs with the process's torch thread count.
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
    prompt = getattr(args, "prompt", None) or "a red cube"
    pipe = TextTo3D(TextTo3DRequest(prompt=prompt, preset="draft", seed=0))
    clock = _Clock()
    _instrument(pipe, clock)
    # Every step of the stage, timed, on the field as it trains: the render size ramps up, the occupied
    # samples follow the object and the shading is drawn per step, so sampled steps of a fresh field do not
    # stand for the stage (they underestimated it by a quarter).
    timed = [_step(pipe, clock) for _ in range(pipe.preset.coarse_steps)]
    per_step = [t for t, _ in timed]
    by_shading: dict[str, list[float]] = {}
    for t, shading in timed:
        by_shading.setdefault(shading, []).append(sum(t.values()))
    totals = [sum(s.values()) for s in per_step]
    mean_step = statistics.mean(totals)
    mean = {b: statistics.mean(s[b] for s in per_step) for b in BUCKETS}
    rows: list[dict] = []
    for b in BUCKETS:
        rows.append({"what": f"step: {b}", "ms": round(1000 * mean[b], 1),
                     "share": f"{100 * mean[b] / max(mean_step, 1e-12):.0f}%"})
    rows.append({"what": "step: total (mean)", "ms": round(1000 * mean_step, 1), "share": "100%"})
    for shading, times in sorted(by_shading.items()):
        rows.append({"what": f"step: total, {shading} views ({len(times)} steps)",
                     "ms": round(1000 * statistics.mean(times), 1), "share": ""})
    with torch.no_grad():
        c2w, fovs = pipe.cameras.sample(pipe.preset.views_per_step)
        n_samples = int(pipe.render_views(c2w, fovs, jitter=True)["n_samples"])
    fb = _field_fwd_bwd(pipe, max(n_samples, 1), repeat)
    rows.append({"what": f"field fwd+bwd alone ({n_samples} samples)", "ms": round(1000 * fb, 1),
                 "share": f"{100 * fb / mean_step:.0f}%"})

    coarse_s = sum(totals)
    rows.append({"what": f"stage: coarse ({pipe.preset.coarse_steps} timed steps)", "ms": round(1000 * coarse_s),
                 "share": ""})
    stage_s = {}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        v, f = pipe.extract()
        stage_s["extract"] = time.perf_counter() - t
        t = time.perf_counter()
        mesh, _ = pipe.texture(v, f)
        stage_s["texture"] = time.perf_counter() - t
        from engine_server.export import export_mesh

        t = time.perf_counter()
        export_mesh(Path(tmp) / "bench.glb", mesh, name="bench")
        stage_s["export"] = time.perf_counter() - t
        for name, s in stage_s.items():
            rows.append({"what": f"stage: {name}", "ms": round(1000 * s), "share": ""})
        total = coarse_s + sum(stage_s.values())
        rows.append({"what": "draft run (sum of the stages)", "ms": round(1000 * total), "share": ""})
        # The whole run as a job runs it (previews, checkpoints, events, the resolution ramp), prior loaded.
        t = time.perf_counter()
        whole = TextTo3D(TextTo3DRequest(prompt=prompt, preset="draft", seed=0), prior=pipe.prior)
        result = whole.run(Path(tmp) / "whole.glb")
        wall = time.perf_counter() - t
    coarse_real = result.sidecar["timings_s"]["coarse_s"]
    rows.append({"what": "draft run (measured, build to GLB)", "ms": round(1000 * wall),
                 "share": f"{100 * wall / total:.0f}% of the sum"})
    rows.append({"what": f"  its coarse stage: {1000 * coarse_real / whole.preset.coarse_steps:.0f} ms a step",
                 "ms": round(1000 * coarse_real), "share": f"{100 * coarse_real / coarse_s:.0f}% of the timed"})
    notes = [
        f"draft preset, prompt {prompt!r}, {pipe.preset.views_per_step} views x {pipe.resolution}^2 px, "
        f"{pipe.preset.samples_per_ray} samples/ray, all {pipe.preset.coarse_steps} steps timed, torch threads "
        f"{torch.get_num_threads()}",
        "field/prior are forward passes; backward covers the field, renderer and image-space gradient "
        "(the prior is not differentiated: SDS); 'field fwd+bwd alone' shows the field's part of it.",
        f"draft: the stages sum to {total:.1f} s (coarse {coarse_s:.1f} s), the run as a job took {wall:.1f} s; the "
        "machine's load changes these numbers.",
    ]
    return {"title": "pipeline (text-to-3D, draft)", "rows": rows, "notes": notes}


BEFORE_ISSUE_21 = {"coarse_steps": 200, "views_per_step": 4, "samples_per_ray": 64, "bake_samples": 2}
"""The draft preset's values before issue 21 made it faster (the same code otherwise)."""


def parse_variants(specs: list[str] | None) -> dict[str, dict]:
    """``NAME:key=value,key=value`` -> {NAME: overrides}; values are ints, floats or words.

    Raises ValueError naming a malformed spec or an override the draft preset refuses."""
    from engine_server.pipelines.presets import get_preset

    variants: dict[str, dict] = {}
    for spec in specs or []:
        name, sep, body = spec.partition(":")
        if not sep or not name:
            raise ValueError(f"expected NAME:key=value[,key=value...], got {spec!r}")
        over = {}
        for item in filter(None, body.split(",")):
            key, eq, value = item.partition("=")
            if not eq:
                raise ValueError(f"{spec!r}: {item!r} is not key=value")
            for cast in (int, float):
                try:
                    over[key] = cast(value)
                    break
                except ValueError:
                    continue
            else:
                over[key] = value
        get_preset("draft", **over)
        variants[name] = over
    return variants


def run_draft(args: Any) -> dict:
    """``bench draft``: the draft preset against its values before issue 21 (and any ``--variant``), side by side.

    Each of the four shape-quality prompts runs once per variant, interleaved so machine load falls on all
    alike; per run the wall time from building the pipeline to the written GLB (the prior is loaded once,
    outside), the shape measures and the colour word; per variant the median time, its ratio to "before",
    and the bars of :func:`~engine_server.pipelines.quality.draft_shape_checks`.
    """
    from engine_server.guidance import load_prior
    from engine_server.pipelines.quality import DRAFT_PROMPTS, colour_word, draft_shape_checks, shape_measures

    variants = {"draft": {}, "before": dict(BEFORE_ISSUE_21), **parse_variants(getattr(args, "variant", None))}
    seed = int(getattr(args, "seed", 0) or 0)
    prior = load_prior("bundled")
    runs: dict[str, dict[str, dict]] = {name: {} for name in variants}
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape, prompt in DRAFT_PROMPTS.items():
            for name, over in variants.items():
                t = time.perf_counter()
                pipe = TextTo3D(TextTo3DRequest(prompt=prompt, preset="draft", seed=seed, overrides=dict(over)),
                                prior=prior)
                result = pipe.run(Path(tmp) / f"{name}_{shape}.glb")
                seconds = time.perf_counter() - t
                m = shape_measures(result.vertices, result.faces)
                word = colour_word(result.texture, result.uvs, result.faces)
                runs[name][shape] = m | {"seconds": seconds, "colour_ok": word == prompt.split()[1]}
                rows.append({"what": f"{shape} / {name}", "s": round(seconds, 1),
                             "sphericity": round(m["sphericity"], 3), "fill": round(m["fill"], 3),
                             "taper": round(m["taper"], 3), "extent": round(m["extent_ratio"], 3),
                             "colour": word, "dihedral": result.sidecar["asset"]["dihedral_ratio"]})
    base = statistics.median(r["seconds"] for r in runs["before"].values())
    notes = [f"draft preset, seed {seed}, torch threads {torch.get_num_threads()}; 'before' = the draft's values "
             f"before issue 21 ({', '.join(f'{k}={v}' for k, v in BEFORE_ISSUE_21.items())}) on today's code"]
    for name, by_shape in runs.items():
        med = statistics.median(r["seconds"] for r in by_shape.values())
        checks = draft_shape_checks(by_shape)
        colours = sum(r["colour_ok"] for r in by_shape.values())
        failed = [c for c, ok in checks.items() if not ok]
        rows.append({"what": f"{name}: median run", "s": round(med, 1), "sphericity": f"x{med / base:.2f}",
                     "fill": "", "taper": "", "extent": "", "colour": f"{colours}/{len(by_shape)}",
                     "dihedral": ""})
        notes.append(f"{name} ({', '.join(f'{k}={v}' for k, v in variants[name].items()) or 'the preset'}): "
                     f"{len(checks) - len(failed)}/{len(checks)} shape bars"
                     + (f", failing: {', '.join(failed)}" if failed else "") + f"; colour {colours}/{len(by_shape)}")
    return {"title": "draft: shape quality and time, side by side", "rows": rows, "notes": notes,
            "runs": runs}
