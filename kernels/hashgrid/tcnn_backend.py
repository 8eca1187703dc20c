"""The `tcnn` hash-grid backend: tiny-cuda-nn's HashGrid encoding, when `tinycudann` imports on CUDA.

tiny-cuda-nn's grid is not our layout, so it cannot read our (L, 2**T, F) table:
- level l has scale s_l = base * b^l - 1 and looks up p = x * s_l + 0.5, so its vertices sit
  at x = (k - 0.5) / s_l, half a cell off ours (x = k / R_l), and its resolutions are not our
  floor(base * growth^l);
- its levels are packed in one flat parameter vector, coarse levels holding only their dense
  grid's rows (fewer than 2**T), and it keeps half-precision parameters by default.
No input transform maps one grid onto the other for every level at once, so this backend keeps
tiny-cuda-nn's own parameters and numerics: `HashGridEncoder(config, backend="tcnn")` holds a
`TcnnHashGrid` (its `params`) instead of `table`, and `auto` never picks it. Same config
(levels, features, table size, base resolution, geometric growth to max resolution), same
output shape and level-major order, positions clamped to [0, 1] as ours; values differ.
"""
from __future__ import annotations

import importlib.util
import logging
import math

import torch
from torch import nn

from kernels.hashgrid.backends import BackendStatus, BackendUnavailableError
from kernels.hashgrid.config import HashGridConfig

logger = logging.getLogger(__name__)


def probe() -> BackendStatus:
    """Cheap: tinycudann installed (not imported) and a CUDA device."""
    if importlib.util.find_spec("tinycudann") is None:
        return BackendStatus(False, "tinycudann is not installed (optional; build it from tiny-cuda-nn's bindings/torch)")
    if not torch.cuda.is_available():
        return BackendStatus(False, "needs a CUDA GPU")
    return BackendStatus(True, "tiny-cuda-nn HashGrid (own parameter layout; request it by name)", ("cuda",))


def tcnn_encoding_config(config: HashGridConfig) -> dict:
    """tiny-cuda-nn's encoding config for our HashGridConfig (same levels, sizes and growth)."""
    if config.n_features not in (1, 2, 4, 8):
        raise ValueError(f"tiny-cuda-nn's HashGrid needs n_features in 1, 2, 4, 8, got {config.n_features}")
    growth = 1.0
    if config.n_levels > 1:
        growth = math.exp(
            (math.log(config.max_resolution) - math.log(config.base_resolution)) / (config.n_levels - 1)
        )
    return {
        "otype": "HashGrid",
        "n_levels": config.n_levels,
        "n_features_per_level": config.n_features,
        "log2_hashmap_size": config.log2_table_size,
        "base_resolution": config.base_resolution,
        "per_level_scale": growth,
        "interpolation": "Linear",
    }


def _import_tcnn():
    try:
        import tinycudann
    except ImportError as exc:  # also the bindings' own errors on a machine without CUDA
        raise BackendUnavailableError(f"hash-grid backend 'tcnn' is unavailable: {exc}") from exc
    return tinycudann


class TcnnHashGrid(nn.Module):
    """tiny-cuda-nn's hash grid with its own `params`. forward: x (N, 3) in [0, 1] -> (N, L*F) in x's dtype."""

    def __init__(self, config: HashGridConfig, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if dtype not in (torch.float32, torch.float16):
            raise ValueError(f"tiny-cuda-nn keeps float32 or float16 parameters, not {dtype}")
        tcnn = _import_tcnn()
        self.config = config
        self.encoding = tcnn.Encoding(3, tcnn_encoding_config(config), dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cuda":
            raise ValueError(f"the 'tcnn' hash-grid backend needs CUDA tensors, got {x.device}")
        out = self.encoding(x.float().clamp(0.0, 1.0).contiguous())
        return out.to(x.dtype)


def load():
    """The registry's encode function: tcnn cannot encode with a shared table (see module doc)."""
    _import_tcnn()

    def encode(x: torch.Tensor, table: torch.Tensor, config: HashGridConfig) -> torch.Tensor:
        raise BackendUnavailableError(
            "the 'tcnn' backend keeps tiny-cuda-nn's own parameters and cannot read a (L, 2**T, F) table; "
            "use HashGridEncoder(config, backend='tcnn')"
        )

    return encode
