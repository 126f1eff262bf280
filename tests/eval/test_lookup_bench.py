"""bench/lookup_lr.py's synthetic rows: the answer is the asked object's other attribute, the two
objects never share a colour or a shape (so one attribute alone cannot answer), and a short run
learns the easy part (answering a colour or a shape as asked)."""
import importlib.util
import os

import numpy as np


def _bench():
    path = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "lookup_lr.py")
    spec = importlib.util.spec_from_file_location("lookup_lr", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rows_ask_a_bound_attribute_and_training_moves():
    b = _bench()
    ids, where, answer, kind = b.make_batch(np.random.default_rng(0), 64)
    assert ids.shape == (64, b.ROW) and set(kind) == {0, 1}
    for row, w, a, k in zip(ids, where, answer, kind):
        colors, shapes = [row[2], row[9]], [row[3], row[10]]
        assert len(set(colors)) == 2 and len(set(shapes)) == 2
        assert row[w] == b.QMARK and row[w + 1] == a
        key = row[w - 1]
        if k == 0:  # colour of a shape: the colour written right before that shape
            assert row[w - 2] == b.ASK_COLOR and a == colors[shapes.index(key)]
        else:       # shape of a colour: the shape written right after that colour
            assert row[w - 2] == b.ASK_SHAPE and a == shapes[colors.index(key)]
    # From ln 64 ~ 4.2 to about ln 6 ~ 1.8: it answers a colour when asked one, a shape when asked one,
    # with either optimizer (optax's AdamW defaults, or the stages' own: b2 0.95 and norm-1 clipping).
    for optimizer in ("adamw", "stages"):
        curve = b.train(lr=3e-3, steps=80, batch=16, every=80, seed=0, optimizer=optimizer)
        assert curve[80][0] < 2.2, (optimizer, curve)
