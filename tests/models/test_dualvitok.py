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


def one_device_mesh():
    return sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1), devices=jax.devices()[:1])


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
    mesh = one_device_mesh()
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
    mesh = one_device_mesh()
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
    mesh = one_device_mesh()
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


def _encoder(pixel_grid: int, local: bool):
    from illume_jax.models import movq
    c = dualvitok_config.get_config(f"size=tiny,pixel_grid={pixel_grid},local_pixels={int(local)}")
    cfg = movq.MoVQConfig(**dict(c.model.pixel_encoder))
    mesh = one_device_mesh()
    with sharding.use_mesh(mesh):
        return cfg, movq.MoVQEncoder(cfg, rngs=nnx.Rngs(0))


def _input_support(encoder, size: int, row: int, col: int) -> np.ndarray:
    """[size, size] bool: the input pixels with any gradient into output position (row, col)."""
    x = jax.random.uniform(jax.random.key(3), (1, size, size, 3), minval=-1, maxval=1)
    g = jax.grad(lambda a: encoder(a)[0, row, col].sum())(x)
    return np.abs(np.asarray(g[0])).sum(-1) > 0


@pytest.mark.parametrize("pixel_grid", [16, 32])
def test_local_pixel_encoder_sees_exactly_its_receptive_field(pixel_grid):
    """A local encoder's output position depends on a window of exactly `receptive_field` pixels (per
    axis) around it and on nothing else; the official-style encoder (whole-image GroupNorm statistics,
    attention) depends on every pixel."""
    cfg, enc = _encoder(pixel_grid, local=True)
    assert cfg.local and cfg.attn_levels == ()
    d, rf = cfg.downsample, cfg.receptive_field
    size = 2 * rf + 4 * d  # room for the whole window away from the zero-padded borders
    r = c = size // d // 2
    support = _input_support(enc, size, r, c)
    rows, cols = np.nonzero(support.any(1))[0], np.nonzero(support.any(0))[0]
    assert rows.max() - rows.min() + 1 == rf and cols.max() - cols.min() + 1 == rf
    assert support[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # the whole window, no holes
    # The window sits around the cell the code stands for (centred to within a pixel).
    assert abs((rows.min() + rows.max()) / 2 - (r * d + (d - 1) / 2)) <= 1
    _, glob = _encoder(pixel_grid, local=False)
    assert _input_support(glob, size, r, c).all()


def test_local_pixel_codes_stay_where_an_edit_is_far():
    """Through the whole tokenizer: repainting one corner of the image leaves every pixel code whose
    receptive field misses the corner exactly as it was (the semantic branch stays global)."""
    c = dualvitok_config.get_config("size=tiny,local_pixels=1")
    cfg = dualvitok.DualViTokConfig.from_config(c.model)
    mesh = one_device_mesh()
    with sharding.use_mesh(mesh):
        model = dualvitok.DualViTok(cfg, rngs=nnx.Rngs(0))
    x = jax.random.uniform(jax.random.key(0), (1, 64, 64, 3), minval=-1, maxval=1)
    edited = x.at[:, :8, :8].set(1.0)
    encode = nnx.jit(lambda m, a: m.encode(a)[1])
    before, after = np.asarray(encode(model, x))[0], np.asarray(encode(model, edited))[0]
    d, rf = cfg.downsample, cfg.pixel_encoder.receptive_field
    reach = -(-(8 + rf // 2) // d)  # cells whose window can touch the 8x8 corner
    far = np.ones_like(before, bool)
    far[:reach, :reach] = False
    assert far.any() and (before[far] == after[far]).all()
    assert (before[:2, :2] != after[:2, :2]).any()


def test_local_encoder_options_are_checked():
    from illume_jax.models import movq
    with pytest.raises(ValueError, match="local=True is an encoder without attention"):
        movq.MoVQConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_levels=(1,), z_channels=16, num_groups=8,
                        local=True)
    cfg = movq.MoVQConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_levels=(), z_channels=16, num_groups=8,
                          local=True)
    with pytest.raises(ValueError, match="local=True is an encoder option"):
        movq.MoVQDecoder(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="local_pixels=2: expected 0 or 1"):
        dualvitok_config.get_config("size=tiny,local_pixels=2")
    # The per-position norm is a LayerNorm over each position's channels.
    from illume_jax.modules import conv
    x = jax.random.normal(jax.random.key(0), (2, 3, 5, 8))
    with sharding.use_mesh(one_device_mesh()):
        y = conv.GroupNorm(8, num_groups=1, spatial=False)(x)
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(y), np.asarray((x - mu) / jnp.sqrt(var + 1e-6)), atol=1e-5)
