"""PyTorch-exact image resampling on channels-last arrays.

Every function here takes and returns channels-last arrays `[..., H, W, C]` (any number of
leading batch axes), the NHWC counterpart of torch's NCHW `F.interpolate` / `F.pixel_shuffle`.

Why not `jax.image.resize`: the released DualViTok feeds its networks through torch resampling
(spec §1.1, §1.7, §8.3), and `jax.image.resize` differs from it — its cubic kernel uses
a = -0.5 where torch's plain bicubic uses a = -0.75, it always antialiases on downscale, and
it handles the borders differently. The weights here follow torch's CPU kernels:

- bicubic, `antialias=False` (`upsample_bicubic2d`): source coordinate
  `(dst + 0.5) * in/out - 0.5`, Keys cubic with a = -0.75 on the 4 neighbours, neighbour
  indices clamped to the border (border pixels take the weight that falls outside).
- bicubic, `antialias=True` (`_upsample_bicubic2d_aa`, the PIL algorithm): Keys cubic with
  a = -0.5, support 2 * max(in/out, 1) around the centre `(dst + 0.5) * in/out`, the kernel
  stretched by in/out when downscaling, taps outside the image dropped and the remaining
  weights renormalised to sum 1. Upscaling with antialias therefore does *not* equal the plain
  kernel (different `a`, different border rule); the tests check both against torch.
- nearest: `src = min(floor(dst * float32(in / out)), in - 1)`, in float32 like torch.

Resampling is separable: the per-axis weight matrices are built in numpy at trace time from the
static shapes, so under jit a resize is two small einsums (MXU-friendly on TPU), taken in fp32 at
HIGHEST precision and cast back to the input dtype.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys cubic convolution kernel with parameter a (support |x| < 2)."""
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return np.where(x <= 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=256)
def bicubic_weights(n_in: int, n_out: int, antialias: bool) -> np.ndarray:
    """[n_out, n_in] matrix W (float64, read-only, cached) with `y = W @ x` equal to torch's 1-D
    bicubic resize (align_corners=False, size given, no scale_factor)."""
    if n_in <= 0 or n_out <= 0:
        raise ValueError(f"bicubic resize: sizes must be positive, got {n_in} -> {n_out}")
    w = np.zeros((n_out, n_in), np.float64)
    dst = np.arange(n_out, dtype=np.float64)
    if not antialias:
        # torch computes the source coordinate in float32 (the input's opmath type), and its
        # compiled kernels contract `scale * (dst + 0.5) - 0.5` into one FMA (a single rounding).
        # The rounding of t is visible (up to ~1e-4 at 512 px), so mirror it: the float64 product of
        # two float32 values minus 0.5 is exact here, rounded once to float32. No clamp at 0 for cubic.
        s32 = np.float32(n_in) / np.float32(n_out)
        real = (np.float64(s32) * (dst + 0.5) - 0.5).astype(np.float32)
        base = np.minimum(np.floor(real), n_in - 1)
        t = np.clip(real - base.astype(np.float32), 0.0, 1.0).astype(np.float64)
        taps = np.stack([_cubic(t + 1.0, -0.75), _cubic(t, -0.75), _cubic(1.0 - t, -0.75), _cubic(2.0 - t, -0.75)], 1)
        idx = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3)[None, :], 0, n_in - 1)
        np.add.at(w, (np.repeat(np.arange(n_out), 4), idx.ravel()), taps.ravel())
        w.setflags(write=False)  # cached: shared between callers
        return w
    # Mirror torch's float32 arithmetic (centre, support, tap positions, kernel values and the
    # normalising sum, accumulated tap by tap): in float64 the results move by up to ~1e-4 at
    # 512 px because the centre's rounding shifts every tap.
    f32 = np.float32
    s32 = f32(n_in) / f32(n_out)
    support = f32(2.0) * s32 if s32 >= 1.0 else f32(2.0)
    invscale = f32(1.0) / s32 if s32 >= 1.0 else f32(1.0)
    for i in range(n_out):
        center = s32 * (f32(i) + f32(0.5))
        xmin = max(int(center - support + f32(0.5)), 0)           # int() truncates toward zero, as in C++
        xmax = min(int(center + support + f32(0.5)), n_in)
        taps = [f32(_cubic(np.asarray((f32(j) - center + f32(0.5)) * invscale, f32), f32(-0.5)))
                for j in range(xmin, xmax)]
        total = f32(0.0)
        for tap in taps:
            total = f32(total + tap)
        for k, tap in enumerate(taps):
            w[i, xmin + k] = f32(tap / total) if total != 0.0 else tap
    w.setflags(write=False)  # cached: shared between callers
    return w


