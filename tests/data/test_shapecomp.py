"""ShapeComp: determinism, level ranges, splits, records, bad arguments."""
import dataclasses
from collections import Counter

import numpy as np
import pytest

from illume_jax.data import shapecomp as sc
from illume_jax.data.shapecomp import world


def test_samples_are_pure_functions_of_level_split_index():
    for level in range(5):
        a, b = sc.make_scene(level, "train", 7), sc.make_scene(level, "train", 7)
        assert a == b
        np.testing.assert_array_equal(sc.render(a), sc.render(b))
        assert sc.conversation_records(level, "train", 7) == sc.conversation_records(level, "train", 7)
    assert sc.make_scene(2, "train", 1) != sc.make_scene(2, "train", 2)
    assert sc.make_scene(2, "train", 1) != sc.make_scene(2, "validation", 1)


@pytest.mark.parametrize("level", range(5))
def test_level_ranges(level):
    lv = world.get_level(level)
    counts = set()
    for i in range(60):
        s = sc.make_scene(level, "train", i)
        img = sc.render(s)
        assert img.shape == (lv.resolution, lv.resolution, 3) and img.dtype == np.uint8
        assert lv.min_objects <= len(s.objects) <= lv.max_objects
        counts.add(len(s.objects))
        for o in s.objects:
            assert o.shape in lv.shapes and o.color in lv.colors and o.size in lv.sizes
            # No anti-aliasing: every object pixel has its exact palette colour.
            mask = sc.object_mask(o, lv.resolution)
            assert mask.any()
        for a in range(len(s.objects)):  # non-overlapping (>= 2 px gap between bounding circles)
            for b in range(a + 1, len(s.objects)):
                oa, ob = s.objects[a], s.objects[b]
                assert np.hypot(oa.cx - ob.cx, oa.cy - ob.cy) >= oa.r + ob.r + 2
    assert len(counts) == lv.max_objects - lv.min_objects + 1  # every count occurs


def test_compositional_pairs_held_out_of_train_at_level_3():
    held = set(world.HELD_OUT_PAIRS)
    for i in range(200):
        assert not {(o.color, o.shape) for o in sc.make_scene(3, "train", i).objects} & held
    for i in range(50):
        assert {(o.color, o.shape) for o in sc.make_scene(3, "compositional", i).objects} & held


def test_pope_questions_balanced_per_split_and_truthful():
    for negative in sc.POPE_SPLITS:
        yes = no = 0
        for i in range(100):
            s = sc.make_scene(2, "test", i)
            present = {o.name for o in s.objects}
            for q in sc.existence_questions(s, negative):
                name = q["question"].split(" ", 3)[3].rsplit(" in the image", 1)[0]
                assert (name in present) == (q["answer"] == "yes"), q
                yes += q["answer"] == "yes"
                no += q["answer"] == "no"
        assert yes == no > 0


def test_existence_questions_say_what_the_asked_object_shares_with_the_scene():
    """`asks` (read by the POPE suite's per-kind accuracy): present, or absent with its shape and/or
    colour on other objects. The adversarial split asks only about absent objects that share one."""
    seen = {negative: Counter() for negative in sc.POPE_SPLITS}
    for negative in sc.POPE_SPLITS:
        for i in range(100):
            s = sc.make_scene(1, "test", i)
            for q in sc.existence_questions(s, negative):
                assert type(q["object"]) is str
                color, shape = q["object"].split(" ")
                assert q["question"] == f"Is there {'an' if color[0] in 'aeiou' else 'a'} {q['object']} in the image?"
                same_shape = any(o.shape == shape for o in s.objects)
                same_color = any(o.color == color for o in s.objects)
                if q["answer"] == "yes":
                    assert q["asks"] == "present"
                else:
                    assert q["asks"] == {(True, True): "absent_shape_and_color_present",
                                         (True, False): "absent_shape_present",
                                         (False, True): "absent_color_present",
                                         (False, False): "absent_unrelated"}[same_shape, same_color], (q, s)
                seen[negative][q["asks"]] += 1
    assert set(seen["adversarial"]) <= set(sc.EXISTENCE_KINDS) - {"absent_unrelated"}
    assert seen["adversarial"]["absent_color_present"] > 0 and seen["adversarial"]["absent_shape_present"] > 0
    assert seen["random"]["absent_unrelated"] > seen["random"]["absent_color_present"]
    assert sc.existence_kind(s, s.objects[0].name) == "present"


