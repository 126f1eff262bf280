"""bench/code_stats.py: background codes are the ones real scenes use on background cells; cluster and
level statistics on grids whose answers are known."""
import numpy as np
import pytest

from bench import code_stats  # the repository root is on sys.path (tests/conftest.py)


def test_background_codes_are_those_used_on_background_cells():
    codes = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3])
    on_object = np.array([0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1], bool)
    bg = code_stats.background_codes(codes, on_object, 5)
    # code 0: always background; 1: always object; 2: 8 of 9 on background (< 90%); 3: object; 4: unused
    np.testing.assert_array_equal(bg, [True, False, False, False, True])
    assert code_stats.background_codes(codes, on_object, 5, share=0.8)[2]
    with pytest.raises(ValueError, match="one shape"):
        code_stats.background_codes(codes, on_object[:3], 5)


def test_cluster_stats_tell_blocks_from_scatter():
    block = np.zeros((1, 8, 8), bool)
    block[0, 2:6, 2:6] = True                       # one 4x4 object
    s = code_stats.cluster_stats(block)
    assert s["object_share"] == 16 / 64
    assert s["given_above_object"] == 12 / 16 and s["given_left_object"] == 12 / 16   # its last row / column end
    assert s["given_above_background"] == 4 / 40   # its top row, under background
    checker = (np.indices((8, 8)).sum(0) % 2 == 0)[None]
    c = code_stats.cluster_stats(checker)
    assert c["given_above_object"] == 0 and c["given_left_object"] == 0 and c["given_above_background"] == 1
    empty = code_stats.cluster_stats(np.zeros((2, 4, 4), bool))
    assert empty["object_share"] == 0 and empty["given_above_object"] is None
    with pytest.raises(ValueError, match=r"\[N, h, w\]"):
        code_stats.cluster_stats(np.zeros((4, 4), bool))


def test_follow_parent_maps_each_pixel_cell_to_the_semantic_cell_over_it():
    sem = np.zeros((1, 2, 2), bool)
    sem[0, 0, 1] = True                              # the top-right quarter
    pix = np.zeros((1, 4, 4), bool)
    pix[0, 0, 2:] = True                             # half of that quarter
    pix[0, 3, 0] = True                              # one cell elsewhere
    f = code_stats.follow_parent(sem, pix)
    assert f["given_parent_object"] == 2 / 4 and f["given_parent_background"] == 1 / 12
    with pytest.raises(ValueError, match="must tile"):
        code_stats.follow_parent(sem, np.zeros((1, 3, 4), bool))
