"""The kind table: each job kind's request type, pipeline, the submit fields it reads and its run options.

The wire schema (``_check_submit`` in :mod:`engine_server.wire.protocol`) defines every
``submit`` field: its type, bounds and what an absent one means. This table says which of
those fields each kind reads; the server refuses the others at submit time with an
``error`` naming the field (:func:`check_submit`), so nothing is accepted and then ignored.
The runner (:mod:`engine_server.service.runner`) turns stored fields into the kind's
request with :meth:`Kind.build_request`, the command line takes the pipeline classes and
the ``--steps`` option name from here.

A request's ``options`` are preset overrides (checked by the preset, which names an unknown
key) plus the kind's ``run_options``, which are taken out first: ``model`` (one of the
models the server offers), ``guidance`` (sds | vsd), ``guidance_scale``, for text jobs ``perp_neg``
(true | false) and, for the kinds
that generate views, ``views`` (2-16), ``multiview_strategy`` and ``multiview_steps`` and the DreamCraft3D
stages of the fit (:data:`FIT_OPTIONS`: ``hybrid``, ``hybrid_weight``, ``view_start_range``, ``view_widen``,
``depth_weight``, ``normal_weight``, ``bsd_steps``, ``bsd_t_start``, ``bsd_t_end``; see
:class:`~engine_server.pipelines.image_to_3d.ImageFitConfig`).

Rig cameras arrive as Blender ``matrix_world`` rows; with a ``placement`` (where the result
will rest in the scene: the 3D cursor) they are taken relative to it, so the engine, which
makes the object at its origin, sees the cameras around the object it makes (DESIGN.md,
"Coordinates"). The placement is also kept in the result's ``meta`` for any client that
imports the result later.

No torch or numpy at import time: the server (a protocol-only one too) checks submits here.
"""
from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engine_server.pipelines.presets import DEFAULT_PRESET
from engine_server.wire.protocol import ProtocolError

logger = logging.getLogger(__name__)

COMMON_FIELDS = ("request_id", "kind", "subscribe", "prompt", "negative_prompt", "seed", "preset", "options")
"""Submit fields every kind reads (or the server itself: request_id, subscribe)."""
GUIDANCE_MODES = ("sds", "vsd")
"""Values of ``options.guidance``."""


