"""bench/shape_oracle.py: the cell labels name the shape of the object under each token cell (from the
image alone, checked against the scene graph), and the patched `image_features` adds exactly one
shape's vector to the tokens of object cells and nothing elsewhere, inside jit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench import shape_oracle  # the repository root is on sys.path (tests/conftest.py)
from illume_jax.data.shapecomp import world
from illume_jax.data.shapecomp.render import object_mask, render
from illume_jax.data.shapecomp.scene import make_scene
from illume_jax.models import mllm


def _scenes(n=6):
    return [make_scene(1, "test", i) for i in range(n)]


def test_cell_labels_follow_the_scene_graph():
    scenes = _scenes()
    images = np.stack([render(s) for s in scenes])
    shapes = list(world.get_level(1).shapes)
    sem, pix = shape_oracle.cell_labels(images, ((8, 8), (16, 16)))
    assert sem.shape == (6, 64) and pix.shape == (6, 256) and sem.dtype == np.int32
    for labels, g in ((sem, 8), (pix, 16)):
        cell = 64 // g
        for n, scene in enumerate(scenes):
            grid = labels[n].reshape(g, g)
            covered = np.zeros((g, g), bool)
            for o in scene.objects:
                cover = object_mask(o, 64).reshape(g, cell, g, cell).sum((1, 3))
                covered |= cover > 0
                # the cell holding the centre names the object's shape
                assert grid[min(int(o.cy / cell), g - 1), min(int(o.cx / cell), g - 1)] == shapes.index(o.shape)
                # a cell the object fills alone names it too
                alone = cover == cell * cell
                assert (grid[alone] == shapes.index(o.shape)).all()
            # no object pixel in a cell: background
            assert (grid[~covered] == len(shapes)).all()
            assert set(np.unique(grid)) <= {shapes.index(o.shape) for o in scene.objects} | {len(shapes)}


def test_cell_labels_reject_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        shape_oracle.cell_labels(np.zeros((1, 64, 64, 3), np.float32), ((8, 8),))
    with pytest.raises(ValueError, match="does not tile"):
        shape_oracle.cell_labels(np.zeros((1, 64, 64, 3), np.uint8), ((7, 7),))


def test_patched_image_features_add_one_shape_vector_per_object_cell(monkeypatch, tiny_tokenizer_mllm):
    # monkeypatch restores the class's own method after the test
    monkeypatch.setattr(mllm.MLLM, "image_features", mllm.MLLM.image_features)
    model = tiny_tokenizer_mllm(0)
    cfg = model.cfg
    scenes = _scenes(2)
    images = jnp.asarray(np.stack([render(s) for s in scenes]).astype(np.float32) / 127.5 - 1)[:, None]  # [B, M=1, ...]
    plain = [np.asarray(x) for x in model.image_features(images)]
    shape_oracle.install(strength=0.5)
    told = [np.asarray(x) for x in jax.jit(lambda m, x: m.image_features(x))(model, images)]
    labels = shape_oracle.cell_labels(np.asarray(np.stack([render(s) for s in scenes])), cfg.grids(64, 64))
    n_shapes = len(world.get_level(1).shapes)
    for p, t, lab in zip(plain, told, labels):
        diff = (t - p).reshape(-1, p.shape[-1])
        lab = lab.reshape(-1)
        scale = 0.5 * np.linalg.norm(p, axis=-1).mean()
        np.testing.assert_allclose(diff[lab == n_shapes], 0.0, atol=1e-6)
        obj = lab < n_shapes
        assert obj.any()
        np.testing.assert_allclose(np.linalg.norm(diff[obj], axis=-1), scale, rtol=1e-4)
        # one vector per shape: cells of the same shape got the same vector, different shapes different ones
        for s in np.unique(lab[obj]):
            np.testing.assert_allclose(diff[lab == s], np.broadcast_to(diff[lab == s][0], diff[lab == s].shape),
                                       rtol=1e-4, atol=1e-5)
        if len(np.unique(lab[obj])) > 1:
            a, b = np.unique(lab[obj])[:2]
            assert not np.allclose(diff[lab == a][0], diff[lab == b][0])
