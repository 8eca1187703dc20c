"""The bundled prior's vocabulary and prompt parsing.

A prompt names at most one colour and one shape ("a red cube", "red cube",
"a cube, red"); articles and a few filler words are ignored. Any other word
raises :class:`UnknownPromptError`, whose message lists every known word.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.10, 0.10),
    "green": (0.12, 0.70, 0.16),
    "blue": (0.10, 0.25, 0.90),
    "yellow": (0.95, 0.85, 0.10),
    "orange": (0.95, 0.50, 0.05),
    "purple": (0.55, 0.15, 0.75),
    "white": (0.92, 0.92, 0.92),
    "black": (0.07, 0.07, 0.07),
}
"""Colour word -> albedo (linear RGB in [0, 1]) used by the procedural renderer."""

PRIMITIVES: tuple[str, ...] = ("cube", "sphere", "cylinder", "cone", "torus", "pyramid")
"""Single-primitive shape words."""

COMPOSITES: tuple[str, ...] = ("mushroom", "snowman", "table", "lamp", "tree")
"""Multi-part shape words (built from primitives)."""

SHAPES: tuple[str, ...] = PRIMITIVES + COMPOSITES
"""Every shape word, in the order of the model's shape embedding."""

COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
"""Every colour word, in the order of the model's colour embedding."""

FILLER: tuple[str, ...] = ("a", "an", "the", "of", "one", "single", "object", "shaped", "coloured", "colored")
"""Words that carry no meaning for the model and are skipped."""

SYNONYMS: dict[str, str] = {
    "box": "cube", "ball": "sphere", "ring": "torus", "donut": "torus", "doughnut": "torus",
    "grey": "white", "gray": "white", "violet": "purple",
}
"""Accepted alternative spellings -> canonical word."""
# Plurals are not accepted: the model draws exactly one object.


class UnknownPromptError(ValueError):
    """A prompt uses words the bundled model does not know."""


@dataclass(frozen=True)
class Caption:
    """A parsed prompt: an optional colour and an optional shape."""

    color: str | None
    """Colour word, or None when the prompt names none."""
    shape: str | None
    """Shape word, or None when the prompt names none."""

    @property
    def text(self) -> str:
        """Canonical prompt text, e.g. "a red cube", "an orange table"."""
        words = [w for w in (self.color, self.shape) if w]
        if not words:
            return ""
        return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)

    @property
    def color_index(self) -> int:
        """Index in COLOR_NAMES, or -1 when absent."""
        return COLOR_NAMES.index(self.color) if self.color else -1

    @property
    def shape_index(self) -> int:
        """Index in SHAPES, or -1 when absent."""
        return SHAPES.index(self.shape) if self.shape else -1


def vocabulary() -> dict[str, list[str]]:
    """The words the model knows, by role."""
    return {
        "colors": list(COLOR_NAMES),
        "shapes": list(SHAPES),
        "ignored": list(FILLER),
        "synonyms": [f"{k}={v}" for k, v in SYNONYMS.items()],
    }


def _known_words() -> str:
    return (
        f"colours: {', '.join(COLOR_NAMES)}; shapes: {', '.join(SHAPES)}; "
        f"ignored: {', '.join(FILLER)}; synonyms: {', '.join(f'{k}={v}' for k, v in SYNONYMS.items())}"
    )


def parse_prompt(text: str) -> Caption:
    """Parse a prompt into a :class:`Caption`; raise UnknownPromptError on unknown words."""
    if not isinstance(text, str):
        raise UnknownPromptError(f"prompt must be a string, got {type(text).__name__}")
    words = [w for w in re.split(r"[\s,.;:!?\-]+", text.lower()) if w]
    color = shape = None
    unknown: list[str] = []
    for word in words:
        word = SYNONYMS.get(word, word)
        if word in FILLER:
            continue
        if word in COLORS:
            if color is not None and color != word:
                raise UnknownPromptError(f"prompt {text!r} names two colours ({color}, {word}); the model knows one colour per object")
            color = word
        elif word in SHAPES:
            if shape is not None and shape != word:
                raise UnknownPromptError(f"prompt {text!r} names two shapes ({shape}, {word}); the model draws one object")
            shape = word
        else:
            unknown.append(word)
    if unknown:
        raise UnknownPromptError(
            f"prompt {text!r} uses words the bundled model does not know: {', '.join(unknown)}. Known words: {_known_words()}"
        )
    return Caption(color=color, shape=shape)


def all_captions() -> list[Caption]:
    """Every (colour, shape) pair the training data covers, shape-major."""
    return [Caption(color=c, shape=s) for s in SHAPES for c in COLOR_NAMES]
