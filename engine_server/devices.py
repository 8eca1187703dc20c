"""The one device resolver: ``auto`` means CUDA when torch sees a GPU, else the CPU."""
from __future__ import annotations


def resolve_device(name: str) -> str:
    """``auto`` -> "cuda" when available, else "cpu"; anything else ("cpu", "cuda:1") unchanged."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
