"""The demo world's vocabulary: shapes, colours, backgrounds, the K concepts and the prompt templates.

A concept is a (shape, colour) pair such as "red triangle". The K concepts of a world are drawn
deterministically from its seed, then sorted by folder name, so that a concept's class index is its
position in the sorted folder names (what an ImageNet-style folder reader assigns).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Shape names; :mod:`core.demo.draw` has one polygon set per name.
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "hexagon", "crescent", "arrow",
          "heart", "diamond")

#: Saturated object colours (RGB), far enough apart that jitter keeps them recognisable.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (235, 215, 35),
    "green": (35, 165, 55),
    "cyan": (35, 195, 215),
    "blue": (35, 70, 215),
    "purple": (135, 55, 195),
    "pink": (240, 115, 185),
}

#: Muted photo backgrounds (RGB); the name appears in some captions ("... on a grey background").
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "white": (232, 232, 226),
    "black": (28, 28, 30),
    "beige": (212, 198, 168),
    "brown": (112, 82, 58),
    "dark grey": (72, 72, 74),
    "wooden": (160, 118, 78),
    "light blue": (176, 194, 210),
}
BACKGROUND_NAMES = tuple(BACKGROUNDS)

#: CLIP-style zero-shot prompt templates ("{}" is the class name).
TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a close-up photo of a {}.",
    "a drawing of a {}.",
    "a sketch of a {}.",
    "a cartoon {}.",
    "a rendition of a {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
)


@dataclass(frozen=True)
class Concept:
    """One class of the world; ``index`` is its position in the sorted folder names."""

    index: int
    shape: str
    colour: str

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def folder(self) -> str:
        return self.name.replace(" ", "_")

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLOURS[self.colour]

    def as_json(self) -> dict[str, object]:
        return {"index": self.index, "folder": self.folder, "name": self.name, "shape": self.shape,
                "colour": self.colour}


def choose_concepts(seed: int, k: int) -> list[Concept]:
    """K distinct (shape, colour) concepts drawn from the seed, in class-index (sorted folder) order.

    Every shape is used before any shape repeats (as far as K allows), so that shapes and colours
    are both shared between classes and a classifier needs both cues.
    """
    n_max = len(SHAPES) * len(COLOURS)
    if not 1 <= k <= n_max:
        raise ValueError(f"k must be in 1..{n_max}, got {k}")
    rng = np.random.default_rng([seed, 0])
    shape_order = [int(s) for s in rng.permutation(len(SHAPES))]
    colour_perm = [int(c) for c in rng.permutation(len(COLOURS))]
    colours = list(COLOURS)
    pairs: list[tuple[str, str]] = []
    # Round r gives the j-th shape the colour colour_perm[(j + 3r) mod 8]; 3 and 8 are coprime, so
    # the 8 rounds visit every (shape, colour) pair exactly once.
    for r in range(len(COLOURS)):
        for j, s in enumerate(shape_order):
            pairs.append((SHAPES[s], colours[colour_perm[(j + 3 * r) % len(colours)]]))
    pairs = pairs[:k]
    pairs.sort(key=lambda p: f"{p[1]}_{p[0]}")
    return [Concept(i, shape, colour) for i, (shape, colour) in enumerate(pairs)]