@functools.lru_cache(maxsize=256)
def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output position for torch `mode='nearest'` (float32 arithmetic)."""
    if n_out == n_in:
        src = np.arange(n_out)
    elif n_out == 2 * n_in:
        src = np.arange(n_out) >> 1
    else:
        scale = np.float32(n_in) / np.float32(n_out)
        src = np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64), n_in - 1)
    src.setflags(write=False)  # cached: shared between callers
    return src


def _check_hw(x: jax.Array, out_hw) -> tuple[int, int]:
    if x.ndim < 3:
        raise ValueError(f"expected a channels-last array [..., H, W, C], got shape {x.shape}")
    oh, ow = (int(s) for s in out_hw)
    return oh, ow


def resize_bicubic(x: jax.Array, out_hw: tuple[int, int], *, antialias: bool) -> jax.Array:
    """torch `F.interpolate(mode='bicubic', align_corners=False, antialias=...)` on [..., H, W, C].

    Computed in fp32 (HIGHEST precision matmuls), returned in x's dtype. No clamping of the
    output range (bicubic overshoots, as in torch).
    """
    oh, ow = _check_hw(x, out_hw)
    h, w = x.shape[-3], x.shape[-2]
    if (h, w) == (oh, ow):
        return x
    wh = jnp.asarray(bicubic_weights(h, oh, bool(antialias)), jnp.float32)
    ww = jnp.asarray(bicubic_weights(w, ow, bool(antialias)), jnp.float32)
    y = x.astype(jnp.float32)
    y = jnp.einsum("oh,...hwc->...owc", wh, y, precision=_HIGHEST)
    y = jnp.einsum("pw,...owc->...opc", ww, y, precision=_HIGHEST)
    return y.astype(x.dtype)


def resize_nearest(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
    """torch `F.interpolate(mode='nearest')` on [..., H, W, C] (a gather; dtype preserved)."""
    oh, ow = _check_hw(x, out_hw)
    h, w = x.shape[-3], x.shape[-2]
    if (h, w) != (oh, ow) and oh % h == 0 and ow % w == 0:
        # Integer upscale: a broadcast (cheaper than a gather on TPU), same result as the index rule.
        lead, c = x.shape[:-3], x.shape[-1]
        y = jnp.broadcast_to(x[..., :, None, :, None, :], (*lead, h, oh // h, w, ow // w, c))
        return y.reshape(*lead, oh, ow, c)
    if (h, w) != (oh, ow):
        x = jnp.take(x, jnp.asarray(nearest_indices(h, oh)), axis=-3)
        x = jnp.take(x, jnp.asarray(nearest_indices(w, ow)), axis=-2)
    return x


def pixel_unshuffle(x: jax.Array, r: int) -> jax.Array:
    """torch `F.pixel_unshuffle` on channels-last: [..., H*r, W*r, C] -> [..., H, W, C*r*r].

    Output channel `c*r*r + i*r + j` holds input pixel (h*r + i, w*r + j) of channel c — torch's
    order, not the (i, j, c) order of TF/JAX space_to_depth.
    """
    *lead, hr, wr, c = x.shape
    if hr % r or wr % r:
        raise ValueError(f"pixel_unshuffle: spatial size {(hr, wr)} not divisible by {r}")
    h, w = hr // r, wr // r
    n = len(lead)
    y = x.reshape(*lead, h, r, w, r, c)
    y = jnp.transpose(y, (*range(n), n, n + 2, n + 4, n + 1, n + 3))   # [..., h, w, c, i, j]
    return y.reshape(*lead, h, w, c * r * r)


def pixel_shuffle(x: jax.Array, r: int) -> jax.Array:
    """torch `F.pixel_shuffle` on channels-last: [..., H, W, C*r*r] -> [..., H*r, W*r, C]
    (inverse of `pixel_unshuffle`; input channel c*r*r + i*r + j goes to pixel (h*r+i, w*r+j))."""
    *lead, h, w, crr = x.shape
    if crr % (r * r):
        raise ValueError(f"pixel_shuffle: {crr} channels not divisible by r*r={r * r}")
    c = crr // (r * r)
    n = len(lead)
    y = x.reshape(*lead, h, w, c, r, r)
    y = jnp.transpose(y, (*range(n), n, n + 3, n + 1, n + 4, n + 2))   # [..., h, i, w, j, c]
    return y.reshape(*lead, h * r, w * r, c)


__all__ = ["bicubic_weights", "nearest_indices", "resize_bicubic", "resize_nearest", "pixel_shuffle",
           "pixel_unshuffle"]
