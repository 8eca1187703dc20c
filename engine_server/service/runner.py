"""The real engine as a :class:`~engine_server.service.jobs.JobRunner`: a job's request -> pipeline -> Result.

:class:`EngineRunner` is what the worker's child process calls once per job attempt. It
keeps the loaded priors between jobs (the child stays warm) and dispatches on the job's
``kind`` through :data:`KIND_RUNNERS`, a small dict ``kind -> function``. Adding a kind
is one line there: a function ``(ctx, request, job_dir, events, cancelled) ->
Result`` (see :func:`run_text`; :func:`run_pipeline` does the shared part for any pipeline
built like ``TextTo3D``).

Request ``options`` (a flat dict) are preset overrides (``coarse_steps``, ``tet_resolution``,
``texture_size``, ...) plus a few run settings taken out first: ``model`` (one of the models
the server offers), ``guidance`` (sds | vsd) and ``guidance_scale``. An unknown option name
fails the job with the preset's message.
"""
from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine_server.devices import resolve_device
from engine_server.service.jobs import EventSink, JobFailure, Result, checkpoint_dir

logger = logging.getLogger(__name__)

RUN_OPTIONS = ("model", "guidance", "guidance_scale")
"""Option names that are run settings, not preset overrides."""
VIEW_OPTIONS = ("views", "multiview_strategy", "multiview_steps")
"""Run settings of the kinds that generate views (image, multiview): how many, how they agree, DDIM steps."""


@dataclass
class RunnerConfig:
    """How the worker's runner loads models and where it computes."""

    device: str = "auto"
    """auto (CUDA when available, else CPU), cpu or cuda[:N]."""
    model: str = "bundled"
    """The default prior: "bundled", a local diffusers folder or a hub id."""
    models: list[str] = field(default_factory=list)
    """Other models a request may name in ``options.model`` (the default is always allowed)."""
    threads: int = 0
    """torch CPU threads in the worker (0: torch's default)."""


class RunContext:
    """What every kind's runner shares inside one worker process: device and loaded priors."""

    def __init__(self, config: RunnerConfig):
        self.config = config
        self.device = resolve_device(config.device)
        self._priors: dict[str, Any] = {}

    def allowed_models(self) -> list[str]:
        """Models a request may ask for."""
        return [self.config.model, *[m for m in self.config.models if m != self.config.model]]

    def prior(self, name: str | None):
        """The loaded prior ``name`` (default model when None), loaded once per process."""
        name = name or self.config.model
        if name not in self.allowed_models():
            raise JobFailure("unknown_model", f"model {name!r} is not offered by this server; "
                                              f"offered: {', '.join(self.allowed_models())}")
        if name not in self._priors:
            from engine_server.guidance import PriorLoadError, load_prior

            t = time.perf_counter()
            try:
                self._priors[name] = load_prior(name, device=self.device)
            except PriorLoadError as exc:
                raise JobFailure("model_unavailable", str(exc)) from None
            logger.info("loaded prior %s on %s in %.1f s", name, self.device, time.perf_counter() - t)
        return self._priors[name]

    def release(self) -> None:
        """Return cached GPU memory after a job (the priors stay loaded)."""
        import gc

        gc.collect()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()


def png_bytes(image: np.ndarray) -> bytes:
    """(H, W, 3|4) uint8 -> PNG bytes."""
    from PIL import Image as PILImage

    buf = io.BytesIO()
    PILImage.fromarray(np.ascontiguousarray(image)).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def job_seed(request: dict[str, Any], job_dir: Path) -> int:
    """The request's seed, or one derived from the job id (stable across resumes)."""
    seed = request.get("seed")
    if seed is not None:
        return int(seed)
    try:
        return int(Path(job_dir).name, 16) % 2**31
    except ValueError:
        return 0