def test_captions_and_relations_follow_the_scene():
    for i in range(100):
        s = sc.make_scene(1, "train", i)
        for tag in sc.available_tags(s):
            text, meta = sc.prompt_for(s, tag)
            assert meta["tag"] == tag and all(c["class"] in text for c in meta["include"])
            if tag == "position":
                a, b = s.objects
                assert meta["include"][1]["position"][0] in sc.object_relations(a, b)


def test_shape_twins_change_one_shape_and_nothing_else():
    held = set(world.HELD_OUT_PAIRS)
    for level in range(4):
        for split in ("train", "compositional"):
            for i in range(60):
                scene = sc.make_scene(level, split, i)
                twins = sc.shape_twins(scene, 3)
                assert twins == sc.shape_twins(scene, 3) and len(set(twins)) == 3  # pure, and all different
                assert twins[0] == sc.shape_twin(scene) and twins[:2] == sc.shape_twins(scene, 2)
                for twin in twins:
                    _check_one_shape_changed(scene, twin, held)
    with pytest.raises(ValueError, match="only 3 shape twins exist, 4 asked"):
        sc.shape_twins(sc.make_scene(0, "train", 0), 4)   # one object, 4 shapes
    with pytest.raises(ValueError, match="k=0"):
        sc.shape_twins(sc.make_scene(0, "train", 0), 0)


def _check_one_shape_changed(scene, twin, held):
    changed = [k for k, (a, b) in enumerate(zip(scene.objects, twin.objects)) if a != b]
    assert len(changed) == 1
    a, b = scene.objects[changed[0]], twin.objects[changed[0]]
    assert a.shape != b.shape and b.shape in world.get_level(scene.level).shapes
    assert dataclasses.replace(b, shape=a.shape) == a and twin.background == scene.background
    # A kind new to the scene, and never a held-out pair outside the compositional split.
    assert (b.color, b.shape) not in {(o.color, o.shape) for o in scene.objects}
    if scene.split == "train" and scene.level >= 3:
        assert (b.color, b.shape) not in held
    # The dense captions differ in exactly that one word, and so do the pictures.
    old, new = sc.dense_caption(scene).split(), sc.dense_caption(twin).split()
    assert len(old) == len(new) and [(x, y) for x, y in zip(old, new) if x != y] == [(a.shape, b.shape)]
    assert (sc.render(scene) != sc.render(twin)).any()


def test_edit_pairs_change_exactly_one_thing():
    for op in sc.OPS:
        for i in range(20):
            p = sc.edit_pair(2, "train", i, op)
            if p.op != op:
                continue
            assert p.before != p.after
            for k in p.untouched:
                assert p.after.objects[k] in p.before.objects


def test_records_schema():
    recs = sc.conversation_records(1, "train", 3)
    assert [r["task"] for r in recs] == list(sc.TASKS)
    for r in recs:
        assert set(r) == {"id", "task", "level", "images", "conversations", "context"}
        assert r["images"][0][:8] == b"\x89PNG\r\n\x1a\n"
        assert r["conversations"][0]["from"] == "human" and r["conversations"][1]["from"] == "gpt"
    assert len(recs[3]["images"]) == 2 and "{resolution_tag}" in recs[2]["conversations"][0]["value"]


@pytest.mark.parametrize("call,match", [
    (lambda: sc.make_scene(9, "train", 0), "level=9"),
    (lambda: sc.make_scene(0, "dev", 0), "split='dev'"),
    (lambda: sc.make_scene(0, "train", -1), "index=-1"),
    (lambda: sc.conversation_records(0, "train", 0, tasks=("vqa",)), "'vqa'"),
    (lambda: sc.edit_pair(0, "train", 0, op="rotate"), "op='rotate'"),
])
def test_bad_arguments_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_qa_turn_order_does_not_give_the_answer_away():
    """QA records list their questions in a per-scene random order: in the generator's order every
    record opened with a present object ("yes"), and a model asked one POPE-style question learned
    to answer "yes" blind. Now a first existence question is "yes" about half the time."""
    from illume_jax.data.shapecomp import records
    first = []
    for i in range(400):
        turns = records.conversation_records(1, "train", i, tasks=("qa",))[0]["conversations"]
        if turns[0]["value"].startswith("<image>\nIs there"):
            first.append(turns[1]["value"] == "yes")
    assert len(first) > 100
    assert 0.35 < np.mean(first) < 0.65, np.mean(first)
    again = records.conversation_records(1, "train", 7, tasks=("qa",))[0]["conversations"]
    assert again == records.conversation_records(1, "train", 7, tasks=("qa", "caption"))[1]["conversations"]



