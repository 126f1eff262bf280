"""ShapeComp vocabulary and difficulty levels (shared/reference/shapecomp.md §4d).

The palette is far apart in RGB and never equal to a background, so the scorer can
segment renders by nearest palette colour.
"""
from __future__ import annotations

import dataclasses

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star", "ring", "hexagon")
COLORS = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 215, 20),
    "purple": (140, 40, 170), "orange": (245, 130, 10), "white": (250, 250, 250), "black": (15, 15, 15),
    # Added from level 3 (GenEval's ten colours).
    "brown": (120, 70, 25), "pink": (245, 130, 190),
}
SIZES = ("small", "medium", "large")
SIZE_RADIUS_64 = {"small": 5, "medium": 8, "large": 12}   # px at 64x64; scaled with resolution
BACKGROUNDS = ((128, 128, 128), (170, 160, 150), (95, 110, 120), (200, 205, 190))
RELATIONS = ("left of", "right of", "above", "below")
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}
SPLITS = ("train", "validation", "test", "compositional")
# CLEVR-CoGenT-style held-out colour-shape pairs: at levels >= 3 they never occur in 'train'
# and occur (at least once per scene) only in 'compositional'.
HELD_OUT_PAIRS = (("red", "star"), ("blue", "hexagon"), ("yellow", "ring"), ("green", "diamond"))


@dataclasses.dataclass(frozen=True)
class Level:
    index: int
    resolution: int
    min_objects: int
    max_objects: int
    shapes: tuple[str, ...]
    colors: tuple[str, ...]
    sizes: tuple[str, ...]
    tasks: tuple[str, ...]
    random_background: bool = False
    rotation: bool = False
    clutter: bool = False


_EIGHT = tuple(list(COLORS)[:8])
LEVELS = (
    Level(0, 64, 1, 1, SHAPES[:4], _EIGHT[:4], ("medium",), ("single_object", "colors")),
    Level(1, 64, 1, 2, SHAPES[:6], _EIGHT[:6], ("small", "large"),
          ("single_object", "colors", "two_object", "position", "color_attr")),
    Level(2, 64, 1, 4, SHAPES, _EIGHT, SIZES,
          ("single_object", "colors", "two_object", "position", "color_attr", "counting")),
    Level(3, 128, 1, 6, SHAPES, tuple(COLORS), SIZES,
          ("single_object", "colors", "two_object", "position", "color_attr", "counting"),
          random_background=True, rotation=True),
    Level(4, 256, 2, 8, SHAPES, tuple(COLORS), SIZES,
          ("single_object", "colors", "two_object", "position", "color_attr", "counting"),
          random_background=True, rotation=True, clutter=True),
)


def get_level(level: int) -> Level:
    if not isinstance(level, int) or not 0 <= level < len(LEVELS):
        raise ValueError(f"level={level!r}: expected an int in 0..{len(LEVELS) - 1}")
    return LEVELS[level]


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {SPLITS}")
    return split


def radius(size: str, resolution: int) -> int:
    return max(2, round(SIZE_RADIUS_64[size] * resolution / 64))