def split_options(request: dict[str, Any], run_keys: tuple[str, ...] = RUN_OPTIONS) -> tuple[dict[str, Any], dict[str, Any]]:
    """(run settings, preset overrides) from the request's flat ``options``; ``run_keys`` name the run settings."""
    options = dict(request.get("options") or {})
    run = {k: options.pop(k) for k in run_keys if k in options}
    if "guidance" in run and run["guidance"] not in ("sds", "vsd"):
        raise JobFailure("invalid_option", f"options.guidance must be 'sds' or 'vsd', got {run['guidance']!r}")
    if "guidance_scale" in run and not isinstance(run["guidance_scale"], (int, float)):
        raise JobFailure("invalid_option", f"options.guidance_scale must be a number, got {run['guidance_scale']!r}")
    return run, options


def rig_cameras(request: dict[str, Any]) -> list | None:
    """The request's rig as :class:`engine_server.cameras.Camera` objects (None when absent)."""
    rig = request.get("rig")
    if not rig:
        return None
    import torch

    from engine_server.cameras import Camera

    return [Camera(torch.tensor(cam["matrix_world"], dtype=torch.float32), float(cam["fov_y_deg"]),
                   int(cam["width"]), int(cam["height"])) for cam in rig]


class _ProgressBridge:
    """Pipeline ProgressEvents -> EventSink calls (progress every event; preview / mesh when present)."""

    def __init__(self, events: EventSink):
        self.events = events
        self.first_coarse_step: int | None = None

    def __call__(self, event) -> None:
        if event.stage == "coarse" and self.first_coarse_step is None:
            self.first_coarse_step = int(event.step)
        loss = event.loss if event.loss is not None and math.isfinite(event.loss) else None
        self.events.progress(event.stage, int(event.step), int(event.total), loss=loss, eta_s=event.eta_s)
        if event.preview is not None:
            self.events.preview(event.stage, int(event.step), png_bytes(event.preview))
        if event.mesh is not None:
            vertices, faces = event.mesh
            vertices = np.asarray(vertices, dtype=np.float32)
            if np.isfinite(vertices).all() and len(faces):
                self.events.mesh(event.stage, int(event.step), vertices, np.asarray(faces, dtype=np.int32))


def run_pipeline(pipeline_factory: Callable[..., Any], request: dict[str, Any], job_dir: Path, events: EventSink,
                 cancelled: Callable[[], bool], meta: dict[str, Any]) -> Result:
    """Run a pipeline built like TextTo3D and turn its output into a Result.

    ``pipeline_factory(progress=, cancelled=, checkpoint_dir=)`` builds the pipeline (the caller
    binds the request, device and prior); its ``run(out_path)`` returns an object with
    ``glb_path, vertices, faces, uvs, texture, sidecar``. Maps a non-finite loss to
    ``non_finite``, a bad option or prompt (ValueError) to ``invalid_request``; the pipeline's
    Cancelled goes through to the worker.
    """
    work = Path(job_dir) / "work"
    work.mkdir(parents=True, exist_ok=True)
    bridge = _ProgressBridge(events)
    t0 = time.perf_counter()
    try:
        pipeline = pipeline_factory(progress=bridge, cancelled=cancelled, checkpoint_dir=checkpoint_dir(job_dir))
        out = pipeline.run(work / "model.glb")
    except FloatingPointError as exc:
        raise JobFailure("non_finite", f"{exc}; the optimisation diverged (try a lower learning_rate)") from None
    except ValueError as exc:  # an unknown prompt word, a bad preset option
        raise JobFailure("invalid_request", str(exc)) from None
    except RuntimeError as exc:
        if "field is empty" in str(exc):  # nothing above the density threshold: no mesh to make
            raise JobFailure("empty_mesh", str(exc)) from None
        raise
    vertices = np.asarray(out.vertices, dtype=np.float32)
    uvs = np.asarray(out.uvs, dtype=np.float32)
    if not (np.isfinite(vertices).all() and np.isfinite(uvs).all()):
        raise JobFailure("non_finite", "the final mesh has non-finite vertices or UVs")
    faces = np.asarray(out.faces, dtype=np.int32)
    texture = np.ascontiguousarray(np.asarray(out.texture, dtype=np.uint8))
    events.mesh("export", 1, vertices, faces, uvs=uvs, texture_png=png_bytes(texture), final=True)
    glb = Path(out.glb_path).read_bytes()
    meta = dict(meta)
    meta.update(seconds=round(time.perf_counter() - t0, 3), faces=int(len(faces)), vertices=int(len(vertices)),
                texture_size=int(texture.shape[0]))
    if bridge.first_coarse_step is not None:
        meta["resumed_from_step"] = bridge.first_coarse_step - 1
    timings = getattr(pipeline, "timings", None)
    if timings:
        meta["timings_s"] = {k: round(float(v), 3) for k, v in timings.items()}
    return Result(glb=glb, arrays={"vertices": vertices, "faces": faces, "uvs": uvs, "texture": texture}, meta=meta)


