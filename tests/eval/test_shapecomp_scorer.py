"""Scorer self-checks: ~100% on ground truth, ~0 on contradicting prompts, graceful under
noise / blur / JPEG, exact POPE metrics, editing grades."""
from collections import defaultdict

import numpy as np
import pytest

from illume_jax.data import shapecomp as sc
from illume_jax.data.shapecomp import world
from illume_jax.eval import scorer_checks as checks
from illume_jax.eval import shapecomp_scorer as S


def _cases(level, n):
    out = []
    for i in range(n):
        s = sc.make_scene(level, "test", i)
        for tag in sc.available_tags(s):
            out.append((s, sc.prompt_for(s, tag)[1]))
    return out


# Template fitting reads every ground-truth render of levels 0-3 exactly (measured on 40 test
# scenes per level; the earlier thresholded-geometry classifier read small level-2 hexagons as circles).
GT_MIN = {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0}


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_ground_truth_scores_near_100_and_contradictions_near_0(level):
    per_tag, wrong = defaultdict(list), []
    for scene, meta in _cases(level, 60):
        img = sc.render(scene)
        dets = S.detect(img, **S.level_options([level]))
        per_tag[meta["tag"]].append(S.grade(img, meta, dets)[0])
        wrong.append(S.grade(img, checks.contradict(scene, meta), dets)[0])
    for tag, oks in per_tag.items():
        assert np.mean(oks) >= GT_MIN[level], (tag, np.mean(oks))
    assert np.mean(wrong) <= 0.02


# Measured on 40 scenes (2026-12-02): 1.0 everywhere but JPEG-75 at 64x64 (level 1 0.85, level 2
# 0.94), whose 8x8 blocks and halved chroma redraw a 10-px star's points. The thresholded-geometry
# classifier this replaced read level 1 at 0.4 under the box blur and 0.5 under JPEG.
@pytest.mark.parametrize("level,kind,minimum", [
    (1, "noise", 0.97), (3, "noise", 0.95), (3, "box_blur", 0.95), (3, "jpeg_75", 0.95), (0, "jpeg_75", 0.95),
    (1, "box_blur", 0.95), (2, "box_blur", 0.95), (1, "jpeg_75", 0.75), (2, "jpeg_75", 0.85)])
def test_graceful_under_degradation(level, kind, minimum):
    kw = S.level_options([level])
    oks = [S.grade(checks.degrade(sc.render(s), kind), m, S.detect(checks.degrade(sc.render(s), kind), **kw))[0]
           for s, m in _cases(level, 40)]
    assert np.mean(oks) >= minimum


@pytest.mark.parametrize("kind", ["gauss_1.0", "gauss_1.5"])
def test_a_decoders_blur_keeps_the_reading(kind):
    """A Gaussian blur of 1-1.5 px -- what a tokenizer's decoder does to 64x64 edges -- leaves
    every level-1 scene read exactly as its render (the tokenizer ceiling's comparison)."""
    from illume_jax.eval import recon
    kw = S.level_options([1])
    for i in range(30):
        img = sc.render(sc.make_scene(1, "test", i))
        assert recon.reading_mismatch(img, checks.degrade(img, kind), **kw) is None, i


def test_fit_shape_recovers_every_shape_at_any_centre_size_and_turn():
    from illume_jax.data.shapecomp.render import shape_mask
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:40, 0:40] + 0.5
    for shape in world.SHAPES:
        for _ in range(3):
            cx, cy, r, rot = *rng.uniform(18, 22, 2), rng.uniform(5, 14), rng.uniform(-0.35, 0.35)
            c, s = np.cos(rot), np.sin(rot)
            u, v = c * (xx - cx) + s * (yy - cy), -s * (xx - cx) + c * (yy - cy)
            got, err = S.fit_shape(shape_mask(shape, u / r, v / r, 1.0).astype(np.float32))
            assert got == shape and err < S.MAX_FIT_ERROR, (shape, cx, cy, r, rot, got, err)


