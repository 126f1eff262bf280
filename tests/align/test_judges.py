"""Judges: the exact ShapeComp judge against `shapecomp_scorer.grade`, the model judge's parsing
(a fake MLLM), and the agreement report."""
import dataclasses

import numpy as np
import pytest

from illume_jax.align import judges
from illume_jax.align.assessment import DIMENSIONS, Assessment, assess_question, format_assessment, parse_assessment
from illume_jax.data import shapecomp
from illume_jax.data.shapecomp import world
from illume_jax.eval import shapecomp_scorer as scorer

# Dimensions each ShapeComp tag's prompt constrains (the rest must be 'none').
CONSTRAINED = {"single_object": {"object"}, "colors": {"object", "color"}, "two_object": {"object"},
               "color_attr": {"object", "color"}, "position": {"object", "color", "spatial"},
               "counting": {"object", "count"}}
SCENES = {1: 30, 2: 40, 3: 12}


def _samples():
    out = []
    for level, n in SCENES.items():
        for i in range(n):
            scene = shapecomp.make_scene(level, "test", i)
            for tag in shapecomp.available_tags(scene):
                prompt, meta = shapecomp.prompt_for(scene, tag)
                out.append((scene, tag, prompt, meta))
    return out


SAMPLES = _samples()
# Levels 1-2 render at 64 px and never rotate objects, level 3 at 128 px: search rotations only there.
JUDGES = {False: judges.ExactJudge(1), True: judges.ExactJudge(3)}


def _kw(image):
    return dict(rotated=image.shape[0] >= 128)


# The scorer's detector misreads a few true renders (a small star at 64 px); `grade` fails them and so
# does the judge (checked below), but a flip test needs a true render both read correctly.
READABLE = [s for s in SAMPLES if scorer.grade(shapecomp.render(s[0]), s[3], **_kw(shapecomp.render(s[0])))[0]]


def _one(image, meta, prompt="p"):
    (v,) = JUDGES[image.shape[0] >= 128].judge_many([image], [prompt], [meta])
    assert v.ok and v.error is None and v.attempts == 1 and v.raw == ""
    return v.assessment


def _recolour(scene, k):
    """The render with object k's pixels painted another palette colour; returns (image, colour)."""
    img = shapecomp.render(scene)
    obj = scene.objects[k]
    new = next(c for c in world.get_level(scene.level).colors
               if c != obj.color and all(o.color != c for o in scene.objects))
    img[shapecomp.object_mask(obj, scene.resolution)] = world.COLORS[new]
    return img, new


def test_samples_cover_every_tag():
    assert {tag for _, tag, _, _ in SAMPLES} == set(scorer.GENEVAL_TAGS)
    assert len(SAMPLES) >= 100


def test_true_render_rates_constrained_dimensions_yes_and_the_rest_none():
    assert len(READABLE) >= 0.95 * len(SAMPLES)
    for scene, tag, prompt, meta in SAMPLES:
        img = shapecomp.render(scene)
        a = _one(img, meta, prompt)
        if (scene, tag, prompt, meta) not in READABLE:
            assert not a.consistent
            continue
        want = {d: "yes" if d in CONSTRAINED[tag] else "none" for d in DIMENSIONS}
        assert a.ratings == want, (prompt, a)
        assert a.rationale == judges.MATCHES and a.consistent


def test_blank_image_fails_object_and_every_rated_dimension():
    for scene, tag, prompt, meta in SAMPLES[:40]:
        blank = np.empty_like(shapecomp.render(scene))
        blank[:] = scene.background
        a = _one(blank, meta, prompt)
        for d in DIMENSIONS:
            assert a.ratings[d] == ("no" if d in CONSTRAINED[tag] else "none"), (prompt, a)
        assert a.rationale == f"there is no {meta['include'][0]['class']}"


def test_recoloured_object_flips_color_only():
    n = 0
    for scene, tag, prompt, meta in READABLE:
        if tag not in ("colors", "color_attr", "position"):
            continue
        k = 0 if tag != "position" else 1   # position: recolour the target (include clause 0)
        img, new = _recolour(scene, k)
        a = _one(img, meta, prompt)
        obj = scene.objects[k]
        assert a.ratings["color"] == "no" and a.ratings["object"] == "yes", (prompt, a)
        assert a.rationale == f"the {obj.shape} is {new}, not {obj.color}"
        assert not scorer.grade(img, meta, **_kw(img))[0]
        n += 1
    assert n >= 40


def test_other_scene_flips_object():
    n = 0
    for scene, tag, prompt, meta in READABLE:
        if tag != "single_object":
            continue
        other = next(s for s in (shapecomp.make_scene(scene.level, "validation", j) for j in range(50))
                     if all(o.shape != scene.objects[0].shape for o in s.objects))
        a = _one(shapecomp.render(other), meta, prompt)
        assert a.ratings == {"object": "no", "count": "none", "color": "none", "spatial": "none"}
        assert a.rationale == f"there is no {scene.objects[0].shape}"
        n += 1
    assert n >= 20


