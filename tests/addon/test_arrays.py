"""blender_addon/arrays.py turns the engine's per-vertex glTF UVs into Blender's per-loop UVs, without Blender."""
from __future__ import annotations

import numpy as np

from .conftest import ROOT  # noqa: F401  (puts the repo root on sys.path)

from blender_addon.arrays import blender_uvs  # noqa: E402


def test_blender_uvs_are_per_loop_with_v_flipped():
    uvs = np.array([[0.1, 0.2], [0.3, 0.9], [0.5, 0.0]], dtype=np.float32)
    loops = blender_uvs(uvs, np.array([[2, 0, 1]]))
    np.testing.assert_allclose(loops, [[0.5, 1.0], [0.1, 0.8], [0.3, 0.1]], atol=1e-6)
