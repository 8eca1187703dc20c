"""The real engine as a :class:`~engine_server.service.jobs.JobRunner`: a job's request -> pipeline -> Result.

:class:`EngineRunner` is what the worker's child process calls once per job attempt. It
keeps the loaded priors between jobs (the child stays warm), looks the job's ``kind`` up in
the kind table (:mod:`engine_server.pipelines.kinds`: which fields and run options a kind
reads, its request type and pipeline) and runs that pipeline with the job's checkpoint
folder. Adding a kind is one entry in that table.

Every job makes the GLB the add-on imports (``work/model.glb``); ``options.format`` (obj, usd,
usdz) also writes that format's files from the same mesh into ``work/export/``, stored with
the result (``result/files/``) and named in its meta (``export``).
"""
from __future__ import annotations

import io
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine_server.devices import resolve_device
from engine_server.export import SUFFIXES, export_mesh, format_of, glb_facts
from engine_server.pipelines.kinds import KINDS, KindError
from engine_server.service.jobs import EventSink, JobFailure, Result, checkpoint_dir

logger = logging.getLogger(__name__)

_META_FIELDS = ("prompt", "seed", "preset", "model", "guidance", "mode")
"""Request fields a result's meta repeats (those the kind's request has)."""


@dataclass
class RunnerConfig:
    """How the worker's runner loads models and where it computes."""

    device: str = "auto"
    """auto (CUDA when available, else CPU), cpu or cuda[:N]."""
    model: str = "bundled"
    """The default prior: "bundled", a local diffusers folder, a single-file checkpoint or a hub id."""
    model_config: str | None = None
    """The diffusers config (hub id or folder) a single-file ``model`` is built from (None: its own inference)."""
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
                config = self.config.model_config if name == self.config.model else None
                self._priors[name] = load_prior(name, device=self.device, config=config)
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


class _ProgressBridge:
    """Pipeline ProgressEvents -> EventSink calls (progress every event; preview / intermediate mesh when present)."""

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


class EngineRunner:
    """The JobRunner the worker calls: looks the job's kind up in the kind table and runs its pipeline.

    The caller frees memory between jobs with ``runner.ctx.release()`` (the worker does, once
    the job's end is reported)."""

    def __init__(self, config: RunnerConfig | None = None):
        self.ctx = RunContext(config or RunnerConfig())

    def warm_up(self) -> None:
        """Load the default prior now (the first job then starts at once)."""
        self.ctx.prior(None)

    def __call__(self, request: dict[str, Any], job_dir: Path, events: EventSink,
                 cancelled: Callable[[], bool]) -> Result:
        """Run one job attempt: request -> the kind's pipeline (resuming from its checkpoints) -> Result.

        Maps a bad run option to ``invalid_option``, a non-finite loss to ``non_finite``, a bad
        preset option or prompt (ValueError) to ``invalid_request``, an empty field to
        ``empty_mesh``; the pipeline's Cancelled goes through to the worker.
        """
        job_dir = Path(job_dir)
        kind = KINDS.get(request.get("kind"))
        if kind is None:
            raise JobFailure("unsupported_kind", f"this engine cannot run {request.get('kind')!r} jobs; it runs: "
                                                 f"{', '.join(KINDS)}")
        try:
            run, overrides = kind.split_options(request.get("options"))
            export_format = run.pop("format", None) or "glb"
            export_path = self._export_path(job_dir, export_format)
            model = run.get("model") or self.ctx.config.model
            prior = self.ctx.prior(model)
            seed = job_seed(request, job_dir)
            req = kind.build_request(request, seed=seed, model=model, run=run, overrides=overrides)
        except KindError as exc:
            raise JobFailure(exc.code, str(exc)) from None
        work = job_dir / "work"
        work.mkdir(parents=True, exist_ok=True)
        bridge = _ProgressBridge(events)
        t0 = time.perf_counter()
        try:
            pipeline = kind.pipeline_class()(req, device=self.ctx.device, prior=prior, progress=bridge,
                                             cancelled=cancelled, checkpoint_dir=checkpoint_dir(job_dir))
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
        texture = np.asarray(out.texture)
        glb = glb_facts(out.glb_path)  # the PNGs the export encoded and the node's name, read back, not re-made
        files = self._export(out, export_path, glb.name)
        meta = {"kind": kind.name, "name": glb.name, **{k: getattr(req, k) for k in _META_FIELDS if hasattr(req, k)},
                "options": overrides, "device": self.ctx.device, "seconds": round(time.perf_counter() - t0, 3),
                "faces": int(len(faces)), "vertices": int(len(vertices)), "texture_size": int(texture.shape[0]),
                "material": {"metallic": glb.metallic, "roughness": glb.roughness},
                "export": {"format": export_format, "file": export_path.name if export_path else "model.glb",
                           "files": [p.name for p in files]}}
        if request.get("placement") is not None:
            meta["placement"] = request["placement"]
        if request.get("rig"):  # made for those cameras around the placement: centred there, not resting on it
            meta["rig_cameras"] = len(request["rig"])
        if bridge.first_coarse_step is not None:
            meta["resumed_from_step"] = bridge.first_coarse_step  # the stage-start event carries the step resumed at
        timings = getattr(pipeline, "timings", None)
        if timings:
            meta["timings_s"] = {k: round(float(v), 3) for k, v in timings.items()}
        arrays = {"vertices": vertices, "faces": faces, "uvs": uvs}
        views = getattr(pipeline, "views", None)
        if views is not None:  # image and multiview jobs: the generated views travel with the result
            arrays.update(views=np.ascontiguousarray(views.images_uint8()),
                          view_c2w=views.c2w.numpy().astype(np.float32),
                          view_fov_y_deg=views.fovs.numpy().astype(np.float32))
            # what the sidecar says of them (agreement, redrawn, left out of the fit) and which reference camera
            meta["views"] = out.sidecar["views"]
            meta["reference_camera"] = out.sidecar["reference"]["camera"]
        return Result(glb_path=Path(out.glb_path), texture_png=glb.texture_png, arrays=arrays, meta=meta,
                      normal_png=glb.normal_png, files=files)

    @staticmethod
    def _export_path(job_dir: Path, export_format: str) -> Path | None:
        """Where ``options.format``'s file goes (None for glb); KindError when the format cannot be written here."""
        if export_format == "glb":
            return None
        path = job_dir / "work" / "export" / f"model{SUFFIXES[export_format]}"
        try:
            format_of(path)  # usd-core missing: fail now, not after the whole run
        except ValueError as exc:
            raise KindError(f"options.format {export_format!r}: {exc}") from None
        return path

    @staticmethod
    def _export(out, export_path: Path | None, name: str) -> list[Path]:
        """Write the pipeline's mesh in the requested format into its own folder; returns the files written."""
        if export_path is None:
            return []
        if export_path.parent.exists():  # a resumed attempt's leftovers
            shutil.rmtree(export_path.parent)
        export_path.parent.mkdir(parents=True)
        export_mesh(export_path, out.mesh, name=name)
        return sorted(export_path.parent.iterdir())
