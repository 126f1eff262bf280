"""Editing pairs (i-CLEVR / GeNeVA style): one operation applied to a scene graph, both
scenes rendered exactly, so instruction following and preservation are measurable."""
from __future__ import annotations

import dataclasses



from illume_jax.data.shapecomp import world
from illume_jax.data.shapecomp.scene import Obj, Scene, _pairs_allowed, make_scene, scene_rng
from illume_jax.data.shapecomp.text import _a

OPS = ("recolor", "add", "remove", "move", "resize", "swap")
BUCKETS = {"top left": (1, 1), "top": (3, 1), "top right": (5, 1), "left": (1, 3), "center": (3, 3),
           "right": (5, 3), "bottom left": (1, 5), "bottom": (3, 5), "bottom right": (5, 5)}


@dataclasses.dataclass(frozen=True)
class EditPair:
    op: str
    instruction: str
    before: Scene
    after: Scene
    # Index (in `after.objects`) of the object the edit created or changed; None for remove.
    edited: int | None
    # Indices in `after.objects` that must be preserved exactly (the untouched objects).
    untouched: tuple[int, ...]


def _fits(objs, res, gap=2) -> bool:
    for i, a in enumerate(objs):
        if not (a.r <= a.cx <= res - a.r and a.r <= a.cy <= res - a.r):
            return False
        for b in objs[i + 1:]:
            if (a.cx - b.cx) ** 2 + (a.cy - b.cy) ** 2 < (a.r + b.r + gap) ** 2:
                return False
    return True


def _try_op(op, scene: Scene, rng) -> EditPair | None:
    lv = world.get_level(scene.level)
    objs = list(scene.objects)
    res = scene.resolution
    k = int(rng.integers(len(objs)))
    o = objs[k]
    others = tuple(i for i in range(len(objs)) if i != k)
    if op == "recolor":
        choices = [c for c in lv.colors if c != o.color and _pairs_allowed(lv, scene.split, o.shape, c)]
        new = choices[int(rng.integers(len(choices)))]
        objs[k] = dataclasses.replace(o, color=new)
        text = f"make the {o.color} {o.shape} {new}"
    elif op == "remove":
        if len(objs) < 2:
            return None
        del objs[k]
        return EditPair(op, f"remove the {o.color} {o.shape}", scene, dataclasses.replace(scene, objects=tuple(objs)),
                        None, tuple(range(len(objs))))
    elif op == "add":
        if len(objs) >= lv.max_objects + 1:
            return None
        shape = lv.shapes[int(rng.integers(len(lv.shapes)))]
        color = lv.colors[int(rng.integers(len(lv.colors)))]
        size = lv.sizes[int(rng.integers(len(lv.sizes)))]
        if not _pairs_allowed(lv, scene.split, shape, color):
            return None
        r = world.radius(size, res)
        x, y = rng.uniform(r + 1, res - r - 1, 2)
        objs.append(Obj(shape, color, size, float(round(x, 1)), float(round(y, 1)), r, 0.0))
        others, k = tuple(range(len(objs) - 1)), len(objs) - 1
        text = f"add {_a(size)} {size} {color} {shape}"
    elif op == "move":
        name = list(BUCKETS)[int(rng.integers(len(BUCKETS)))]
        bx, by = BUCKETS[name]
        objs[k] = dataclasses.replace(o, cx=bx * res / 6, cy=by * res / 6)
        text = f"move the {o.color} {o.shape} to the {name}"
    elif op == "resize":
        i = lv.sizes.index(o.size) if o.size in lv.sizes else 0
        bigger = i + 1 < len(lv.sizes) and (i == 0 or rng.random() < 0.5)
        if not bigger and i == 0:
            return None
        size = lv.sizes[i + 1] if bigger else lv.sizes[i - 1]
        objs[k] = dataclasses.replace(o, size=size, r=world.radius(size, res))
        text = f"make the {o.color} {o.shape} {'bigger' if bigger else 'smaller'}"
    elif op == "swap":
        pairs = [(i, j) for i in range(len(objs)) for j in range(i + 1, len(objs)) if objs[i].color != objs[j].color
                 and objs[i].shape != objs[j].shape]
        if not pairs:
            return None
        i, j = pairs[int(rng.integers(len(pairs)))]
        a, b = objs[i], objs[j]
        if not (_pairs_allowed(lv, scene.split, a.shape, b.color) and _pairs_allowed(lv, scene.split, b.shape, a.color)):
            return None
        objs[i], objs[j] = dataclasses.replace(a, color=b.color), dataclasses.replace(b, color=a.color)
        text = f"swap the colors of the {a.shape} and the {b.shape}"
        k, others = i, tuple(x for x in range(len(objs)) if x not in (i, j))
    else:
        raise ValueError(f"op={op!r}: expected one of {OPS}")
    if not _fits(objs, res):
        return None
    return EditPair(op, text, scene, dataclasses.replace(scene, objects=tuple(objs)), k, others)


def edit_pair(level: int, split: str, index: int, op: str | None = None) -> EditPair:
    """A deterministic editing pair; `op` forces the operation (else one is drawn)."""
    if op is not None and op not in OPS:
        raise ValueError(f"op={op!r}: expected one of {OPS}")
    scene = make_scene(level, split, index)
    rng = scene_rng(level, split, index, salt="edit")
    for _ in range(64):
        pair = _try_op(op or OPS[int(rng.integers(len(OPS)))], scene, rng)
        if pair is not None:
            return pair
    # Recolouring always fits.
    return _try_op("recolor", scene, rng)


