"""Captions: GenEval-shaped prompts ("a photo of" dropped) and a dense description.

`prompt_for(scene, tag)` returns (text, metadata) where metadata follows GenEval's
`evaluation_metadata.jsonl`: {'tag', 'include': [{'class', 'count', 'color'?, 'position'?}],
'exclude': [...]} with classes = shapes, so the scorer grades a render against it.
"""
from __future__ import annotations

from collections import Counter


from illume_jax.data.shapecomp import world
from illume_jax.data.shapecomp.scene import Scene, grid_position, object_relations, scene_rng


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("x", "s")) else "s")


def dense_caption(scene: Scene) -> str:
    parts = [f"{_a(o.size)} {o.size} {o.color} {o.shape} at the {grid_position(o, scene.resolution)}"
             if grid_position(o, scene.resolution) != "center" else f"{_a(o.size)} {o.size} {o.color} {o.shape} in the center"
             for o in scene.objects]
    n = len(scene.objects)
    head = "one object" if n == 1 else f"{world.COUNT_WORDS[n]} objects"
    return f"{head}: " + ", ".join(parts) + "."


def available_tags(scene: Scene) -> list[str]:
    """GenEval tags whose prompt can be written truthfully for this scene."""
    lv = world.get_level(scene.level)
    objs = scene.objects
    kinds = Counter((o.color, o.shape) for o in objs)
    shapes = Counter(o.shape for o in objs)
    tags = []
    if len(objs) == 1:
        tags += ["single_object", "colors"]
    if len(objs) == 2 and len(shapes) == 2:
        tags += ["two_object", "color_attr"]
        if object_relations(objs[0], objs[1]):
            tags.append("position")
    if len(kinds) == 1 and 2 <= len(objs) <= 4:
        tags.append("counting")
    return [t for t in tags if t in lv.tasks]


def prompt_for(scene: Scene, tag: str) -> tuple[str, dict]:
    objs = scene.objects
    if tag not in available_tags(scene):
        raise ValueError(f"tag {tag!r} is not available for this scene (available: {available_tags(scene)})")
    if tag == "single_object":
        o = objs[0]
        return f"{_a(o.shape)} {o.shape}", {"tag": tag, "include": [{"class": o.shape, "count": 1}], "exclude": []}
    if tag == "colors":
        o = objs[0]
        return (f"{_a(o.color)} {o.color} {o.shape}",
                {"tag": tag, "include": [{"class": o.shape, "count": 1, "color": o.color}], "exclude": []})
    if tag == "two_object":
        a, b = objs
        return (f"{_a(a.shape)} {a.shape} and {_a(b.shape)} {b.shape}",
                {"tag": tag, "include": [{"class": a.shape, "count": 1}, {"class": b.shape, "count": 1}],
                 "exclude": []})
    if tag == "color_attr":
        a, b = objs
        return (f"{_a(a.color)} {a.color} {a.shape} and {_a(b.color)} {b.color} {b.shape}",
                {"tag": tag, "include": [{"class": a.shape, "count": 1, "color": a.color},
                                         {"class": b.shape, "count": 1, "color": b.color}], "exclude": []})
    if tag == "position":
        a, b = objs
        rel = sorted(object_relations(a, b))[0]
        return (f"{_a(a.color)} {a.color} {a.shape} {rel} {_a(b.color)} {b.color} {b.shape}",
                {"tag": tag, "include": [{"class": b.shape, "count": 1, "color": b.color},
                                         {"class": a.shape, "count": 1, "color": a.color, "position": [rel, 0]}],
                 "exclude": []})
    if tag == "counting":
        o, n = objs[0], len(objs)
        return (f"{world.COUNT_WORDS[n]} {o.color} {plural(o.shape)}",
                {"tag": tag, "include": [{"class": o.shape, "count": n}],
                 "exclude": [{"class": o.shape, "count": n + 1}]})
    raise AssertionError(tag)


def short_caption(scene: Scene) -> str:
    """One GenEval-shaped caption chosen deterministically, or the dense one if none fits."""
    tags = available_tags(scene)
    if not tags:
        return dense_caption(scene)
    rng = scene_rng(scene.level, scene.split, scene.index, salt="caption")
    return prompt_for(scene, tags[int(rng.integers(len(tags)))])[0]

