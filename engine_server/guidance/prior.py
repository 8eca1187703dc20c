"""The diffusion-prior interface that score distillation talks to, and the registry that loads one.

A *prior* wraps one pretrained diffusion model (Stable Diffusion, a Zero123-family
novel-view model, an MVDream-style multi-view model, the project's bundled model)
behind the same few calls: encode renders to the space it denoises in, turn a
``Conditioning`` into its conditioning tensors, and predict the noise of a noisy
batch. Adapters register under a name with ``@register_prior(name)``;
``load_prior(name_or_path, device)`` picks one from a folder's ``model_index.json``,
or by name for an adapter registered with its own ``folder`` (the bundled model).
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import torch
from torch import nn

from engine_server.guidance.config import Conditioning

logger = logging.getLogger(__name__)

BUNDLED = "bundled"
"""Registry name of the project's own bundled prior (``adapters/bundled.py``)."""


class PriorLoadError(RuntimeError):
    """A model could not be loaded as a prior: missing files, or a model of another kind."""


@dataclass
class PriorInputs:
    """A prior's conditioning for one batch of B views, conditional and unconditional branches.

    Values are tensors with the batch first, or lists of length B (for priors that
    take strings); the guidance never looks inside, it only batches the branches.
    """

    cond: dict[str, Any]
    """Conditional branch (the prompt / reference view)."""
    uncond: dict[str, Any]
    """Unconditional branch (negative prompt / null reference) for classifier-free guidance."""
    _cfg: dict[str, Any] | None = field(default=None, repr=False)

    def cfg_batch(self) -> dict[str, Any]:
        """The two branches stacked as [uncond; cond] along the batch (2B), computed once."""
        if self._cfg is None:
            self._cfg = {k: _cat(self.uncond[k], self.cond[k]) for k in self.cond}
        return self._cfg


def _cat(a: Any, b: Any) -> Any:
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b], dim=0)
    if isinstance(a, list):
        return a + b
    raise TypeError(f"PriorInputs values must be tensors or lists, got {type(a).__name__}")


@runtime_checkable
class Prior(Protocol):
    """What a diffusion-prior adapter provides to score distillation.

    Shapes: renders (B, 3, H, W) in [0, 1]; cameras (B, 4, 4) camera-to-world in
    Blender's convention; latents (B, C, h, w); timesteps (B,) long.
    """

    kind: str
    """"text" (prompt only), "image" (reference view + relative camera) or "multiview" (cameras)."""
    num_train_timesteps: int
    """Number of diffusion training timesteps T."""
    prediction_type: str
    """What the network predicts natively: "epsilon", "v_prediction" or "sample"."""
    alphas_cumprod: torch.Tensor
    """(T,) float32 cumulative products of alphas, on the prior's device."""
    resolution: int
    """Square render size in pixels the prior was trained at."""
    views_per_sample: int
    """Views denoised jointly with one timestep (1, or the number of views of a multi-view model)."""
    device: torch.device
    """Where the networks live."""
    dtype: torch.dtype
    """Dtype of the networks (fp16 on CUDA, fp32 on CPU by default)."""
    unet: nn.Module | None
    """The denoiser, for VSD's LoRA; None where the prior cannot carry one."""

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Renders (B, 3, H, W) in [0, 1] -> latents (B, C, h, w) float32, differentiable."""
        ...

    def prepare_conditioning(
        self, cond: Conditioning, cameras: torch.Tensor, prompts: list[str] | None = None
    ) -> PriorInputs:
        """Conditioning tensors for B views with cameras (B, 4, 4); ``prompts`` overrides the prompt per view."""
        ...

    def predict_noise(
        self, latents_t: torch.Tensor, t: torch.Tensor, embeddings: dict[str, Any], cameras: torch.Tensor
    ) -> torch.Tensor:
        """Noise estimate eps (N, C, h, w) float32 of noisy latents (N, C, h, w) at timesteps t (N,)."""
        ...


# --------------------------------------------------------------------------- registry

PriorLoader = Callable[[Path, torch.device, torch.dtype], Prior]


@dataclass(frozen=True)
class _Entry:
    name: str
    load: PriorLoader
    matches: Callable[[dict, Path], bool] | None
    expects: str
    folder: Path | None


_REGISTRY: dict[str, _Entry] = {}


def register_prior(name: str, *, expects: str = "", matches: Callable[[dict, Path], bool] | None = None,
                   folder: Path | None = None):
    """Class decorator: register a prior adapter under ``name``.

    The class needs a ``from_folder(folder, device, dtype)`` classmethod; it is
    picked for a folder when ``matches(model_index, folder)`` (or the class's own
    ``matches`` classmethod) returns True. ``expects`` describes the folder layout
    it needs, for error messages. With ``folder``, ``load_prior(name)`` loads that
    folder (a model that ships with the engine), which need not be a diffusers folder.
    """

    def deco(cls):
        match_fn = matches or getattr(cls, "matches", None)
        _REGISTRY[name] = _Entry(name, cls.from_folder, match_fn, expects or getattr(cls, "expects", name),
                                 None if folder is None else Path(folder))
        cls.registry_name = name
        return cls

    return deco


def registered_priors() -> list[str]:
    """Names of the registered adapters."""
    return sorted(_REGISTRY)


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA, fp32 elsewhere."""
    return torch.float16 if device.type == "cuda" else torch.float32


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def load_prior(
    name_or_path: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    adapter: str | None = None,
) -> Prior:
    """Load a prior by registered name ("bundled"), local model folder or Hugging Face hub id.

    A name registered with its own folder loads that folder. Otherwise the adapter is
    chosen from the folder's ``model_index.json`` (``_class_name`` and components) unless
    ``adapter`` names one. dtype defaults to fp16 on CUDA and fp32 on CPU. Raises
    ``PriorLoadError`` naming the path and what was expected when files are missing
    or the model is of another kind.
    """
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    if adapter is not None and adapter not in _REGISTRY:
        raise PriorLoadError(f"unknown prior adapter {adapter!r}; registered: {', '.join(registered_priors())}")
    named = _REGISTRY.get(os.fspath(name_or_path))
    if named is not None and named.folder is not None and adapter in (None, named.name):
        entry, folder = named, named.folder
    else:
        folder = resolve_model_folder(name_or_path)
        entry = _REGISTRY[adapter] if adapter is not None else None
        if entry is None or entry.folder is None:  # diffusers adapters read the folder's model_index.json
            index = read_model_index(folder)
            entry = entry or _pick_adapter(index, folder)
    logger.info("loading %s prior from %s (%s, %s)", entry.name, folder, device, dtype)
    return entry.load(folder, device, dtype)


