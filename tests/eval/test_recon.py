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