def _prepare(ctx: RunContext, request: dict[str, Any], job_dir: Path,
             run_keys: tuple[str, ...] = RUN_OPTIONS) -> tuple[dict[str, Any], dict[str, Any], str, Any, int]:
    """What every kind starts with: (run settings, preset overrides, model name, its loaded prior, seed)."""
    run, overrides = split_options(request, run_keys)
    model = run.get("model") or ctx.config.model
    return run, overrides, model, ctx.prior(model), job_seed(request, job_dir)


def run_text(ctx: RunContext, request: dict[str, Any], job_dir: Path, events: EventSink,
             cancelled: Callable[[], bool]) -> Result:
    """A ``text`` job: TextTo3D with the request's prompt, seed, preset, options and rig."""
    from engine_server.pipelines.text_to_3d import TextTo3D, TextTo3DRequest

    run, overrides, model, prior, seed = _prepare(ctx, request, job_dir)
    req = TextTo3DRequest(
        prompt=request["prompt"], negative_prompt=request.get("negative_prompt") or "", seed=seed,
        preset=request.get("preset") or "draft", model=model, guidance=run.get("guidance", "sds"),
        overrides=overrides, rig=rig_cameras(request), guidance_scale=run.get("guidance_scale"),
    )

    def factory(**kw):
        return TextTo3D(req, device=ctx.device, prior=prior, **kw)

    meta = {"kind": "text", "prompt": req.prompt, "seed": seed, "preset": req.preset, "model": model,
            "guidance": req.guidance, "options": overrides, "device": ctx.device}
    return run_pipeline(factory, request, job_dir, events, cancelled, meta)


def _view_settings(run: dict[str, Any]) -> dict[str, Any]:
    """ImageTo3DRequest fields (views, fit) from the VIEW_OPTIONS of a request."""
    from engine_server.multiview import STRATEGIES
    from engine_server.pipelines.image_to_3d import ImageFitConfig

    out: dict[str, Any] = {}
    views = run.get("views")
    if views is not None:
        if isinstance(views, bool) or not isinstance(views, int) or not 2 <= views <= 16:
            raise JobFailure("invalid_option", f"options.views must be an integer from 2 to 16, got {views!r}")
        out["views"] = views
    strategy = run.get("multiview_strategy", "anchor")
    if strategy not in STRATEGIES:
        raise JobFailure("invalid_option", f"options.multiview_strategy must be one of {', '.join(STRATEGIES)}, "
                                           f"got {strategy!r}")
    steps = run.get("multiview_steps", ImageFitConfig.multiview_steps)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000:
        raise JobFailure("invalid_option", f"options.multiview_steps must be an integer from 1 to 1000, got {steps!r}")
    out["fit"] = ImageFitConfig(multiview_strategy=strategy, multiview_steps=steps)
    return out