def _pick_adapter(index: dict, folder: Path) -> _Entry:
    for entry in _REGISTRY.values():
        if entry.matches is not None and entry.matches(index, folder):
            return entry
    expected = "; ".join(f"{e.name}: {e.expects}" for e in _REGISTRY.values() if e.matches is not None)
    raise PriorLoadError(
        f"{folder} holds a {index.get('_class_name', 'pipeline without _class_name')!r} with components "
        f"{sorted(k for k in index if not k.startswith('_'))}, which is no diffusion prior this engine can use. "
        f"Expected one of: {expected}"
    )


def resolve_model_folder(name_or_path: str | os.PathLike) -> Path:
    """A local folder for a path or a hub id (downloaded into the Hugging Face cache if needed)."""
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise PriorLoadError(f"{path} is a file; expected a diffusers model folder with model_index.json")
    looks_like_path = text.startswith((".", "/", "~")) or os.sep in text.replace("/", "", 1) or "\\" in text
    if looks_like_path or not _HUB_ID.match(text):
        raise PriorLoadError(
            f"no model folder at {path}; expected a diffusers model folder with model_index.json "
            "or a Hugging Face hub id such as 'stabilityai/stable-diffusion-2-1-base'"
        )
    return _download(text)


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import hf_hub_download, snapshot_download
    except ImportError as exc:  # pragma: no cover - huggingface_hub comes with diffusers
        raise PriorLoadError(f"cannot fetch hub id {repo_id!r}: huggingface_hub is not installed") from exc

    def fetch(local_only: bool) -> str:
        index_file = hf_hub_download(repo_id, "model_index.json", local_files_only=local_only)
        index = json.loads(Path(index_file).read_text())
        components = [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0]]
        folder = snapshot_download(
            repo_id,
            allow_patterns=["model_index.json", *(f"{c}/*" for c in components)],
            ignore_patterns=["*.ckpt", "*.msgpack", "*.h5", "*.onnx", "*.onnx_data", "*.pb", "safety_checker/*"],
            local_files_only=local_only,
        )
        missing = [c for c in components if c != "safety_checker" and not (Path(folder) / c).is_dir()]
        if missing:
            raise FileNotFoundError(f"cached copy of {repo_id} lacks {missing}")
        return folder

    try:
        try:
            folder = fetch(local_only=True)  # a cached copy loads without touching the network
        except Exception:  # noqa: BLE001 - not cached (or incomplete): fetch it
            folder = fetch(local_only=False)
    except Exception as exc:  # noqa: BLE001 - any hub/network failure becomes one clear error
        raise PriorLoadError(
            f"could not fetch {repo_id!r} from the Hugging Face hub or its cache "
            f"({type(exc).__name__}: {exc}); pass a local folder instead"
        ) from exc
    return Path(folder)