class KindError(ValueError):
    """A run option of a stored request is bad; ``code`` is the job's failure code (``invalid_option``)."""

    def __init__(self, message: str, code: str = "invalid_option"):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Kind:
    """One job kind: what it reads from a submit and what it runs."""

    name: str
    """The ``kind`` field's value."""
    request: str
    """The request dataclass, as ``module:attribute`` (imported when a job runs)."""
    pipeline: str
    """The pipeline class, as ``module:attribute``; built as ``cls(request, device=, prior=, progress=,
    cancelled=, checkpoint_dir=)``, its ``run(out_path)`` writes the GLB."""
    fields: tuple[str, ...]
    """Submit fields it reads beyond COMMON_FIELDS; any other field is refused."""
    needs: tuple[tuple[str, ...], ...]
    """Each entry: at least one of these fields must be given (a prompt must not be blank)."""
    run_options: tuple[str, ...]
    """``options`` entries that are run settings, not preset overrides."""
    steps_option: str
    """The preset field a plain "steps" knob sets (the CLI's ``--steps``, the add-on's Steps)."""
    build: Callable[[type, Mapping[str, Any], dict[str, Any]], Any]
    """(request class, submit fields, common request fields) -> the request."""

    def request_class(self) -> type:
        """The request dataclass (imports its module)."""
        return _load(self.request)

    def pipeline_class(self) -> type:
        """The pipeline class (imports its module)."""
        return _load(self.pipeline)

    def split_options(self, options: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
        """(run settings, preset overrides) from a request's flat ``options``; bad run settings raise KindError."""
        overrides = dict(options or {})
        run = {k: overrides.pop(k) for k in self.run_options if k in overrides}
        if "guidance" in run and run["guidance"] not in GUIDANCE_MODES:
            raise KindError(f"options.guidance must be 'sds' or 'vsd', got {run['guidance']!r}")
        if "perp_neg" in run and not isinstance(run["perp_neg"], bool):
            raise KindError(f"options.perp_neg must be true or false, got {run['perp_neg']!r}")
        if "guidance_scale" in run and (isinstance(run["guidance_scale"], bool)
                                        or not isinstance(run["guidance_scale"], (int, float))):
            raise KindError(f"options.guidance_scale must be a number, got {run['guidance_scale']!r}")
        return run, overrides

    def build_request(self, fields: Mapping[str, Any], *, seed: int, model: str, run: Mapping[str, Any],
                      overrides: dict[str, Any]) -> Any:
        """The kind's request from stored submit fields (blobs as protocol Array / Image objects)."""
        common = {"prompt": fields.get("prompt") or "", "negative_prompt": fields.get("negative_prompt") or "",
                  "seed": seed, "preset": fields.get("preset") or DEFAULT_PRESET, "model": model,
                  "overrides": overrides, **{k: v for k, v in run.items() if k != "model"}}
        return self.build(self.request_class(), fields, common)


def _load(spec: str) -> type:
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


# ----------------------------------------------------------------------------- wire values -> pipeline values


def relative_rig(rig: Sequence[Mapping[str, Any]], placement: Sequence[Sequence[float]] | None) -> list[dict[str, Any]]:
    """Rig entries with ``matrix_world`` made relative to ``placement`` (inverse(placement) @ matrix_world).

    Plain lists in and out (4x4 rows); without a placement the rig is returned as it came.
    """
    if placement is None:
        return [dict(cam) for cam in rig]
    import numpy as np

    to_local = np.linalg.inv(np.asarray(placement, dtype=np.float64))
    return [{**cam, "matrix_world": (to_local @ np.asarray(cam["matrix_world"], dtype=np.float64)).tolist()}
            for cam in rig]


def rig_cameras(fields: Mapping[str, Any]) -> list | None:
    """The request's rig, relative to its placement, as :class:`engine_server.cameras.Camera` objects (None without one)."""
    rig = fields.get("rig")
    if not rig:
        return None
    import torch

    from engine_server.cameras import Camera

    return [Camera(torch.tensor(cam["matrix_world"], dtype=torch.float32), float(cam["fov_y_deg"]),
                   int(cam["width"]), int(cam["height"])) for cam in relative_rig(rig, fields.get("placement"))]


def _view_settings(run: dict[str, Any]) -> dict[str, Any]:
    """ImageTo3DRequest fields (views, fit) from the view run options (popped from ``run``)."""
    from engine_server.multiview import STRATEGIES
    from engine_server.pipelines.image_to_3d import ImageFitConfig

    out: dict[str, Any] = {}
    views = run.pop("views", None)
    if views is not None:
        if isinstance(views, bool) or not isinstance(views, int) or not 2 <= views <= 16:
            raise KindError(f"options.views must be an integer from 2 to 16, got {views!r}")
        out["views"] = views
    strategy = run.pop("multiview_strategy", "anchor")
    if strategy not in STRATEGIES:
        raise KindError(f"options.multiview_strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    steps = run.pop("multiview_steps", ImageFitConfig.multiview_steps)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 1000:
        raise KindError(f"options.multiview_steps must be an integer from 1 to 1000, got {steps!r}")
    fit = {}
    for name, kind in FIT_OPTIONS.items():
        if name in run:
            value = run.pop(name)
            if kind is bool and not isinstance(value, bool):
                raise KindError(f"options.{name} must be true or false, got {value!r}")
            if kind is float and value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise KindError(f"options.{name} must be a number, got {value!r}")
            if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise KindError(f"options.{name} must be an integer, got {value!r}")
            fit[name] = value
    try:
        out["fit"] = ImageFitConfig(multiview_strategy=strategy, multiview_steps=steps, **fit)
    except ValueError as exc:  # the config names the field and its bounds
        raise KindError(str(exc).replace("ImageFitConfig.", "options.")) from None
    return out


def _text(cls: type, fields: Mapping[str, Any], common: dict[str, Any]) -> Any:
    return cls(**common, rig=rig_cameras(fields))


def _image(cls: type, fields: Mapping[str, Any], common: dict[str, Any]) -> Any:
    image = fields.get("image")
    views = _view_settings(common)
    return cls(**common, **views, rig=rig_cameras(fields), image=bytes(image.data) if image is not None else None)


def _refine(cls: type, fields: Mapping[str, Any], common: dict[str, Any]) -> Any:
    import numpy as np

    mesh = fields["mesh"]
    matrix = mesh.get("matrix_world")
    return cls(**common, vertices=np.array(mesh["vertices"].numpy(), dtype=np.float32),
               faces=np.array(mesh["faces"].numpy(), dtype=np.int64),
               world_matrix=np.asarray(matrix, dtype=np.float64) if matrix is not None else None,
               mode=fields.get("mode") or "full")


# ----------------------------------------------------------------------------- the table

_TEXT_RUN = ("model", "guidance", "guidance_scale", "format")
FIT_OPTIONS = {"hybrid": bool, "hybrid_weight": float, "view_start_range": float, "view_widen": float,
               "depth_weight": float, "normal_weight": float, "bsd_steps": int, "bsd_t_start": float,
               "bsd_t_end": float}
"""Run options of the image kinds that set :class:`~engine_server.pipelines.image_to_3d.ImageFitConfig` fields
of the same name, with their type (``view_start_range`` may be null: all around from the start)."""
_VIEW_RUN = ("views", "multiview_strategy", "multiview_steps", *FIT_OPTIONS)

KINDS: dict[str, Kind] = {
    "text": Kind("text", "engine_server.pipelines.text_to_3d:TextTo3DRequest",
                 "engine_server.pipelines.text_to_3d:TextTo3D",
                 fields=("rig", "placement"), needs=(("prompt",),), run_options=_TEXT_RUN + ("perp_neg",),
                 steps_option="coarse_steps", build=_text),
    "image": Kind("image", "engine_server.pipelines.image_to_3d:ImageTo3DRequest",
                  "engine_server.pipelines.image_to_3d:ImageTo3D",
                  fields=("image", "rig", "placement"), needs=(("image",),), run_options=_TEXT_RUN + _VIEW_RUN,
                  steps_option="coarse_steps", build=_image),
    "multiview": Kind("multiview", "engine_server.pipelines.image_to_3d:ImageTo3DRequest",
                      "engine_server.pipelines.image_to_3d:ImageTo3D",
                      fields=("image", "rig", "placement"), needs=(("prompt", "image"),),
                      run_options=_TEXT_RUN + _VIEW_RUN, steps_option="coarse_steps", build=_image),
    "refine": Kind("refine", "engine_server.pipelines.refine:RefineMeshRequest",
                   "engine_server.pipelines.refine:RefineMesh",
                   fields=("mesh", "mode", "placement"), needs=(("mesh",), ("prompt",)), run_options=_TEXT_RUN,
                   steps_option="refine_steps", build=_refine),
}
"""Job kind -> Kind; the keys are the wire's ``KINDS`` (a test holds them equal)."""


def check_submit(fields: Mapping[str, Any]) -> Kind:
    """The kind of a decoded ``submit``; raises ProtocolError naming a field the kind does not read or lacks."""
    kind = KINDS[fields["kind"]]
    allowed = COMMON_FIELDS + kind.fields
    for name in fields:
        if name not in allowed:
            raise ProtocolError("invalid", f"a {kind.name} job does not use {name}; it reads "
                                           f"{', '.join(f for f in allowed if f not in ('request_id', 'kind', 'subscribe'))}", name)
    for group in kind.needs:
        if not any(_given(fields.get(name)) for name in group):
            what = " or ".join("a non-empty prompt" if n == "prompt" else f"a {n}" for n in group)
            raise ProtocolError("invalid", f"a {kind.name} job needs {what}", group[0])
    return kind


def _given(value: Any) -> bool:
    return value is not None and not (isinstance(value, str) and not value.strip())