def _near_negatives(scene, items) -> int:
    """How many "no" existence questions name a present shape or a present colour."""
    shapes, colors = {o.shape for o in scene.objects}, {o.color for o in scene.objects}
    names = [q["question"].split(" in the image")[0].split()[-2:] for q in items
             if q["kind"] == "existence" and q["answer"] == "no"]
    return sum(shape in shapes or colour in colors for colour, shape in names)


def test_training_qa_draws_negatives_all_three_pope_ways():
    """The training QA's existence negatives come from every POPE way, about a third of scenes each
    (the spec's understanding data). Random negatives alone rarely share a present object's shape or
    colour, so a model trained on them can answer without binding colour to shape."""
    kinds, near, near_if_random = Counter(), 0, 0
    for i in range(300):
        s = sc.make_scene(1, "train", i)
        items = sc.questions(s)
        negative = {q["negative"] for q in items if q["kind"] == "existence"}
        assert len(negative) == 1
        kinds[negative.pop()] += 1
        near += _near_negatives(s, items)
        near_if_random += _near_negatives(s, sc.existence_questions(s, "random"))
    assert set(kinds) == set(sc.POPE_SPLITS) and min(kinds.values()) > 70, kinds
    assert near > 1.2 * near_if_random, (near, near_if_random)


def test_qa_negatives_knob_picks_the_way_and_names_bad_values():
    """`qa_negatives` draws every scene's negatives one way ('random' is the data before the mixed
    default); the built dataset gets its own name, so a workdir never reuses records of another kind."""
    from configs import illume_tiny
    from illume_jax.data import tfds_builders
    from illume_jax.data.shapecomp import records
    for i in range(20):
        s = sc.make_scene(1, "train", i)
        exist = sc.existence_questions(s, "random")
        assert sc.questions(s, "random")[:len(exist)] == exist
        rec = records.conversation_records(1, "train", i, tasks=("qa",), qa_negatives="adversarial")[0]
        asked = {t["value"].removeprefix("<image>\n") for t in rec["conversations"][::2]}
        assert {q["question"] for q in sc.existence_questions(s, "adversarial")} <= asked
    with pytest.raises(ValueError, match="'hard'.*mixed"):
        sc.questions(sc.make_scene(1, "train", 0), "hard")
    with pytest.raises(ValueError, match="qa_negatives='hard'"):
        illume_tiny.get_config("qa_negatives=hard")
    names = {tfds_builders.shapecomp_config((1,), ("qa",), 8, neg).name for neg in sc.QA_NEGATIVES}
    assert len(names) == len(sc.QA_NEGATIVES)
    assert tfds_builders.shapecomp_config((1,), ("t2i",), 8, "random").name == "levels1_t2i_8"
    c = illume_tiny.get_config("qa_negatives=random,text_steps=10")
    assert c.data.datasets.shapecomp_qa.qa_negatives == c.data.datasets.shapecomp_qa_text.qa_negatives == "random"


