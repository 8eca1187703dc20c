"""Prompt parsing of the bundled prior."""
from __future__ import annotations

import pytest

from engine_server.models.bundled.vocab import COLOR_NAMES, SHAPES, Caption, UnknownPromptError, parse_prompt


@pytest.mark.parametrize("text", ["a red cube", "red cube", "a cube, red", "The RED cube.", "a red box"])
def test_equivalent_phrasings_parse_to_the_same_caption(text):
    assert parse_prompt(text) == Caption(color="red", shape="cube")


def test_partial_prompts_leave_the_missing_word_empty():
    assert parse_prompt("a torus") == Caption(color=None, shape="torus")
    assert parse_prompt("purple") == Caption(color="purple", shape=None)
    assert parse_prompt("") == Caption(color=None, shape=None)


def test_unknown_words_raise_a_value_error_listing_the_vocabulary():
    with pytest.raises(UnknownPromptError) as info:
        parse_prompt("a shiny red dragon")
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "shiny" in msg and "dragon" in msg
    for word in (*COLOR_NAMES, *SHAPES):
        assert word in msg


def test_two_colours_or_two_shapes_are_refused():
    with pytest.raises(UnknownPromptError, match="two colours"):
        parse_prompt("a red blue cube")
    with pytest.raises(UnknownPromptError, match="two shapes"):
        parse_prompt("a cube sphere")


def test_canonical_text_round_trips():
    for shape in SHAPES:
        for color in COLOR_NAMES:
            cap = Caption(color=color, shape=shape)
            assert parse_prompt(cap.text) == cap


def test_canonical_text_takes_an_before_a_vowel():
    assert Caption(color="orange", shape="table").text == "an orange table"
    assert Caption(color="red", shape="table").text == "a red table"
    assert Caption(color=None, shape="torus").text == "a torus"
