"""blender_addon/arrays.py turns the engine's per-vertex glTF UVs into Blender's per-loop UVs, without Blender."""
from __future__ import annotations

import numpy as np

from .conftest import ROOT  # noqa: F401  (puts the repo root on sys.path)

from blender_addon.arrays import blender_uvs  # noqa: E402


def test_blender_uvs_are_per_loop_with_v_flipped():
    uvs = np.array([[0.1, 0.2], [0.3, 0.9], [0.5, 0.0]], dtype=np.float32)
    loops = blender_uvs(uvs, np.array([[2, 0, 1]]))
    np.testing.assert_allclose(loops, [[0.5, 1.0], [0.1, 0.8], [0.3, 0.1]], atol=1e-6)


def test_resting_vertices_stand_on_the_origin_centred_in_x_and_y():
    from blender_addon.arrays import resting

    v = np.array([[-0.5, -0.2, -0.5], [0.3, 0.4, 0.5], [0.1, 0.0, 0.1]], dtype=np.float32)
    out = resting(v)
    np.testing.assert_allclose(out.min(0), [-0.4, -0.3, 0.0], atol=1e-6)
    np.testing.assert_allclose(out.max(0), [0.4, 0.3, 1.0], atol=1e-6)
    assert resting(np.zeros((0, 3))).shape == (0, 3)


def test_mean_colour_averages_rgb_and_ignores_alpha():
    from blender_addon.arrays import mean_colour

    px = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]], dtype=np.float32)
    assert mean_colour(px.ravel(), 4) == (0.5, 0.0, 0.5, 1.0)
