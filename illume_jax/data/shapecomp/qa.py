"""Understanding questions from the scene graph: POPE-style existence probes plus counting,
colour, relation and size questions, all with single-word answers.

POPE (RUCAIBox/POPE): per image, present objects are asked about as often as absent ones;
negatives are drawn three ways — random, popular (the most frequent objects of the level)
and adversarial (objects that co-occur with the present ones: here the same shape in a
colour that is not there, or a present colour on an absent shape).
"""
from __future__ import annotations

import functools
from collections import Counter

from illume_jax.data.shapecomp import world
from illume_jax.data.shapecomp.scene import Scene, make_scene, object_relations, scene_rng
from illume_jax.data.shapecomp.text import _a, plural

POPE_SPLITS = ("random", "popular", "adversarial")
# What an existence question's object shares with the scene (`existence_kind`): an absent object
# whose shape and colour are both there, on different objects, can only be answered by binding
# the two; one that shares only its colour (or only its shape) by checking the other attribute.
EXISTENCE_KINDS = ("present", "absent_shape_and_color_present", "absent_shape_present", "absent_color_present",
                   "absent_unrelated")


@functools.lru_cache(maxsize=None)
def popular_objects(level: int) -> tuple[str, ...]:
    """'colour shape' names by frequency over 300 train scenes of the level (POPE's popular set)."""
    counts = Counter(o.name for i in range(300) for o in make_scene(level, "train", i).objects)
    return tuple(name for name, _ in counts.most_common())


def existence_kind(scene: Scene, name: str) -> str:
    """Which of EXISTENCE_KINDS the object 'colour shape' is in `scene`."""
    color, shape = name.split(" ", 1)
    if any(o.name == name for o in scene.objects):
        return "present"
    has_shape, has_color = (any(o.shape == shape for o in scene.objects),
                            any(o.color == color for o in scene.objects))
    return ("absent_shape_and_color_present" if has_shape and has_color else "absent_shape_present" if has_shape
            else "absent_color_present" if has_color else "absent_unrelated")


def existence_questions(scene: Scene, negative: str, n: int = 3) -> list[dict]:
    """n present + n absent 'Is there a ... in the image?' questions (fewer if the scene has
    fewer distinct present objects; always balanced). Each names its `object` and what that object
    shares with the scene (`asks`, one of EXISTENCE_KINDS)."""
    if negative not in POPE_SPLITS:
        raise ValueError(f"negative={negative!r}: expected one of {POPE_SPLITS}")
    lv = world.get_level(scene.level)
    rng = scene_rng(scene.level, scene.split, scene.index, salt=f"pope-{negative}")
    present = sorted({o.name for o in scene.objects})
    all_names = [f"{c} {s}" for c in lv.colors for s in lv.shapes]
    absent = [x for x in all_names if x not in present]
    if negative == "random":
        pool = list(rng.permutation(absent))
    elif negative == "popular":
        pool = [x for x in popular_objects(scene.level) if x in absent] + list(rng.permutation(absent))
    else:
        near = [x for x in absent if existence_kind(scene, x) != "absent_unrelated"]
        pool = list(rng.permutation(near)) + list(rng.permutation(absent))
    negatives = list(dict.fromkeys(pool))
    k = min(n, len(present))
    positives = [present[i] for i in rng.permutation(len(present))[:k]]
    return [dict(question=f"Is there {_a(x)} {x} in the image?", answer="yes" if x in present else "no",
                 kind="existence", negative=negative, object=str(x), asks=existence_kind(scene, x))
            for x in positives + negatives[:k]]


def attribute_questions(scene: Scene, lookups: bool = False) -> list[dict]:
    """Counting, colour, relation (one true, one false) and size questions.

    lookups=True asks, in place of one colour question, the colour of every uniquely shaped object and
    the shape of every uniquely coloured one: answers that need the object found by one attribute and
    the other read off it, the binding POPE's adversarial negatives test (descriptions name the colour
    right before the shape, so copying them never needs it). The README's "A long, slow scene_text"
    measures what it does (and why four lookups in one record give all but the first away)."""
    rng = scene_rng(scene.level, scene.split, scene.index, salt="attr-qa")
    objs = scene.objects
    shapes = Counter(o.shape for o in objs)
    out = []
    shape = sorted(shapes)[int(rng.integers(len(shapes)))]
    out.append(dict(question=f"How many {plural(shape)} are there?", answer=world.COUNT_WORDS[shapes[shape]],
                    kind="counting"))
    unique = [o for o in objs if shapes[o.shape] == 1]
    if lookups:
        colors = Counter(o.color for o in objs)
        out += [dict(question=f"What color is the {o.shape}?", answer=o.color, kind="color") for o in unique]
        out += [dict(question=f"What shape is the {o.color} object?", answer=o.shape, kind="shape")
                for o in objs if colors[o.color] == 1]
    elif unique:
        o = unique[int(rng.integers(len(unique)))]
        out.append(dict(question=f"What color is the {o.shape}?", answer=o.color, kind="color"))
    if len(unique) >= 2:
        a, b = unique[0], unique[1]
        rels = object_relations(a, b)
        if rels:
            true_rel = sorted(rels)[0]
            false_rel = next(r for r in world.RELATIONS if r not in rels)
            out.append(dict(question=f"Is the {a.shape} {true_rel} the {b.shape}?", answer="yes", kind="relation"))
            out.append(dict(question=f"Is the {a.shape} {false_rel} the {b.shape}?", answer="no", kind="relation"))
        if a.r != b.r:
            out.append(dict(question=f"Is the {a.shape} bigger than the {b.shape}?",
                            answer="yes" if a.r > b.r else "no", kind="size"))
    return out


QA_NEGATIVES = ("mixed",) + POPE_SPLITS


def questions(scene: Scene, negatives: str = "mixed", lookups: bool = False) -> list[dict]:
    """All questions for a scene (the training QA): existence + attributes.

    negatives="mixed" (the default): each scene's existence negatives are drawn one of the three POPE
    ways, picked per scene, as the ShapeComp spec's understanding data says. Random negatives alone
    almost never name a present shape in an absent colour, so a model trained on them can answer by
    shape or colour alone and never has to bind the two, which is what the adversarial split asks.
    One of POPE_SPLITS draws every scene's negatives that way (the README's ablation uses "random",
    the data before 2026-12-05). lookups: see `attribute_questions`."""
    if negatives not in QA_NEGATIVES:
        raise ValueError(f"qa negatives={negatives!r}: expected one of {QA_NEGATIVES}")
    if negatives == "mixed":
        rng = scene_rng(scene.level, scene.split, scene.index, salt="qa-negatives")
        negatives = POPE_SPLITS[int(rng.integers(len(POPE_SPLITS)))]
    return existence_questions(scene, negatives) + attribute_questions(scene, lookups)
