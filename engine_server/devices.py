"""The one device resolver (``auto`` means CUDA when torch sees a GPU, else the CPU), and what the CPU computes
natively."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path


def resolve_device(name: str) -> str:
    """``auto`` -> "cuda" when available, else "cpu"; anything else ("cpu", "cuda:1") unchanged."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX-512 BF16 or AMX) and oneDNN uses it.

    Elsewhere oneDNN emulates bf16, no faster than fp32, so callers keep fp32 there.
    """
    import torch

    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no way to tell cheaply, stay in fp32
        return False
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and ("avx512_bf16" in flags or "amx_bf16" in flags)
