"""bench/tower_probe.py: the supervised shape check trains the tower's ViT (its parameters move, the
pixel encoder's do not); a SigLIP-phase ViT (what --vit_from loads) goes into the tower bit for bit."""
import jax
import numpy as np
from flax import nnx

from bench import tower_probe  # the repository root is on sys.path (tests/conftest.py)
from illume_jax.train import checkpoint as ckpt_lib
from illume_jax.train.tokenizer import load_pretrained_vit, pretrained_vit_path


def test_vit_loads_and_the_shape_check_trains_only_the_vit(tmp_path, tiny_tokenizer_mllm):
    source, tower = tiny_tokenizer_mllm(1).vision, tiny_tokenizer_mllm(0).vision
    ckpt_lib.save_tree(pretrained_vit_path(str(tmp_path)), nnx.state(source.vit, nnx.Param))  # as the SigLIP phase
    load_pretrained_vit(tower.vit, str(tmp_path))
    for x, y in zip(jax.tree.leaves(nnx.state(tower.vit, nnx.Param)), jax.tree.leaves(nnx.state(source.vit, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    vit_before = [np.asarray(x).copy() for x in jax.tree.leaves(nnx.state(tower.vit, nnx.Param))]
    pix_before = [np.asarray(x).copy() for x in jax.tree.leaves(nnx.state(tower.pixel_encoder, nnx.Param))]
    log = tower_probe.train_shape_head(tower, steps=3, scenes=16, batch=8)
    assert [r["step"] for r in log] == [1, 3] and all(np.isfinite(r["loss"]) for r in log)
    vit_after = jax.tree.leaves(nnx.state(tower.vit, nnx.Param))
    assert any(not np.array_equal(a, np.asarray(c)) for a, c in zip(vit_before, vit_after))
    for a, c in zip(pix_before, jax.tree.leaves(nnx.state(tower.pixel_encoder, nnx.Param))):
        np.testing.assert_array_equal(a, np.asarray(c))
