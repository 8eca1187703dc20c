"""The engine's result arrays as Blender wants them, without Blender (testable with plain Python; numpy, which Blender ships).

The engine sends vertices in its own coordinates (Z up, Blender's world) and UVs in glTF's
convention ((0, 0) = the image's top-left); Blender keeps UVs per loop with a bottom-left origin.
"""
from __future__ import annotations

import numpy as np


def blender_uvs(uvs: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Per-loop UVs for Blender ((F*3, 2) float32, bottom-left origin) from per-vertex glTF UVs (V, 2)."""
    loop_uv = np.asarray(uvs, dtype=np.float32)[np.asarray(faces).reshape(-1)]
    loop_uv[:, 1] = 1.0 - loop_uv[:, 1]
    return loop_uv
