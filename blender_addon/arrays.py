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


def resting(vertices: np.ndarray) -> np.ndarray:
    """``vertices`` (V, 3) moved so that the bounding box is centred in x/y on the origin and its lowest point is at z 0.

    The engine makes objects centred on their origin; placed with this, an object stands on
    the point it is placed at (the 3D cursor) instead of sinking half into the floor.
    """
    v = np.asarray(vertices, dtype=np.float32).reshape(-1, 3)
    if len(v) == 0:
        return v.copy()
    lo, hi = v.min(axis=0), v.max(axis=0)
    offset = np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, lo[2]], dtype=np.float32)
    return v - offset


def mean_colour(rgba: np.ndarray, channels: int, max_samples: int = 65536) -> tuple[float, float, float, float]:
    """Mean RGB (alpha 1) of flat pixel values with ``channels`` per pixel, from at most ``max_samples`` evenly strided pixels.

    Used as the object's viewport display colour, so Solid view shows the texture's overall colour.
    """
    px = np.asarray(rgba, dtype=np.float32).reshape(-1, channels)
    if len(px) == 0:
        return (0.8, 0.8, 0.8, 1.0)
    px = px[::max(1, len(px) // max_samples)]
    rgb = px[:, :3].mean(axis=0) if channels >= 3 else np.repeat(px[:, 0].mean(), 3)
    return (float(rgb[0]), float(rgb[1]), float(rgb[2]), 1.0)
