"""DualViTok: the spec's token-count table (§1.8) for every anchor, shapes and code paths of a tiny model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import dualvitok as dualvitok_config
from illume_jax import sharding
from illume_jax.models import dualvitok

# (h, w) -> ((h1, w1), (h2, w2), block length), from the spec's table (§1.8).
SPEC_TABLE = {
    (256, 256): ((9, 9), (16, 16), 368), (512, 512): ((18, 18), (32, 32), 1404),
    (384, 512): ((12, 16), (24, 32), 1002), (512, 384): ((16, 12), (32, 24), 1014),
    (384, 768): ((13, 26), (24, 48), 1533), (768, 384): ((26, 13), (48, 24), 1570),
    (384, 576): ((12, 18), (24, 36), 1122), (576, 384): ((18, 12), (36, 24), 1140),
    (320, 960): ((11, 33), (20, 60), 1600), (960, 320): ((33, 11), (60, 20), 1662),
    (256, 1024): ((9, 36), (16, 64), 1379), (1024, 256): ((36, 9), (64, 16), 1454),
    (448, 448): ((16, 16), (28, 28), 1090),
}


def official_cfg():
    return dualvitok.DualViTokConfig.from_config(dualvitok_config.model_config("official"))


@pytest.mark.parametrize("hw", sorted(SPEC_TABLE))
def test_token_grids_match_spec_table(hw):
    cfg = official_cfg()
    sem, pix, length = SPEC_TABLE[hw]
    assert dualvitok.token_grids(*hw, cfg) == (sem, pix)
    assert dualvitok.image_block_length(*hw, cfg) == length


def test_every_anchor_is_in_the_table():
    assert set(dualvitok.ANCHORS) <= set(SPEC_TABLE)


def test_bad_size_is_named():
    with pytest.raises(ValueError, match="multiples of 16"):
        dualvitok.token_grids(250, 256, official_cfg())


def test_official_encode_shapes_without_allocating():
    """The official model traced abstractly: 512x512 -> 18x18 semantic + 32x32 pixel codes."""
    cfg = official_cfg()
    mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    with sharding.use_mesh(mesh):
        model = nnx.eval_shape(lambda: dualvitok.DualViTok(cfg, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(model)
        out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).encode(x), state,
                             jax.ShapeDtypeStruct((1, 512, 512, 3), jnp.float32))
    assert out[0].shape == (1, 18, 18) and out[1].shape == (1, 32, 32)
    n = lambda tree: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))  # noqa: E731
    # Spec §6.1: 1.350e9 numbers in the official state dict (frozen codebooks included).
    assert abs(n(state) - 1.350e9) / 1.350e9 < 0.005, n(state)


@pytest.fixture(scope="module")
def tiny():
    cfg = dualvitok.DualViTokConfig.from_config(dualvitok_config.model_config("tiny"))
    mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    with sharding.use_mesh(mesh):
        model = dualvitok.DualViTok(cfg, rngs=nnx.Rngs(0))
    return cfg, model


def test_tiny_encode_decode_round_trip_shapes(tiny):
    cfg, model = tiny
    x = jax.random.uniform(jax.random.key(0), (2, 64, 64, 3), minval=-1, maxval=1)
    sem, pix = nnx.jit(lambda m, a: m.encode(a))(model, x)
    assert sem.shape == (2, 8, 8) and pix.shape == (2, 16, 16)
    assert sem.dtype == jnp.int32 and int(sem.max()) < cfg.semantic_codes and int(pix.max()) < cfg.pixel_codes
    img = nnx.jit(lambda m, a, b: m.decode(a, b))(model, sem, pix)
    assert img.shape == (2, 64, 64, 3)
    # decode(encode(x)) is exactly what the forward pass reconstructs.
    out = nnx.jit(lambda m, a: m(a))(model, x)
    np.testing.assert_allclose(np.asarray(out.recon), np.asarray(img), atol=1e-5)
    assert set(out.losses) == {"semantic_commit", "pixel_commit"}
    # Bypassing the quantisers decodes the latents themselves (eval-tokenizer --unquantized).
    free = nnx.jit(lambda m, a: m.reconstruct_unquantized(a))(model, x)
    z_sem, z_pix = nnx.jit(lambda m, a: m.latents(a)[:2])(model, x)
    assert free.shape == img.shape and not np.allclose(np.asarray(free), np.asarray(img), atol=1e-3)
    np.testing.assert_allclose(np.asarray(free), np.asarray(nnx.jit(lambda m, a, b: m.decode_vectors(a, b))(
        model, z_sem, z_pix)), atol=1e-5)


def test_tiny_training_forward_has_the_semantic_cosine_loss(tiny):
    _, model = tiny
    x = jnp.zeros((2, 64, 64, 3))
    out = nnx.jit(lambda m, a: m(a, train=True, rng=jax.random.key(1)))(model, x)
    assert set(out.losses) == {"semantic_commit", "pixel_commit", "semantic_cosine"}
    assert 0.0 <= float(out.losses["semantic_cosine"]) <= 2.0


def test_noise_injection_replaces_pixel_codes_from_the_previous_sample():
    cfg = dualvitok.DualViTokConfig.from_config(dict(dualvitok_config.model_config("tiny"), pixel_drop_rate=1.0,
                                                     pixel_drop_batch_rate=1.0))
    mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    with sharding.use_mesh(mesh):
        model = dualvitok.DualViTok(cfg, rngs=nnx.Rngs(0))
    q = jnp.arange(3 * 4 * 4 * 2, dtype=jnp.float32).reshape(3, 4, 4, 2)
    noisy = model._noise(q, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(noisy), np.roll(np.asarray(q), 1, axis=0))


def test_scaling_layer_is_identity_resize_at_the_grid_size():
    x = jnp.linspace(-1, 1, 2 * 8 * 8 * 3).reshape(2, 8, 8, 3)
    y = dualvitok.scale_for_vit(x, (8, 8))
    expected = ((np.asarray(x) + 1) / 2 - np.asarray(dualvitok.CLIP_MEAN)) / np.asarray(dualvitok.CLIP_STD)
    np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-6, atol=1e-6)