def read_model_index(folder: Path) -> dict:
    """The parsed ``model_index.json`` of a diffusers folder, or a ``PriorLoadError`` saying what is missing."""
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        found = sorted(p.name for p in folder.iterdir())[:12] if folder.is_dir() else []
        raise PriorLoadError(
            f"{folder} has no model_index.json; expected a diffusers pipeline folder "
            f"(model_index.json plus unet/, vae/, scheduler/ ...), found {found}"
        )
    try:
        index = json.loads(index_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PriorLoadError(f"{index_path} is not valid JSON: {exc}") from exc
    if not isinstance(index, dict):
        raise PriorLoadError(f"{index_path} must hold a JSON object, got {type(index).__name__}")
    return index


def read_component_config(folder: Path, component: str) -> dict:
    """``<folder>/<component>/config.json`` parsed, or a ``PriorLoadError`` naming it."""
    path = folder / component / "config.json"
    if not path.is_file():
        raise PriorLoadError(f"{folder} has no {component}/config.json; expected the {component!r} component there")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PriorLoadError(f"{path} is not valid JSON: {exc}") from exc


def load_component(folder: Path, component: str, loader: Callable[..., Any], what: str, **kwargs) -> Any:
    """Load ``<folder>/<component>`` with ``loader(str(folder), subfolder=component, **kwargs)``.

    Any loading failure becomes a ``PriorLoadError`` naming the folder, the component and ``what`` was expected.
    """
    sub = folder / component
    if not sub.is_dir():
        raise PriorLoadError(f"{folder} has no {component}/ folder; expected {what} there")
    try:
        return loader(str(folder), subfolder=component, **kwargs)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as exc:
        raise PriorLoadError(f"could not load {sub} as {what}: {type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------- shared helpers


class EmbeddingCache:
    """A small LRU cache of encoded conditioning (text prompts, reference views)."""

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        self._data: OrderedDict[Any, Any] = OrderedDict()

    def get(self, key: Any, make: Callable[[], Any]) -> Any:
        """The cached value for ``key``, made with ``make()`` on a miss."""
        if key in self._data:
            self._data.move_to_end(key)
            return self._data[key]
        value = make()
        self._data[key] = value
        if len(self._data) > self.capacity:
            self._data.popitem(last=False)
        return value

    def clear(self) -> None:
        """Forget everything (e.g. after the encoder's weights changed)."""
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


def tensor_key(x: torch.Tensor) -> tuple:
    """A cheap identity key of a tensor's contents: storage, shape, and in-place version counter."""
    return (x.data_ptr(), tuple(x.shape), x.dtype, x.device, x._version)


def camera_vector(c2w: torch.Tensor) -> torch.Tensor:
    """Flattened camera-to-world (N, 16) with the position scaled to unit distance from the origin.

    MVDream-style camera conditioning: rotation plus the direction of the camera
    from the object; the distance is dropped, as the object fills the view.
    """
    c2w = c2w.to(torch.float32)
    pos = c2w[:, :3, 3]
    scaled = c2w.clone()
    scaled[:, :3, 3] = pos / pos.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    return scaled.reshape(c2w.shape[0], 16)


def to_epsilon(
    output: torch.Tensor, latents_t: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """Convert a network output to a noise estimate: v- and x0-prediction become epsilon."""
    if prediction_type == "epsilon":
        return output
    ab = alphas_cumprod[t].view(-1, *([1] * (latents_t.dim() - 1)))
    if prediction_type == "v_prediction":
        return ab.sqrt() * output + (1.0 - ab).sqrt() * latents_t
    if prediction_type == "sample":
        return (latents_t - ab.sqrt() * output) / (1.0 - ab).sqrt()
    raise ValueError(f"unknown prediction_type {prediction_type!r}")