def test_missing_object_flips_count():
    n = 0
    for scene, tag, prompt, meta in READABLE:
        if tag != "counting":
            continue
        fewer = dataclasses.replace(scene, objects=scene.objects[:-1])
        a = _one(shapecomp.render(fewer), meta, prompt)
        k, shape = len(scene.objects), scene.objects[0].shape
        assert a.ratings == {"object": "yes", "count": "no", "color": "none", "spatial": "none"}, (prompt, a)
        there = f"there is 1 {shape}" if k == 2 else f"there are {k - 1} {shapecomp.text.plural(shape)}"
        assert a.rationale == f"{there}, not {k}"
        n += 1
    assert n >= 5


def test_swapped_positions_flip_spatial():
    n = 0
    for scene, tag, prompt, meta in READABLE:
        if tag != "position":
            continue
        a_obj, b_obj = scene.objects
        swapped = dataclasses.replace(scene, objects=(
            dataclasses.replace(a_obj, cx=b_obj.cx, cy=b_obj.cy), dataclasses.replace(b_obj, cx=a_obj.cx, cy=a_obj.cy)))
        img = shapecomp.render(swapped)
        a = _one(img, meta, prompt)
        assert a.ratings["spatial"] == "no" and not scorer.grade(img, meta, **_kw(img))[0], (prompt, a)
        if a.ratings["object"] == "yes" and a.ratings["color"] == "yes":   # else clipped at the border
            rel = meta["include"][1]["position"][0]
            assert a.rationale == f"the {a_obj.shape} is not {rel} the {b_obj.shape}"
            n += 1
    assert n >= 10


def test_color_is_read_on_the_largest_detections_like_grade():
    """A big blue square beside a small red one: "a red square" fails grade (it checks the largest
    `count` detections); "some square is red" would say yes, so the judge follows grade."""
    scene = shapecomp.Scene(level=1, split="test", index=0, resolution=64, background=(128, 128, 128), objects=(
        shapecomp.Obj("square", "blue", "large", 20.0, 32.0, 12, 0.0),
        shapecomp.Obj("square", "red", "small", 50.0, 32.0, 5, 0.0)))
    img = shapecomp.render(scene)
    meta = {"tag": "colors", "include": [{"class": "square", "count": 1, "color": "red"}], "exclude": []}
    a = _one(img, meta)
    assert not scorer.grade(img, meta, **_kw(img))[0]
    assert a.ratings["color"] == "no" and a.rationale == "the square is blue, not red"


def test_consistent_equals_grade_and_round_trips():
    rng = np.random.default_rng(0)
    images, metas = [], []
    for j, (scene, tag, prompt, meta) in enumerate(SAMPLES):
        img = shapecomp.render(scene)
        other = shapecomp.render(shapecomp.make_scene(scene.level, "test", scene.index + 1))
        blank = np.empty_like(img)
        blank[:] = scene.background
        noisy = np.clip(img + rng.normal(0, (10, 40)[j % 2], img.shape), 0, 255).astype(np.uint8)
        variants = [img, other, blank, noisy, _recolour(scene, j % len(scene.objects))[0]]
        if j % 7 == 0:
            variants.append(rng.integers(0, 256, img.shape, dtype=np.uint8))
        images += variants
        metas += [meta] * len(variants)
    verdicts = [JUDGES[im.shape[0] >= 128].judge_many([im], ["p"], [m])[0] for im, m in zip(images, metas)]
    graded = [scorer.grade(im, m, **_kw(im))[0] for im, m in zip(images, metas)]
    assert len(verdicts) >= 500 and 0.2 < np.mean(graded) < 0.8
    for d in DIMENSIONS:   # every dimension fails somewhere, so the equality covers each rule
        assert sum(v.assessment.ratings[d] == "no" for v in verdicts) >= 10, d
    for v, g, m in zip(verdicts, graded, metas):
        assert v.assessment.consistent == g, (m, v)
        text = format_assessment(v.assessment)
        assert parse_assessment(text) == v.assessment, text
        assert v.assessment.rationale in text   # survives the cleaning unchanged