def test_non_shapes_are_not_detected():
    """Bars, L/T shapes, dumbbells and crescents fit no template (sharp or blurred), so they are
    not counted as objects -- a blob must not pass for the nearest shape."""
    for name, mask in checks.non_shape_masks().items():
        img = np.full((64, 64, 3), 128, np.uint8)
        img[mask] = world.COLORS["red"]
        for kind in ("none", "gauss_1.0"):
            x = checks.degrade(img, kind)
            assert S.detect(x) == [], (name, kind, [(d.shape, d.fit_error) for d in S.detect(x)])
        assert S.detect(img, max_fit_error=np.inf), name   # found, only rejected by the fit


def test_soft_edges_keep_the_object_outline():
    """Edge pixels mix object and background colour; the half-coverage rule keeps the outline
    (the old nearest-palette rule within a tolerance lost a pixel ring and read shapes wrong)."""
    from scipy import ndimage
    from illume_jax.data.shapecomp.render import object_mask
    for i in range(10):
        scene = sc.make_scene(3, "test", i)
        img = sc.render(scene).astype(np.float32)
        soft = np.clip(ndimage.gaussian_filter(img, (0.7, 0.7, 0)), 0, 255).round().astype(np.uint8)
        dets = S.detect(soft, shapes=world.get_level(3).shapes)
        assert len(dets) == len(scene.objects)
        for obj in scene.objects:
            true = object_mask(obj, scene.resolution)
            best = max((d for d in dets if d.color == obj.color), key=lambda d: (d.mask & true).sum())
            iou = (best.mask & true).sum() / (best.mask | true).sum()
            assert iou >= 0.9, (i, obj, iou)
            assert best.shape == obj.shape, (i, obj, best.shape)


def test_pope_metrics_exact():
    labels = ["yes", "no"] * 5
    m = S.pope_metrics(["Yes, there is."] * 10, labels)
    assert m == {"accuracy": 0.5, "precision": 0.5, "recall": 1.0, "f1": 2 / 3, "yes_ratio": 1.0}
    m = S.pope_metrics(["yes", "No, there is not."] * 5, labels)
    assert m["accuracy"] == 1.0 and m["f1"] == 1.0 and m["yes_ratio"] == 0.5
    assert S.parse_yes_no("There is not a star. Yes.") == "no"
    with pytest.raises(ValueError, match="equally long"):
        S.pope_metrics(["yes"], ["yes", "no"])


def test_edit_grading():
    follow, unchanged = [], []
    for i in range(40):
        p = sc.edit_pair(2, "test", i)
        g = S.grade_edit(sc.render(p.after), p.before, p.after, p.edited, p.untouched, rotated=False)
        follow.append(g["instruction"])
        assert g["preservation"] >= 0.99 and g["l1_outside"] < 1e-6
        unchanged.append(S.grade_edit(sc.render(p.before), p.before, p.after, p.edited, p.untouched,
                                      rotated=False)["instruction"])
    assert np.mean(follow) >= 0.97 and np.mean(unchanged) <= 0.05   # measured 1.0 / 0.0 on these 40


def test_bad_images_are_named():
    with pytest.raises(ValueError, match=r"expected a \[H, W, 3\] uint8 array"):
        S.detect(np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        S.detect(np.zeros((8, 8, 3), np.float32))


def test_margin_auc_is_the_chance_a_yes_question_outscores_a_no_one():
    labels = ["yes", "no", "yes", "no"]
    assert S.margin_auc([2.0, 1.0, 3.0, 0.0], labels) == 1.0       # every yes above every no
    assert S.margin_auc([0.0, 1.0, 0.0, 3.0], labels) == 0.0
    assert S.margin_auc([0.7] * 4, labels) == 0.5                   # a constant margin reads nothing
    assert S.margin_auc([2.0, 1.0, 0.0, 3.0], labels) == 0.25       # 1 of the 4 yes-no pairs in order
    with pytest.raises(ValueError, match="both answers"):
        S.margin_auc([1.0, 2.0], ["yes", "yes"])
