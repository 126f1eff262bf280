"""torch parity of illume_jax.modules.resample (channels-last vs torch NCHW)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from illume_jax.modules import resample

SIZE_PAIRS = [
    ((256, 256), (252, 252)),
    ((512, 512), (504, 504)),
    ((384, 576), (336, 504)),
    ((64, 64), (56, 56)),
    ((48, 40), (21, 33)),        # non-square, mixed down/up
    ((9, 9), (16, 16)),          # upscale
    ((13, 26), (24, 48)),        # upscale, non-square
    ((32, 32), (8, 8)),          # strong downscale
    ((5, 7), (5, 3)),            # one axis unchanged
]


def _torch_ref(x_nhwc: np.ndarray, out_hw, **kw) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
    y = F.interpolate(t, size=tuple(out_hw), **kw)
    return y.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("in_hw,out_hw", SIZE_PAIRS)
def test_bicubic_matches_torch(in_hw, out_hw, antialias):
    rng = np.random.default_rng(hash((in_hw, out_hw)) % 2**32)
    x = rng.uniform(-1, 1, (2, *in_hw, 3)).astype(np.float32)
    ref = _torch_ref(x, out_hw, mode="bicubic", align_corners=False, antialias=antialias)
    got = np.asarray(resample.resize_bicubic(jnp.asarray(x), out_hw, antialias=antialias))
    assert got.shape == ref.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


def test_antialias_upscale_differs_from_plain():
    """Documented torch behaviour: upscaling with antialias uses a=-0.5 (PIL), not the plain a=-0.75 kernel."""
    assert not np.allclose(resample.bicubic_weights(9, 16, True), resample.bicubic_weights(9, 16, False))
    for n_in, n_out, aa in [(9, 16, True), (256, 252, True), (13, 24, False), (64, 56, False)]:
        np.testing.assert_allclose(resample.bicubic_weights(n_in, n_out, aa).sum(1), 1.0, atol=1e-6)


def test_bicubic_leading_axes_and_dtype():
    x = np.random.default_rng(0).normal(size=(2, 3, 20, 12, 4)).astype(np.float32)
    got = resample.resize_bicubic(jnp.asarray(x, jnp.bfloat16), (10, 18), antialias=True)
    assert got.shape == (2, 3, 10, 18, 4) and got.dtype == jnp.bfloat16
    ref = _torch_ref(x.reshape(6, 20, 12, 4), (10, 18), mode="bicubic", align_corners=False, antialias=True)
    np.testing.assert_allclose(np.asarray(got, np.float32).reshape(6, 10, 18, 4), ref, atol=0.05)


@pytest.mark.parametrize("in_hw,out_hw", [((8, 8), (16, 16)), ((32, 32), (8, 8)), ((7, 5), (16, 13)),
                                          ((24, 48), (13, 26)), ((3, 10), (7, 10)), ((17, 23), (32, 64)),
                                          ((3, 5), (6, 15)), ((4, 4), (16, 16))])
def test_nearest_matches_torch(in_hw, out_hw):
    x = np.random.default_rng(1).normal(size=(2, *in_hw, 3)).astype(np.float32)
    ref = _torch_ref(x, out_hw, mode="nearest")
    np.testing.assert_array_equal(np.asarray(resample.resize_nearest(jnp.asarray(x), out_hw)), ref)


@pytest.mark.parametrize("n_in,n_out", [(3, 7), (7, 3), (10, 21), (21, 10), (100, 333), (333, 100), (48, 96)])
def test_nearest_indices_match_torch(n_in, n_out):
    t = torch.arange(n_in, dtype=torch.float32).view(1, 1, n_in)
    ref = F.interpolate(t, size=n_out, mode="nearest").view(-1).long().numpy()
    np.testing.assert_array_equal(resample.nearest_indices(n_in, n_out), ref)


@pytest.mark.parametrize("r", [2, 3])
def test_pixel_unshuffle_shuffle_match_torch(r):
    x = np.random.default_rng(2).normal(size=(2, 4 * r, 3 * r, 5)).astype(np.float32)
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    un = np.asarray(resample.pixel_unshuffle(jnp.asarray(x), r))
    np.testing.assert_array_equal(un, F.pixel_unshuffle(xt, r).numpy().transpose(0, 2, 3, 1))
    y = np.random.default_rng(3).normal(size=(2, 4, 3, 5 * r * r)).astype(np.float32)
    yt = torch.from_numpy(np.ascontiguousarray(y.transpose(0, 3, 1, 2)))
    sh = np.asarray(resample.pixel_shuffle(jnp.asarray(y), r))
    np.testing.assert_array_equal(sh, F.pixel_shuffle(yt, r).numpy().transpose(0, 2, 3, 1))
    # round trips
    np.testing.assert_array_equal(np.asarray(resample.pixel_shuffle(jnp.asarray(un), r)), x)
    np.testing.assert_array_equal(np.asarray(resample.pixel_unshuffle(jnp.asarray(sh), r)), y)


def test_pixel_unshuffle_channel_order():
    # one channel, r=2: output channel i*2+j is sub-pixel (i, j)
    x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    y = resample.pixel_unshuffle(x, 2)
    np.testing.assert_array_equal(np.asarray(y[0, 0, 0]), [0.0, 1.0, 4.0, 5.0])
    # two channels: channel c occupies outputs c*4 .. c*4+3
    x2 = jnp.stack([jnp.zeros((2, 2)), jnp.ones((2, 2))], -1)[None]
    np.testing.assert_array_equal(np.asarray(resample.pixel_unshuffle(x2, 2)[0, 0, 0]), [0, 0, 0, 0, 1, 1, 1, 1])


def test_jit():
    x = np.random.default_rng(4).uniform(-1, 1, (1, 384, 576, 3)).astype(np.float32)
    f = jax.jit(lambda a: (resample.resize_bicubic(a, (336, 504), antialias=True),
                           resample.resize_bicubic(a[:, :24, :48], (48, 96), antialias=False),
                           resample.resize_nearest(a, (40, 60)),
                           resample.pixel_shuffle(resample.pixel_unshuffle(a, 2), 2)))
    aa, up, nn_, rt = f(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(aa), _torch_ref(x, (336, 504), mode="bicubic", align_corners=False,
                                                          antialias=True), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(up), _torch_ref(x[:, :24, :48], (48, 96), mode="bicubic",
                                                          align_corners=False), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(nn_), _torch_ref(x, (40, 60), mode="nearest"))
    np.testing.assert_array_equal(np.asarray(rt), x)
