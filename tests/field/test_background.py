"""How much a colour is the plain background's: the test the coarse stage carves background-coloured matter by."""
from __future__ import annotations

import torch

from engine_server.field import background_likeness
from engine_server.models.bundled.procedural import BACKGROUND_RGB
from engine_server.models.bundled.vocab import COLORS


def test_the_background_itself_scores_one_and_every_colour_word_about_zero():
    assert float(background_likeness(torch.tensor(BACKGROUND_RGB), BACKGROUND_RGB)) == 1.0
    words = torch.tensor(list(COLORS.values()))
    assert float(background_likeness(words, BACKGROUND_RGB).max()) < 0.01  # blue, the nearest, 0.002


def test_likeness_falls_with_the_distance_from_the_background():
    bg = torch.tensor(BACKGROUND_RGB)
    toward_red = torch.stack([bg + s * (torch.tensor([0.85, 0.10, 0.10]) - bg) for s in torch.linspace(0, 1, 11)])
    like = background_likeness(toward_red, bg)
    assert (like[1:] < like[:-1]).all() and like.shape == (11,)
