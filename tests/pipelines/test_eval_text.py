"""The text-to-3D evaluation's measures on the procedural ground truth's own meshes (fast, no pipeline run).

A perfect object must score as one: the ground-truth mesh of a caption, coloured with the
caption's albedo, overlaps the sphere-traced truth at every held-out camera, reads as its colour,
has no background hue and the genus :data:`GENUS` gives; a mesh painted with the background's
cyan, or a ball for a torus, must fail the measure that catches it.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine_server.cli import main
from engine_server.models.bundled import procedural as P
from engine_server.models.bundled.vocab import COLORS, SHAPES, Caption
from engine_server.pipelines.evaluate_text import (
    DEFAULT_COLORS,
    GENUS,
    TextEvalConfig,
    background_hue_share,
    ground_truth_mesh,
    format_table,
    passes,
    score_mesh,
    summarise,
    write_card,
)
from engine_server.pipelines.quality import genus
from engine_server.pipelines.text_to_3d import close_tunnels


def _painted(vertices: np.ndarray, rgb) -> tuple[np.ndarray, np.ndarray]:
    """UVs (V, 2) and a 4x4 texture of one colour (albedo in [0, 1])."""
    texture = np.empty((4, 4, 3), dtype=np.uint8)
    texture[:] = np.round(np.asarray(rgb) * 255).astype(np.uint8)
    return np.full((len(vertices), 2), 0.5, dtype=np.float32), texture


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.mark.parametrize("shape", ["torus", "sphere", "cube", "snowman", "mushroom", "table"])
def test_ground_truth_meshes_have_the_genus_of_their_shape(shape):
    v, f = ground_truth_mesh(shape)
    assert genus(v, f) == GENUS[shape] == (1 if shape == "torus" else 0)


def test_genus_counts_boundary_loops_and_merges_uv_seams():
    v, f = ground_truth_mesh("torus", 32)
    # Split every vertex into one copy per face corner (as UV seams do): still one torus.
    split_v, split_f = v[f].reshape(-1, 3), np.arange(3 * len(f)).reshape(-1, 3)
    assert genus(split_v, split_f) == 1
    # A sphere with a face removed is a disc (boundary loop 1, genus 0), not a "genus 1/2" surface.
    s_v, s_f = ground_truth_mesh("sphere", 32)
    assert genus(s_v, s_f[1:]) == 0


@pytest.mark.parametrize("shape", SHAPES)
def test_a_ground_truth_mesh_scores_as_a_perfect_object(shape):
    color = DEFAULT_COLORS[shape]
    v, f = ground_truth_mesh(shape)
    uvs, texture = _painted(v, COLORS[color])
    row = score_mesh(v, f, uvs, texture, Caption(color, shape))
    # Marching tetrahedra at 64 cubes over [-1, 1]^3 round thin parts (the table's legs) by a pixel.
    assert row["iou"] > (0.88 if shape == "table" else 0.94), row
    assert row["colour_ok"] and row["genus_ok"] and row["bg_hue"] == 0.0, row
    assert passes(row)


def test_a_wrong_object_fails_the_measure_that_catches_it():
    ball_v, ball_f = ground_truth_mesh("sphere")
    uvs, texture = _painted(ball_v, COLORS["yellow"])
    as_torus = score_mesh(ball_v, ball_f, uvs, texture, Caption("yellow", "torus"))
    assert not as_torus["genus_ok"] and as_torus["iou"] < 0.8 and not passes(as_torus), as_torus

    uvs, cyan = _painted(ball_v, P.BACKGROUND_RGB)
    leaked = score_mesh(ball_v, ball_f, uvs, cyan, Caption("white", "sphere"))
    assert leaked["bg_hue"] == 1.0 and not leaked["colour_ok"] and not passes(leaked), leaked


def test_background_hue_share_is_the_share_of_the_area():
    # Two squares side by side, the left one three times the area; the texture's left half cyan.
    v = np.array([[0, 0, 0], [3, 0, 0], [3, 1, 0], [0, 1, 0], [3, 0, 0], [4, 0, 0], [4, 1, 0], [3, 1, 0]], float)
    f = np.array([[0, 1, 2], [0, 2, 3], [4, 5, 6], [4, 6, 7]])
    uvs = np.array([[0.1, 0.5]] * 4 + [[0.9, 0.5]] * 4, dtype=np.float32)
    texture = np.zeros((8, 8, 3), dtype=np.uint8)
    texture[:, :4] = np.round(np.asarray(P.BACKGROUND_RGB) * 255)
    texture[:, 4:] = np.round(np.asarray(COLORS["green"]) * 255)  # the nearest vocabulary hue is not background
    assert background_hue_share(v, f, uvs, texture) == pytest.approx(0.75, abs=0.02)
    texture[:, :4] = np.round(np.asarray(COLORS["white"]) * 255)  # white and black carry no hue
    assert background_hue_share(v, f, uvs, texture) == 0.0


def test_config_refuses_unknown_words_and_defaults_to_one_colour_per_shape():
    assert [c.text for c in TextEvalConfig(shapes=("torus", "table")).captions()] == ["a yellow torus", "an orange table"]
    assert len(TextEvalConfig(shapes=("cube",), colors=("red", "blue")).captions()) == 2
    assert set(DEFAULT_COLORS) == set(SHAPES) and set(DEFAULT_COLORS.values()) == set(COLORS)
    with pytest.raises(ValueError, match="unknown shape.*donut"):
        TextEvalConfig(shapes=("donut",))
    with pytest.raises(ValueError, match="unknown colour.*pink"):
        TextEvalConfig(colors=("pink",))


def test_cli_refuses_bad_words_before_any_work(capsys):
    assert main(["eval-text-to-3d", "--shapes", "cube,bogus"]) == 2
    assert "unknown shape(s) bogus" in capsys.readouterr().err
    assert main(["eval-text-to-3d", "--steps", "0"]) == 2
    assert "coarse_steps must be >= 1" in capsys.readouterr().err


def test_tables_and_card_from_scored_rows(tmp_path):
    rows = []
    for shape, seed in (("torus", 0), ("torus", 1), ("sphere", 0)):
        color = DEFAULT_COLORS[shape]
        v, f = ground_truth_mesh(shape, 48)
        uvs, texture = _painted(v, COLORS[color] if seed == 0 else P.BACKGROUND_RGB)  # seed 1 leaks
        row = {"prompt": Caption(color, shape).text, "shape": shape, "seed": seed,
               **score_mesh(v, f, uvs, texture, Caption(color, shape)), "seconds": 1.0}
        rows.append(row | {"pass": passes(row)})
    result = summarise(rows, TextEvalConfig(shapes=("torus", "sphere"), seeds=2), 3.0)
    torus, sphere = result["per_shape"]
    assert (torus["runs"], torus["bg_hue_max"], torus["pass"], torus["genus"]) == (2, 1.0, False, "1/1")
    assert sphere["pass"] and not result["passed"]
    assert "NOT PASSED" in format_table(result)
    card = write_card(result, tmp_path).read_text()
    assert "| torus | 2 |" in card and "a yellow torus" in card and "NOT PASSED" in card


def _extract_genus(sdf, resolution: int = 48, close: bool = False) -> int:
    from engine_server.geometry import marching_tets, tet_grid

    verts, tets = tet_grid(resolution)
    density = torch.exp(-20.0 * sdf(verts))  # a field-like density: 1 on the surface, rising inside
    if close:
        density = close_tunnels(density, 1.0, resolution)
    v, f = marching_tets(verts, tets, 1.0 - density)
    return genus(v.numpy(), f.numpy())


def test_close_tunnels_removes_thin_handles_and_keeps_a_torus_hole():
    ball = P.shape_sdf("sphere")

    def drilled(p):  # a ball with a tunnel 0.06 wide (one and a half cells of the draft's grid) through it
        return torch.maximum(ball(p), 0.03 - p[:, :2].norm(dim=-1))

    assert _extract_genus(drilled) == 1
    assert _extract_genus(drilled, close=True) == 0
    assert _extract_genus(P.shape_sdf("torus"), close=True) == 1
