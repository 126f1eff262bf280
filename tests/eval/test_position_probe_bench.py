"""bench/position_probe.py: the code cells are read off the block template in raster order, and the
read-out names a row / column exactly when the features carry it and at about chance when they do not."""
import numpy as np
import pytest

from bench import position_probe  # the repository root is on sys.path (tests/conftest.py)
from illume_jax.models import mllm


def test_code_cells_follow_the_block_raster_order():
    vocab = mllm.ImageVocab(first_id=100, semantic_codes=8, pixel_codes=16)
    grids = ((2, 3), (4, 6))
    template = mllm.block_template(grids, vocab, continuous=False)
    pos, rows, cols = position_probe.code_cells(template, mllm.SLOT_PIX_OUT, 6)
    assert len(pos) == 24 and (np.diff(pos) > 0).all()
    np.testing.assert_array_equal(rows, np.repeat(np.arange(4), 6))
    np.testing.assert_array_equal(cols, np.tile(np.arange(6), 4))
    # A row's codes are contiguous; one EOL sits between rows.
    assert (np.diff(pos)[5::6] == 2).all() and (np.delete(np.diff(pos), np.s_[5::6]) == 1).all()
    pos0, rows0, cols0 = position_probe.code_cells(template, mllm.SLOT_SEM_OUT, 3)
    assert len(pos0) == 6 and pos0.max() < pos.min() and rows0.max() == 1 and cols0.max() == 2


def test_readout_finds_what_the_features_carry():
    rng = np.random.default_rng(0)
    scenes, h, w, d = 8, 4, 6, 16
    rows, cols = np.tile(np.repeat(np.arange(h), w), (scenes, 1)), np.tile(np.tile(np.arange(w), h), (scenes, 1))
    noise = rng.normal(size=(scenes, h * w, d))
    knows_row = noise.copy()
    knows_row[..., :h] += 5 * np.eye(h)[rows]     # the row, one-hot, in the first features
    acc = position_probe.readout(knows_row, rows, cols)
    assert acc["row"] == 1.0 and acc["col"] < 0.5
    assert position_probe.readout(noise, rows, cols)["row"] < 0.6
    with pytest.raises(ValueError, match="at least 2 scenes"):
        position_probe.readout(noise[:1], rows[:1], cols[:1])


def test_code_fit_splits_object_from_background():
    # Three cells, 2 codes: a sure right background cell, a sure wrong one, an object cell at 50/50.
    lp = np.log(np.array([[1 - 1e-9, 1e-9], [1e-9, 1 - 1e-9], [0.5, 0.5]]))
    fit = position_probe.code_fit(lp, np.array([0, 0, 1]), np.array([False, False, True]))
    assert fit["background"]["cells"] == 2 and fit["background"]["argmax_acc"] == 0.5
    np.testing.assert_allclose(fit["background"]["p_true"], 0.5, atol=1e-6)
    np.testing.assert_allclose(fit["object"]["nll"], np.log(2), rtol=1e-6)
    assert fit["object"]["cells"] == 1
    assert fit["background"]["distinct_codes"] == 1 and fit["background"]["top_code_share"] == 1.0
    spread = position_probe.code_fit(np.log(np.full((4, 3), 1 / 3)), np.array([0, 2, 2, 1]), np.zeros(4, bool))
    assert spread["background"]["distinct_codes"] == 3 and spread["background"]["top_code_share"] == 0.5
    assert spread["object"] == dict(cells=0, nll=None, argmax_acc=None, p_true=None, distinct_codes=0,
                                    top_code_share=None)