def test_qa_lookups_ask_every_object_by_shape_and_by_colour():
    """`qa_lookups`: every uniquely shaped object is asked its colour, every uniquely coloured one its
    shape, with the scene's answers; shared shapes / colours are never asked (ambiguous). Off, the records
    are the default ones; on, the built dataset, the config's datasets and the tokenizer corpus follow."""
    from configs import illume_tiny
    from illume_jax.data import tfds_builders
    from illume_jax.data.shapecomp import records
    seen = Counter()
    for i in range(200):
        s = sc.make_scene(1, "train", i)
        shapes, colors = Counter(o.shape for o in s.objects), Counter(o.color for o in s.objects)
        items = sc.attribute_questions(s, lookups=True)
        by_shape = {q["question"]: q["answer"] for q in items if q["kind"] == "color"}
        by_color = {q["question"]: q["answer"] for q in items if q["kind"] == "shape"}
        assert by_shape == {f"What color is the {o.shape}?": o.color for o in s.objects if shapes[o.shape] == 1}
        assert by_color == {f"What shape is the {o.color} object?": o.shape for o in s.objects
                            if colors[o.color] == 1}
        assert not any(q["kind"] == "shape" for q in sc.attribute_questions(s))
        assert sc.questions(s, "random", lookups=False) == sc.questions(s, "random")
        seen[len(by_shape), len(by_color)] += 1
    assert seen[2, 2] > 20 and seen[1, 0] + seen[0, 1] + seen[0, 0] + seen[1, 1] > 0, seen
    rec = records.conversation_records(1, "train", 3, tasks=("qa",), qa_lookups=True)[0]
    asked = {t["value"].removeprefix("<image>\n") for t in rec["conversations"][::2]}
    assert {q["question"] for q in sc.attribute_questions(sc.make_scene(1, "train", 3), True)} <= asked
    assert tfds_builders.shapecomp_config((1,), ("qa",), 8, "random", True).name == "levels1_qa_8_randomneg_lookups"
    assert tfds_builders.shapecomp_config((1,), ("caption",), 8, "mixed", True).name == "levels1_caption_8"
    c = illume_tiny.get_config("qa_lookups=1,text_steps=10")
    assert c.data.datasets.shapecomp_qa.qa_lookups and c.data.datasets.shapecomp_qa_text.qa_lookups
    assert not illume_tiny.get_config("text_steps=10").data.datasets.shapecomp_qa_text.qa_lookups
    with pytest.raises(ValueError, match="qa_lookups=2"):
        illume_tiny.get_config("qa_lookups=2")
    corpus = set(records.text_corpus([1], "train", 30, ("qa",), qa_lookups=True))
    assert any(line.startswith("What shape is the ") for line in corpus)
    assert not any(line.startswith("What shape is the ") for line in records.text_corpus([1], "train", 30, ("qa",)))


def test_qa_turns_spread_a_scenes_questions_over_records():
    """`qa_turns=k`: the same shuffled questions, in records of at most k, each record with the image in
    its first turn and an id of its own; 0 is the one-conversation record. The builder's name, the config's
    image QA dataset (not the scene-description one) and `base`'s loss weighting follow; bad values are
    named errors."""
    from configs import illume_tiny
    from illume_jax.data import tfds_builders
    from illume_jax.data.shapecomp import records
    pairs = lambda rec: [(h["value"].removeprefix("<image>\n"), g["value"])  # noqa: E731
                         for h, g in zip(rec["conversations"][::2], rec["conversations"][1::2])]
    for i in range(20):
        whole = records.conversation_records(1, "train", i, tasks=("qa",), qa_lookups=True)
        assert whole == records.conversation_records(1, "train", i, tasks=("qa",), qa_lookups=True, qa_turns=0)
        (one,) = whole
        for k in (1, 3):
            cut = records.conversation_records(1, "train", i, tasks=("qa",), qa_lookups=True, qa_turns=k)
            assert [r["id"] for r in cut] == [f"shapecomp-L1-train-{i}-qa-{j}" for j in range(len(cut))]
            assert sum((pairs(r) for r in cut), []) == pairs(one)  # same questions, same order, nothing lost
            assert all(len(pairs(r)) == k for r in cut[:-1]) and 1 <= len(pairs(cut[-1])) <= k
            for r in cut:
                values = [t["value"] for t in r["conversations"]]
                assert values[0].startswith("<image>\n") and sum(v.count("<image>") for v in values) == 1
                assert r["images"] == one["images"] and r["context"] == one["context"] and r["task"] == "qa"
        assert len(records.conversation_records(1, "train", i, tasks=("qa",), qa_turns=1)) == len(pairs(
            records.conversation_records(1, "train", i, tasks=("qa",))[0]))
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="qa_turns"):
            records.conversation_records(1, "train", 0, tasks=("qa",), qa_turns=bad)
        with pytest.raises(ValueError, match="qa_turns"):
            tfds_builders.shapecomp_config((1,), ("qa",), 8, "random", True, bad)
    assert tfds_builders.shapecomp_config((1,), ("qa",), 8, "random", True, 1).name == \
        "levels1_qa_8_randomneg_lookups_turns1"
    assert tfds_builders.shapecomp_config((1,), ("caption",), 8, "mixed", False, 1).name == "levels1_caption_8"
    c = illume_tiny.get_config("qa_turns=1,text_steps=10,base_text=0.5")
    assert c.data.datasets.shapecomp_qa.qa_turns == 1 and not c.data.datasets.shapecomp_qa_text.get("qa_turns", 0)
    base = next(s for s in c.stages if s.name == "base")
    assert base.loss_weighting == "dataset"
    from illume_jax.data import build  # the built dataset is the cut one
    assert build._builder(c, "shapecomp_qa", "/nonexistent").builder_config.qa_turns == 1
    default = illume_tiny.get_config("text_steps=10")
    assert default.data.datasets.shapecomp_qa.qa_turns == 0
    assert next(s for s in default.stages if s.name == "base").loss_weighting == "token"
    with pytest.raises(ValueError, match="qa_turns=-1"):
        illume_tiny.get_config("qa_turns=-1")