def run_image(ctx: RunContext, request: dict[str, Any], job_dir: Path, events: EventSink,
              cancelled: Callable[[], bool]) -> Result:
    """An ``image`` or ``multiview`` job: ImageTo3D with the reference image (PNG) or, without one, a
    reference view drawn from the prompt; generated views, rig and options. The result carries the
    generated views too: ``views`` (N, R, R, 3) uint8, ``view_c2w`` (N, 4, 4), ``view_fov_y_deg`` (N,)."""
    from engine_server.pipelines.image_to_3d import ImageTo3D, ImageTo3DRequest

    run, overrides, model, prior, seed = _prepare(ctx, request, job_dir, RUN_OPTIONS + VIEW_OPTIONS)
    extra = {"guidance_scale": run["guidance_scale"]} if "guidance_scale" in run else {}
    image = request.get("image")
    req = ImageTo3DRequest(
        image=bytes(image.data) if image is not None else None, prompt=request.get("prompt") or "",
        negative_prompt=request.get("negative_prompt") or "", seed=seed, preset=request.get("preset") or "draft",
        model=model, guidance=run.get("guidance", "sds"), overrides=overrides, rig=rig_cameras(request),
        **_view_settings(run), **extra)
    pipelines = []

    def factory(**kw):
        pipelines.append(ImageTo3D(req, device=ctx.device, prior=prior, **kw))
        return pipelines[-1]

    meta = {"kind": request["kind"], "prompt": req.prompt, "seed": seed, "preset": req.preset, "model": model,
            "guidance": req.guidance, "options": overrides, "device": ctx.device}
    result = run_pipeline(factory, request, job_dir, events, cancelled, meta)
    views = pipelines[-1].views
    result.arrays.update(
        views=np.ascontiguousarray(views.images_uint8()),
        view_c2w=views.c2w.numpy().astype(np.float32), view_fov_y_deg=views.fovs.numpy().astype(np.float32))
    result.meta["views"] = {"count": len(views.images), "strategy": views.strategy,
                            "agreement": [round(float(a), 4) for a in views.agreement]}
    return result


def run_refine(ctx: RunContext, request: dict[str, Any], job_dir: Path, events: EventSink,
               cancelled: Callable[[], bool]) -> Result:
    """A ``refine`` job: RefineMesh on the request's mesh (its matrix_world as the world matrix), mode, options."""
    from engine_server.pipelines.refine import RefineMesh, RefineMeshRequest

    _, overrides, model, prior, seed = _prepare(ctx, request, job_dir)  # refine has no run settings beyond the model
    mesh = request["mesh"]
    matrix = mesh.get("matrix_world")
    req = RefineMeshRequest(
        prompt=request.get("prompt") or "", vertices=np.array(mesh["vertices"].numpy(), dtype=np.float32),
        faces=np.array(mesh["faces"].numpy(), dtype=np.int64),
        world_matrix=np.asarray(matrix, dtype=np.float64) if matrix is not None else None,
        mode=request.get("mode") or "full", negative_prompt=request.get("negative_prompt") or "", seed=seed,
        preset=request.get("preset") or "draft", model=model, overrides=overrides)

    def factory(**kw):
        return RefineMesh(req, device=ctx.device, prior=prior, **kw)

    meta = {"kind": "refine", "prompt": req.prompt, "mode": req.mode, "seed": seed, "preset": req.preset,
            "model": model, "options": overrides, "device": ctx.device}
    return run_pipeline(factory, request, job_dir, events, cancelled, meta)


KindRunner = Callable[[RunContext, dict, Path, EventSink, Callable[[], bool]], Result]
KIND_RUNNERS: dict[str, KindRunner] = {
    "text": run_text,
    "image": run_image,
    "multiview": run_image,
    "refine": run_refine,
}
"""Job kind -> its runner; a kind missing here fails with ``unsupported_kind``."""


class EngineRunner:
    """The JobRunner the worker calls: dispatches on ``request["kind"]`` through KIND_RUNNERS.

    The caller frees memory between jobs with ``runner.ctx.release()`` (the worker does, once
    the job's end is reported)."""

    def __init__(self, config: RunnerConfig | None = None):
        self.ctx = RunContext(config or RunnerConfig())

    def warm_up(self) -> None:
        """Load the default prior now (the first job then starts at once)."""
        self.ctx.prior(None)

    def __call__(self, request: dict[str, Any], job_dir: Path, events: EventSink,
                 cancelled: Callable[[], bool]) -> Result:
        kind = request.get("kind")
        runner = KIND_RUNNERS.get(kind)
        if runner is None:
            raise JobFailure("unsupported_kind", f"this engine cannot run {kind!r} jobs yet; it runs: "
                                                 f"{', '.join(sorted(KIND_RUNNERS))}")
        return runner(self.ctx, request, Path(job_dir), events, cancelled)
