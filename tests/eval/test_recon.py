"""Reconstruction metrics and the ShapeComp tokenizer-ceiling agreement."""
import numpy as np
import pytest

from illume_jax.data import shapecomp
from illume_jax.eval import recon


def _scene_image(i, level=1):
    return shapecomp.render(shapecomp.make_scene(level, "validation", i))


def test_psnr_known_value():
    a = np.zeros((1, 8, 8, 3), np.uint8)
    b = np.full((1, 8, 8, 3), 10, np.uint8)
    assert recon.psnr(a, b) == pytest.approx(10 * np.log10(255 ** 2 / 100))


def test_ssim_is_one_for_identical_and_lower_for_noise():
    img = np.stack([_scene_image(i) for i in range(3)])
    assert recon.ssim(img, img) == pytest.approx(1.0)
    noisy = np.clip(img.astype(int) + np.random.default_rng(0).integers(-40, 40, img.shape), 0, 255).astype(np.uint8)
    assert recon.ssim(img, noisy) < 0.9


def test_agreement_exact_on_ground_truth_and_zero_on_blanks():
    imgs = [_scene_image(i) for i in range(20)]
    assert recon.scorer_agreement(imgs, imgs) == 1.0
    blanks = [np.full_like(im, 128) for im in imgs]
    assert recon.scorer_agreement(imgs, blanks) == 0.0


def test_agreement_catches_a_moved_or_recoloured_object():
    scene = shapecomp.make_scene(1, "validation", 3)
    img = shapecomp.render(scene)
    shifted = np.roll(img, 6, axis=1)
    assert not recon.same_reading(img, shifted)
    assert recon.reading_mismatch(img, shifted) == "offset"
    recoloured = img.copy()
    mask = shapecomp.object_mask(scene.objects[0], img.shape[0])
    recoloured[mask] = (30, 60, 220) if scene.objects[0].color != "blue" else (220, 30, 30)
    assert not recon.same_reading(img, recoloured)
    assert recon.reading_mismatch(img, recoloured) == "color"
    assert recon.reading_mismatch(img, np.full_like(img, 128)) == "count"
    assert recon.reading_mismatch(img, img) is None
    breakdown = recon.mismatch_breakdown([img, img, img, img], [img, shifted, recoloured, np.full_like(img, 128)])
    assert breakdown == {"count": 0.25, "color": 0.25, "shape": 0.0, "offset": 0.25}


def test_agreement_tolerates_small_noise():
    imgs = [_scene_image(i) for i in range(10)]
    rng = np.random.default_rng(0)
    noisy = [np.clip(im.astype(int) + rng.integers(-12, 12, im.shape), 0, 255).astype(np.uint8) for im in imgs]
    assert recon.scorer_agreement(imgs, noisy) == 1.0


def test_mismatched_lengths_are_an_error():
    with pytest.raises(ValueError, match="same non-zero number"):
        recon.scorer_agreement([_scene_image(0)], [])


def test_edit_ceiling_grades_the_round_tripped_targets_as_the_editing_suite_does():
    # A lossless round trip is a perfect editor; a blank canvas or a mirrored target follows no instruction.
    exact = recon.edit_ceiling(lambda imgs: imgs, pairs=24)
    assert exact["edit_ceiling"] == 1.0 and exact["edit_pairs"] == 24
    ops = {shapecomp.edit_pair(1, "test", i).op for i in range(24)}
    assert {k for k in exact if k.startswith("edit_ceiling_")} == {f"edit_ceiling_{op}" for op in ops}
    blank = recon.edit_ceiling(lambda imgs: [np.full_like(i, i[0, 0]) for i in imgs], pairs=24)
    assert blank["edit_ceiling"] == 0.0
    mirrored = recon.edit_ceiling(lambda imgs: [i[:, ::-1] for i in imgs], pairs=24)
    assert mirrored["edit_ceiling"] < 0.5
    # Two levels: each level's own pairs, counted together.
    assert recon.edit_ceiling(lambda imgs: imgs, levels=(1, 2), pairs=3)["edit_pairs"] == 6


def test_edit_ceiling_refuses_no_pairs_and_a_lossy_count():
    with pytest.raises(ValueError, match="pairs=0"):
        recon.edit_ceiling(lambda imgs: imgs, pairs=0)
    with pytest.raises(ValueError, match="returned 1 images for 2"):
        recon.edit_ceiling(lambda imgs: imgs[:1], pairs=2)


def test_codes_kept_counts_only_cells_the_edit_left_as_they_were():
    pair = shapecomp.edit_pair(1, "test", 0)
    before, after = shapecomp.render(pair.before), shapecomp.render(pair.after)
    h = w = 16
    S = before.shape[0] // h
    touched = (np.abs(before.astype(int) - after.astype(int)).sum(-1) > 0).reshape(h, S, w, S).any(axis=(1, 3))
    assert touched.any() and not touched.all()
    codes = np.arange(h * w).reshape(1, h, w)
    # Codes that change exactly where the pixels did: a perfectly local tokenizer keeps every other one.
    moved = np.where(touched, codes + 1000, codes)
    assert recon.codes_kept(codes, moved, [before], [after]) == {"all": 1.0, "object": 1.0}
    # Rewriting untouched cells counts, cell for cell; rewriting touched ones does not.
    flipped = moved.copy()
    spare = np.argwhere(~touched[None])[:5]
    flipped[tuple(spare.T)] += 1
    assert recon.codes_kept(codes, flipped, [before], [after])["all"] == pytest.approx(1 - 5 / (~touched).sum())
    on = shapecomp.object_cells(before, h, w).reshape(h, w) | shapecomp.object_cells(after, h, w).reshape(h, w)
    assert (on & ~touched).any()    # an untouched object (or the untouched part of one)
    obj = moved.copy()
    obj[0][on & ~touched] += 1
    assert recon.codes_kept(codes, obj, [before], [after])["object"] == 0.0
    # An edit-free pair with no object on the canvas has no object cell to count.
    blank = np.full_like(before, 128)
    assert recon.codes_kept(codes, codes, [blank], [blank]) == {"all": 1.0, "object": None}
    with pytest.raises(ValueError, match="do not tile"):
        recon.codes_kept(np.zeros((1, 7, 7)), np.zeros((1, 7, 7)), [before], [after])
    with pytest.raises(ValueError, match="expected \\[N, h, w\\] codes"):
        recon.codes_kept(codes, codes[0], [before], [after])