def test_object_cells_are_the_cells_that_show_any_object_pixel():
    image = np.full((8, 8, 3), 128, np.uint8)
    image[5, 6] = (200, 0, 0)                                # one object pixel, in cell (1, 1) of a 2x2 grid
    np.testing.assert_array_equal(sc.object_cells(image, 2, 2), [False, False, False, True])
    np.testing.assert_array_equal(sc.object_cells(image, 4, 4).nonzero()[0], [2 * 4 + 3])
    scene = sc.make_scene(1, "test", 0)                      # a rendered scene: the cells under its objects
    on = sc.object_cells(sc.render(scene), 16, 16).reshape(16, 16)
    for o in scene.objects:
        assert on[min(int(o.cy // 4), 15), min(int(o.cx // 4), 15)]
    assert 0 < on.sum() < 256
    with pytest.raises(ValueError, match="multiples of the 3x3 grid"):
        sc.object_cells(image, 3, 3)


def test_cell_labels_name_the_visible_object_under_each_cell():
    """Per-cell labels (the ViT's dense supervision) follow the rendered image: every cell's label is
    the shape / colour of the object owning most of its visible pixels, background where no object
    pixel falls, each object's centre cell is its own, and an object drawn later wins where it covers
    an earlier one."""
    shapes, colours = list(world.SHAPES), list(world.COLORS)
    for i in range(6):
        scene = sc.make_scene(1, "train", i)
        image = sc.render(scene)
        shape, colour = sc.cell_labels(scene, (8, 8))
        assert shape.shape == colour.shape == (64,) and shape.dtype == np.int32
        cells = image.reshape(8, 8, 8, 8, 3).transpose(0, 2, 1, 3, 4).reshape(64, 64, 3)
        empty = (cells == np.asarray(scene.background, np.uint8)).all(-1).all(-1)
        assert (shape[empty] == len(shapes)).all() and (colour[empty] == len(colours)).all()
        centre = [min(int(o.cy // 8), 7) * 8 + min(int(o.cx // 8), 7) for o in scene.objects]
        for j, o in enumerate(scene.objects):   # its centre cell, unless a later object's centre shares it
            if centre[j] not in centre[j + 1:]:
                assert shapes[shape[centre[j]]] == o.shape and colours[colour[centre[j]]] == o.color
        for k in np.flatnonzero(shape < len(shapes)):   # an object's label: its colour is what the cell shows most
            counts = [(cells[k] == np.asarray(world.COLORS[c], np.uint8)).all(-1).sum() for c in colours]
            assert counts[colour[k]] > 0
    # Occlusion: two objects at one place; the second, drawn on top, owns the cells they share.
    base = sc.make_scene(1, "train", 0)
    a = dataclasses.replace(base.objects[0], shape="square", color="red", cx=32.0, cy=32.0, r=16, rotation=0.0)
    b = dataclasses.replace(a, shape="circle", color="blue", r=8)
    shape, colour = sc.cell_labels(dataclasses.replace(base, objects=(a, b)), (8, 8))
    assert shapes[shape[4 * 8 + 4]] == "circle" and colours[colour[4 * 8 + 4]] == "blue"
    assert shapes[shape[2 * 8 + 2]] == "square"          # the square's corner, outside the circle
    assert shape[0] == len(shapes) and colour[0] == len(colours)   # a corner: background
    # A coarser grid over the same scene; grids that do not tile the image are named.
    assert sc.cell_labels(base, (4, 4))[0].shape == (16,)
    with pytest.raises(ValueError, match="7x7 grid"):
        sc.cell_labels(base, (7, 7))
    with pytest.raises(ValueError, match="cell_owners"):
        sc.cell_owners(np.zeros((1, 10, 10), bool), [], (8, 8), 1)
