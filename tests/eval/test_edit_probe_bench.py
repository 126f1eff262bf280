"""bench/edit_probe.py: the foreground of a ShapeComp canvas is its objects; IoU and the kept / changed NLL
split count what they say."""
import numpy as np
import pytest

from bench import edit_probe  # the repository root is on sys.path (tests/conftest.py)
from illume_jax.data import shapecomp


def test_foreground_is_the_objects_and_iou_compares_masks():
    scene = shapecomp.make_scene(1, "test", 0)
    image = shapecomp.render(scene)
    fg = edit_probe.foreground(image)
    on = shapecomp.object_cells(image, 64, 64).reshape(64, 64)
    assert fg.any() and (fg == on).mean() > 0.99
    assert edit_probe.iou(fg, fg) == 1.0 and edit_probe.iou(fg, ~fg) == 0.0
    assert edit_probe.iou(np.zeros_like(fg), np.zeros_like(fg)) == 1.0
    half = fg.copy()
    half[:, 32:] = False
    assert edit_probe.iou(fg, half) == pytest.approx(half.sum() / fg.sum())
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        edit_probe.foreground(image[..., 0])


def test_kept_changed_nll_splits_by_the_source_code():
    out = edit_probe.kept_changed_nll(np.array([1.0, 2.0, 3.0, 5.0]), np.array([7, 8, 9, 9]), np.array([7, 0, 9, 1]))
    assert out == {"kept": {"cells": 2, "nll": 2.0}, "changed": {"cells": 2, "nll": 3.5}}
    none = edit_probe.kept_changed_nll(np.array([1.0]), np.array([1]), np.array([1]))
    assert none["changed"] == {"cells": 0, "nll": None}
    with pytest.raises(ValueError, match="NLLs for"):
        edit_probe.kept_changed_nll(np.zeros(3), np.zeros(2), np.zeros(2))
    split = edit_probe.kept_changed_nll(np.array([1.0, 2.0, 3.0, 5.0]), np.array([7, 8, 9, 9]),
                                        np.array([7, 0, 9, 1]), on_object=np.array([True, True, False, False]))
    assert split["kept_object"] == {"cells": 1, "nll": 1.0} and split["kept_background"] == {"cells": 1, "nll": 3.0}
    assert split["kept"] == out["kept"]
    bonus = edit_probe.kept_changed_nll(np.array([4.0, -1.0, 2.0, 0.0]), np.array([7, 8, 9, 9]), np.array([7, 0, 9, 1]),
                                        value="bonus")
    assert bonus == {"kept": {"cells": 2, "bonus": 3.0}, "changed": {"cells": 2, "bonus": -0.5}}
    with pytest.raises(ValueError, match="on_object has shape"):
        edit_probe.kept_changed_nll(np.zeros(2), np.zeros(2), np.zeros(2), on_object=np.zeros(3, bool))


def test_cell_mask_marks_a_cell_with_any_object_pixel():
    mask = np.zeros((8, 8), bool)
    mask[5, 2] = True
    cells = edit_probe.cell_mask(mask, (4, 4))
    assert cells.shape == (16,) and cells.sum() == 1 and cells[2 * 4 + 1]
    assert edit_probe.cell_mask(mask, (8, 8)).reshape(8, 8)[5, 2]
    with pytest.raises(ValueError, match="does not split"):
        edit_probe.cell_mask(mask, (3, 3))
