"""What every job pipeline shares: its constructor's arguments, cancel, timed stages, the export stage, the result.

A job pipeline (text, image, refine) is built from a request plus ``device``,
``progress``, ``cancelled`` and ``checkpoint_dir``, and ``run(out_path)`` ends the same way
for all of them: one :class:`~engine_server.export.TexturedMesh` is built (for new geometry by
:func:`~engine_server.texture.asset.build_asset`: smoothed, decimated to the preset's ``faces``,
baked with a normal map), written with its JSON sidecar by ``export_mesh``, the timings
recorded, a last ``export`` event sent and a :class:`PipelineResult` returned.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import torch

from engine_server.pipelines.events import Cancelled, ProgressCallback, ProgressEvent
from engine_server.pipelines.presets import Preset

if TYPE_CHECKING:
    from engine_server.export import TexturedMesh

logger = logging.getLogger(__name__)


@dataclass
class PipelineResult:
    """What ``run(out_path)`` of every job pipeline returns."""

    glb_path: Path
    """The exported file (GLB, or what the path's extension names)."""
    vertices: np.ndarray
    """(V, 3) float32 as exported (text / image: unit bounding box centred at the origin, Z up;
    refine: the input's local frame)."""
    faces: np.ndarray
    """(F, 3) int64."""
    uvs: np.ndarray
    """(V, 2) glTF UVs."""
    texture: np.ndarray
    """(S, S, 3) uint8 base colour."""
    sidecar: dict
    """What was written beside the GLB."""
    mesh: TexturedMesh
    """The exported mesh and material (``vertices`` ... ``texture`` above are its arrays)."""
    vmapping: np.ndarray | None = None
    """(V,) input vertex of each output vertex (refine in texture mode), else None."""


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """A render (3, H, W) in [0, 1] as an (H, W, 3) uint8 picture (previews)."""
    return (image.detach().permute(1, 2, 0).clamp(0, 1) * 255).round().byte().cpu().numpy()


def no_progress(event: ProgressEvent) -> None:
    """The progress callback of a caller that passed none."""


def never_cancelled() -> bool:
    """The cancel check of a caller that passed none."""
    return False


class JobPipeline:
    """The part of a job pipeline that does not depend on the job kind.

    Every pipeline is built the same way, ``Pipeline(request, device=, progress=, cancelled=,
    checkpoint_dir=, prior=)`` (the service's runner and the CLI rely on it); a subclass
    builds its own parts in :meth:`setup`.
    """

    STAGES: tuple[str, ...] = ()
    """Stage names of progress events, in order."""

    def __init__(
        self,
        request,
        device: str | torch.device = "cpu",
        progress: ProgressCallback | None = None,
        cancelled: Callable[[], bool] | None = None,
        checkpoint_dir: str | Path | None = None,
        prior=None,
    ) -> None:
        self.request = request
        self.device = torch.device(device)
        self.progress: ProgressCallback = progress or no_progress
        self.cancelled: Callable[[], bool] = cancelled or never_cancelled
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.timings: dict[str, float] = {}
        """Seconds per stage (``<stage>_s``) and in all (``total_s``), once run."""
        self.setup(prior)

    def setup(self, prior) -> None:
        """Check the request and build the pipeline's parts; ``prior``: a loaded prior to use, or None.

        Bad requests fail here, before any heavy work.
        """
        raise NotImplementedError

    def use_prior(self, prior):
        """``prior``, or when None the request's ``model`` loaded on the pipeline's device."""
        from engine_server.guidance import load_prior

        return prior if prior is not None else load_prior(self.request.model, device=self.device)

    def _check_cancel(self) -> None:
        if self.cancelled():
            raise Cancelled()

    def checkpoint_path(self, name: str) -> Path | None:
        """``name`` in the checkpoint folder, or None without one."""
        return self.checkpoint_dir / name if self.checkpoint_dir else None

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Record the block's seconds as ``timings[stage + "_s"]``, then honour a cancel request."""
        t = time.perf_counter()
        yield
        self.timings[f"{stage}_s"] = time.perf_counter() - t
        self._check_cancel()

    def export(self, out_path: Path, started: float, mesh: TexturedMesh, sidecar: dict, name: str,
               vmapping: np.ndarray | None = None) -> PipelineResult:
        """The last stage: the file + sidecar (with device and timings so far), total time, the ``export`` event.

        ``started`` is the ``time.perf_counter()`` at the start of ``run``.
        """
        from engine_server.export import export_mesh

        t = time.perf_counter()
        sidecar = {**sidecar, "device": str(self.device), "timings_s": dict(self.timings)}
        export_mesh(out_path, mesh, name=name, sidecar=sidecar)
        self.timings["export_s"] = time.perf_counter() - t
        self.timings["total_s"] = time.perf_counter() - started
        self.progress(ProgressEvent("export", 1, 1))
        return PipelineResult(Path(out_path), mesh.vertices, mesh.faces, mesh.uvs, mesh.base_color, sidecar, mesh,
                              vmapping)

    def asset_config(self, preset: Preset):
        """How new geometry is finished: the preset's ``faces``, ``texture_size`` and ``bake_samples``."""
        from engine_server.texture.asset import AssetConfig

        return AssetConfig(faces=preset.faces, texture_size=preset.texture_size, supersample=preset.bake_samples)