def test_unusual_metadata_follows_grade():
    """Metadata ShapeComp never writes (exclude only, count 0, a target that is not an earlier clause
    or counts from the end, coloured counts) still gives consistent == grade."""
    def metas(shapes, colors):
        a, b = shapes[0], shapes[-1]
        return [{"include": [], "exclude": [{"class": a, "count": 1}]},
                {"include": [{"class": a, "count": 1}], "exclude": [{"class": a, "count": 2}]},
                {"include": [{"class": a, "count": 0, "color": "red"}], "exclude": []},
                {"include": [{"class": a, "count": 2, "color": colors[0]}], "exclude": []},
                {"include": [{"class": a, "count": 1}, {"class": b, "count": 1, "position": ["left of", 1]}]},
                {"include": [{"class": a, "count": 1}, {"class": b, "count": 1, "position": ["above", -1]}]},
                {"include": [{"class": a, "count": 1}, {"class": b, "count": 1, "position": ["below", -1]}]}]
    n = 0
    for scene, _, _, _ in SAMPLES[::4]:
        img = shapecomp.render(scene)
        for meta in metas([o.shape for o in scene.objects], [o.color for o in scene.objects]):
            assert _one(img, meta).consistent == scorer.grade(img, meta, **_kw(img))[0], meta
            n += 1
    assert n >= 150


def test_exact_judge_checks_lengths():
    with pytest.raises(ValueError, match="2 images, 1 prompts"):
        judges.ExactJudge().judge_many([np.zeros((64, 64, 3), np.uint8)] * 2, ["p"], [{}, {}])


# -- model judge -----------------------------------------------------------------------------

GOOD = "object yes, count none, color no, spatial none. the square is blue, not red. overall no"
GARBLED = "i think it is a nice picture of shapes"
CONTRADICTS = "object yes, count none, color no, spatial none. it is fine. overall yes"


class FakeIllume:
    def __init__(self, replies):
        self.replies, self.calls = list(replies), []

    def understand(self, images, questions, *, max_new_tokens):
        self.calls.append((len(images), list(questions), max_new_tokens))
        out, self.replies = self.replies[:len(images)], self.replies[len(images):]
        return out


def test_model_judge_parses_or_fails_with_the_reply_named():
    fake = FakeIllume([GOOD, GARBLED, CONTRADICTS, GOOD, ""])
    judge = judges.ModelJudge(fake, max_new_tokens=40, batch_size=2)
    assert judge.name == "model"
    img = np.zeros((64, 64, 3), np.uint8)
    prompts = [f"a red square {i}" for i in range(5)]
    vs = judge.judge_many([img] * 5, prompts, [{}] * 5)
    assert [c[0] for c in fake.calls] == [2, 2, 1] and {c[2] for c in fake.calls} == {40}
    assert [q for c in fake.calls for q in c[1]] == [assess_question(p) for p in prompts]
    assert [v.ok for v in vs] == [True, False, False, True, False]
    assert all(v.attempts == 1 for v in vs)
    assert [v.raw for v in vs] == [GOOD, GARBLED, CONTRADICTS, GOOD, ""]
    assert vs[0].assessment.ratings["color"] == "no" and vs[0].assessment.rationale == "the square is blue, not red"
    assert vs[0].error is None
    for v in (vs[1], vs[2], vs[4]):
        assert v.assessment is None and v.error.startswith("unparsable reply:")
    assert GARBLED in vs[1].error and "has no rating" in vs[1].error
    assert "overall 'yes'" in vs[2].error and CONTRADICTS in vs[2].error


def test_model_judge_rejects_a_short_reply_list():
    judge = judges.ModelJudge(FakeIllume([GOOD]), batch_size=8)
    with pytest.raises(ValueError, match="1 replies for 2 questions"):
        judge.judge_many([np.zeros((8, 8, 3), np.uint8)] * 2, ["a", "b"], [{}, {}])


# -- agreement -------------------------------------------------------------------------------

def _v(obj, count, color, spatial):
    return judges.Verdict(Assessment({"object": obj, "count": count, "color": color, "spatial": spatial}))


def test_agreement_on_a_hand_made_case():
    failed = judges.Verdict(None, error="unparsable reply: 'x'", raw="x")
    exact = [_v("yes", "none", "yes", "none"), _v("yes", "none", "no", "none"), _v("no", "yes", "none", "none"),
             _v("yes", "none", "yes", "yes"), _v("yes", "none", "none", "none")]
    model = [_v("yes", "none", "yes", "none"), _v("yes", "no", "yes", "none"), _v("no", "none", "none", "none"),
             _v("yes", "none", "yes", "no"), failed]
    r = judges.agreement(exact, model)
    assert r["compared"] == 4 and r["skipped"] == 1
    # overall: yes/yes, no/no, no/no, yes/no
    assert r["table"] == {"yes_yes": 1, "yes_no": 1, "no_yes": 0, "no_no": 2}
    assert r["consistent"] == pytest.approx(0.75)
    assert r["dimensions"]["object"] == {"compared": 4, "agreement": 1.0, "none_mismatch": 0}
    assert r["dimensions"]["count"] == {"compared": 0, "agreement": None, "none_mismatch": 2}
    assert r["dimensions"]["color"] == {"compared": 3, "agreement": pytest.approx(2 / 3), "none_mismatch": 0}
    assert r["dimensions"]["spatial"] == {"compared": 1, "agreement": 0.0, "none_mismatch": 0}
    with pytest.raises(ValueError):
        judges.agreement(exact, model[:2])
