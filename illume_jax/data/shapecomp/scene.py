"""Scene graphs: a pure function of (level, split, index)."""
from __future__ import annotations

import dataclasses
import zlib

import numpy as np

from illume_jax.data.shapecomp import world


@dataclasses.dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    cx: float        # centre, pixels
    cy: float
    r: int           # radius, pixels
    rotation: float  # radians

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclasses.dataclass(frozen=True)
class Scene:
    level: int
    split: str
    index: int
    resolution: int
    background: tuple[int, int, int]
    objects: tuple[Obj, ...]


def scene_rng(level: int, split: str, index: int, salt: str = "scene") -> np.random.Generator:
    """A generator seeded from the triple (stable across processes, unlike hash())."""
    if not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"index={index!r}: expected a non-negative int")
    key = zlib.crc32(f"{salt}/{level}/{split}".encode())
    return np.random.default_rng([key, int(index)])


def _pairs_allowed(lv: world.Level, split: str, shape: str, color: str) -> bool:
    held = (color, shape) in world.HELD_OUT_PAIRS
    return not (held and split != "compositional" and lv.index >= 3)


def _place(rng, res: int, radii: list[int], gap: int = 2, tries: int = 200) -> list[tuple[float, float]] | None:
    centres: list[tuple[float, float]] = []
    for r in radii:
        for _ in range(tries):
            cx, cy = rng.uniform(r + 1, res - r - 1, size=2)
            if all((cx - x) ** 2 + (cy - y) ** 2 >= (r + rr + gap) ** 2 for (x, y), rr in zip(centres, radii)):
                centres.append((float(round(cx, 1)), float(round(cy, 1))))
                break
        else:
            return None
    return centres


def make_scene(level: int, split: str, index: int) -> Scene:
    lv = world.get_level(level)
    world.check_split(split)
    rng = scene_rng(level, split, index)
    res = lv.resolution
    background = world.BACKGROUNDS[int(rng.integers(len(world.BACKGROUNDS)))] if lv.random_background \
        else world.BACKGROUNDS[0]
    for _attempt in range(100):
        n = int(rng.integers(lv.min_objects, lv.max_objects + 1))
        kinds: list[tuple[str, str]] = []
        if split == "compositional":
            held = [p for p in world.HELD_OUT_PAIRS if p[0] in lv.colors and p[1] in lv.shapes]
            if held:
                kinds.append(tuple(held[int(rng.integers(len(held)))]))
        while len(kinds) < n:
            if kinds and lv.index >= 2 and rng.random() < 0.35:   # repeats make counting prompts
                kinds.append(kinds[int(rng.integers(len(kinds)))])
                continue
            color = lv.colors[int(rng.integers(len(lv.colors)))]
            shape = lv.shapes[int(rng.integers(len(lv.shapes)))]
            if _pairs_allowed(lv, split, shape, color) and (color, shape) not in kinds:
                kinds.append((color, shape))
        sizes = [lv.sizes[int(rng.integers(len(lv.sizes)))] for _ in kinds]
        radii = [world.radius(s, res) for s in sizes]
        # Clear margins between objects (GenEval's position rule needs separable boxes).
        centres = _place(rng, res, radii, gap=max(2, res // 16) if n <= 2 else 2)
        if centres is None:
            continue
        # Small rotations only: a square turned by 45 degrees would be a diamond, and the
        # scorer must be able to tell every shape apart from pixels alone.
        rotations = rng.uniform(-0.35, 0.35, len(kinds)) if lv.rotation else np.zeros(len(kinds))
        objects = tuple(Obj(shape=s, color=c, size=z, cx=x, cy=y, r=r, rotation=float(round(a, 3)))
                        for (c, s), z, (x, y), r, a in zip(kinds, sizes, centres, radii, rotations))
        return Scene(level=level, split=split, index=int(index), resolution=res, background=background,
                     objects=objects)
    raise RuntimeError(f"could not place objects for level {level} {split} {index}")  # never seen in practice


def scaled(scene: Scene, factor: int) -> Scene:
    """The same scene at `factor` times the resolution (centres and radii scaled; rendering
    stays exact), e.g. the 2x targets of a super-resolving diffusion decoder."""
    if not isinstance(factor, (int, np.integer)) or factor < 1:
        raise ValueError(f"factor={factor!r}: expected a positive int")
    objs = tuple(dataclasses.replace(o, cx=o.cx * factor, cy=o.cy * factor, r=o.r * factor) for o in scene.objects)
    return dataclasses.replace(scene, resolution=scene.resolution * factor, objects=objs)


def shape_twins(scene: Scene, k: int) -> list[Scene]:
    """`k` different twins of the scene, each with one object's shape changed and everything else
    (colours, sizes, places, rotations, background) kept: negatives that only shape can tell
    apart. Objects take turns in an order drawn from the scene's (level, split, index), so the
    twins are a pure function of it; each new (colour, shape) kind is allowed in the split and not
    already in the scene, so every twin's description differs from the original's in exactly one
    shape word, and no two twins are the same."""
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k={k!r}: expected a positive int")
    lv = world.get_level(scene.level)
    rng = scene_rng(scene.level, scene.split, scene.index, salt="twin")
    kinds = {(o.color, o.shape) for o in scene.objects}
    used: set[tuple[int, str]] = set()
    twins: list[Scene] = []
    order = [int(i) for i in rng.permutation(len(scene.objects))]
    while len(twins) < k:
        progress = False
        for i in order:
            obj = scene.objects[i]
            options = [s for s in lv.shapes if (i, s) not in used and (obj.color, s) not in kinds
                       and _pairs_allowed(lv, scene.split, s, obj.color)]
            if not options:
                continue
            shape = options[int(rng.integers(len(options)))]
            used.add((i, shape))
            twins.append(dataclasses.replace(scene, objects=scene.objects[:i]
                                             + (dataclasses.replace(obj, shape=shape),) + scene.objects[i + 1:]))
            progress = True
            if len(twins) == k:
                break
        if not progress:
            raise ValueError(f"scene level {scene.level} {scene.split} {scene.index}: only {len(twins)} "
                             f"shape twins exist, {k} asked")
    return twins


def shape_twin(scene: Scene) -> Scene:
    """The first of `shape_twins(scene, k)` (the same for every k)."""
    return shape_twins(scene, 1)[0]


POSITION_THRESHOLD = 0.1   # GenEval's shrink factor on the summed box extents


def relations_between(center_a, dim_a, center_b, dim_b) -> set[str]:
    """GenEval's rule for "A is <rel> B" from box centres and extents (x, y)."""
    center_a, center_b = np.asarray(center_a, float), np.asarray(center_b, float)
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (np.asarray(dim_a) + np.asarray(dim_b)), 0)
    revised = revised * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    out = set()
    if dx < -0.5:
        out.add("left of")
    if dx > 0.5:
        out.add("right of")
    if dy < -0.5:
        out.add("above")
    if dy > 0.5:
        out.add("below")
    return out


def object_relations(a: Obj, b: Obj) -> set[str]:
    return relations_between((a.cx, a.cy), (2 * a.r, 2 * a.r), (b.cx, b.cy), (2 * b.r, 2 * b.r))


def grid_position(obj: Obj, resolution: int) -> str:
    """3x3 bucket of the object's centre ('top left' ... 'center' ... 'bottom right')."""
    col = min(int(obj.cx * 3 / resolution), 2)
    row = min(int(obj.cy * 3 / resolution), 2)
    names = [["top left", "top", "top right"], ["left", "center", "right"], ["bottom left", "bottom", "bottom right"]]
    return names[row][col]
