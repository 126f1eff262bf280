"""bench/lookup_lr.py's synthetic rows: the answer is the asked object's other attribute, the two
objects never share a colour or a shape (so one attribute alone cannot answer), and a short run
learns the easy part (answering a colour or a shape as asked)."""
import numpy as np

from bench import lookup_lr  # the repository root is on sys.path (tests/conftest.py)


def test_rows_ask_a_bound_attribute_and_training_moves():
    ids, where, answer, kind = lookup_lr.make_batch(np.random.default_rng(0), 64)
    assert ids.shape == (64, lookup_lr.ROW) and set(kind) == {0, 1}
    for row, w, a, k in zip(ids, where, answer, kind):
        colors, shapes = [row[2], row[9]], [row[3], row[10]]
        assert len(set(colors)) == 2 and len(set(shapes)) == 2
        assert row[w] == lookup_lr.QMARK and row[w + 1] == a
        key = row[w - 1]
        if k == 0:  # colour of a shape: the colour written right before that shape
            assert row[w - 2] == lookup_lr.ASK_COLOR and a == colors[shapes.index(key)]
        else:       # shape of a colour: the shape written right after that colour
            assert row[w - 2] == lookup_lr.ASK_SHAPE and a == shapes[colors.index(key)]
    # From ln 64 ~ 4.2 to about ln 6 ~ 1.8: it answers a colour when asked one, a shape when asked one,
    # with either optimizer (optax's AdamW defaults, or the stages' own: b2 0.95 and norm-1 clipping).
    for optimizer in ("adamw", "stages"):
        curve = lookup_lr.train(lr=3e-3, steps=80, batch=16, every=80, seed=0, optimizer=optimizer)
        assert curve[80][0] < 2.2, (optimizer, curve)
