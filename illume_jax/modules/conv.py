"""Convolutional building blocks of the MoVQ pixel encoder/decoder (spec §1.5, §1.7), NHWC.

Written to match PyTorch numerics: kernels are HWIO (converted from OIHW), padding is
torch's symmetric `padding=k//2`, GroupNorm groups consecutive channels with fp32
statistics, pixel (un)shuffle keeps torch's channel order (`c*r*r + i*r + j`, which differs
from `depth_to_space`), and the spatial norm's nearest resize uses torch's
`src = floor(dst * in / out)` rule. A kernel's output channels carry 'conv_out' (tensor
parallelism). Its input channels carry 'conv_in' (fsdp) for storage only: activations are
batch-sharded over the same axis, so each conv all-gathers its kernel first (ZeRO-3) instead of
splitting the 3x3 windows' reduction. Without it SDXL's conv kernels (1.3 of its 9.6 GiB of
weights, with their Adam moments) were replicated on every chip. Channels the fsdp size does not
divide (an RGB conv_in) stay replicated.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from illume_jax.modules.resample import pixel_shuffle, pixel_unshuffle, resize_nearest
from illume_jax.sharding import logical_axis_size, shares_mesh_axis


def _torch_uniform(key: jax.Array, shape: tuple[int, ...], fan_in: int, dtype) -> jax.Array:
    """torch's default Conv2d init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


class Conv2d(nnx.Module):
    """torch.nn.Conv2d on NHWC activations with an HWIO kernel."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *, stride: int = 1,
                 padding: int | None = None, use_bias: bool = True, dtype=jnp.float32, param_dtype=jnp.float32,
                 out_axis: str | None = "conv_out", rngs: nnx.Rngs):
        self.stride = stride
        self.padding = kernel_size // 2 if padding is None else padding
        self.dtype = dtype
        fan_in = in_channels * kernel_size * kernel_size
        shape = (kernel_size, kernel_size, in_channels, out_channels)
        # no 'conv_in' when the output side already uses fsdp (a 1x1 proj_in with out_axis='embed')
        shard_in = in_channels % logical_axis_size("conv_in") == 0 and not shares_mesh_axis(out_axis, "conv_in")
        in_axis = "conv_in" if shard_in else None
        self.kernel = nnx.Param(_torch_uniform(rngs.params(), shape, fan_in, param_dtype),
                                out_sharding=(None, None, in_axis, out_axis))
        self.bias = (nnx.Param(_torch_uniform(rngs.params(), (out_channels,), fan_in, param_dtype),
                               out_sharding=(out_axis,)) if use_bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel[...].astype(self.dtype)
        if k.shape[0] == 1 and k.shape[1] == 1 and self.stride == 1 and self.padding == 0:
            y = x.astype(self.dtype) @ k[0, 0]  # 1x1: a plain matmul over channels
        else:
            p = self.padding
            y = jax.lax.conv_general_dilated(x.astype(self.dtype), k, (self.stride, self.stride), ((p, p), (p, p)),
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class GroupNorm(nnx.Module):
    """torch.nn.GroupNorm (affine) on NHWC: groups of consecutive channels, fp32 statistics,
    biased variance; output in the input's dtype. `spatial=False` takes each position's statistics
    over its own channels only (with one group: a per-position LayerNorm), so a position's output
    does not depend on the rest of the image."""

    def __init__(self, num_channels: int, *, num_groups: int = 32, eps: float = 1e-6, param_dtype=jnp.float32,
                 spatial: bool = True, rngs: nnx.Rngs | None = None):
        del rngs  # deterministic init (ones / zeros)
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels are not divisible by {num_groups} groups")
        self.num_groups, self.eps = num_groups, eps
        self.axes = (1, 2, 4) if spatial else (4,)
        self.scale = nnx.Param(jnp.ones((num_channels,), param_dtype), out_sharding=("norm",))
        self.bias = nnx.Param(jnp.zeros((num_channels,), param_dtype), out_sharding=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        B, H, W, C = x.shape
        g = x.astype(jnp.float32).reshape(B, H, W, self.num_groups, C // self.num_groups)
        mu = g.mean(axis=self.axes, keepdims=True)
        var = jnp.square(g - mu).mean(axis=self.axes, keepdims=True)
        y = ((g - mu) * jax.lax.rsqrt(var + self.eps)).reshape(B, H, W, C)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class SpatialNorm(nnx.Module):
    """MoVQ spatial norm: GroupNorm(x) * conv_y(zq') + conv_b(zq'), zq' = nearest-resized zq."""

    def __init__(self, channels: int, zq_channels: int, *, num_groups: int = 32, eps: float = 1e-6,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.norm_layer = GroupNorm(channels, num_groups=num_groups, eps=eps, param_dtype=param_dtype)
        self.conv_y = Conv2d(zq_channels, channels, 1, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv_b = Conv2d(zq_channels, channels, 1, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, zq: jax.Array) -> jax.Array:
        zq = resize_nearest(zq, x.shape[1:3])
        return self.norm_layer(x) * self.conv_y(zq) + self.conv_b(zq)


def _make_norm(channels: int, zq_channels: int, num_groups: int, dtype, param_dtype, rngs: nnx.Rngs,
               spatial: bool = True):
    if zq_channels:
        if not spatial:
            raise ValueError("per-position norms (spatial=False) are not available with spatial norms (zq_channels)")
        return SpatialNorm(channels, zq_channels, num_groups=num_groups, dtype=dtype, param_dtype=param_dtype,
                           rngs=rngs)
    return GroupNorm(channels, num_groups=num_groups, param_dtype=param_dtype, spatial=spatial)


def _norm(norm: nnx.Module, x: jax.Array, zq: jax.Array | None) -> jax.Array:
    if isinstance(norm, SpatialNorm):
        if zq is None:
            raise ValueError("this block uses spatial norms: pass the code map zq")
        return norm(x, zq)
    return norm(x)


class ResBlock(nnx.Module):
    """norm, SiLU, conv3x3, norm, SiLU, conv3x3 (+ 1x1 nin_shortcut when the width changes).
    `zq_channels` > 0 makes both norms spatial norms conditioned on zq; `spatial_norm=False` makes
    them per-position (GroupNorm's `spatial`)."""

    def __init__(self, in_channels: int, out_channels: int, *, zq_channels: int = 0, num_groups: int = 32,
                 dtype=jnp.float32, param_dtype=jnp.float32, spatial_norm: bool = True, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = _make_norm(in_channels, zq_channels, num_groups, dtype, param_dtype, rngs, spatial_norm)
        self.conv1 = Conv2d(in_channels, out_channels, 3, **kw)
        self.norm2 = _make_norm(out_channels, zq_channels, num_groups, dtype, param_dtype, rngs, spatial_norm)
        self.conv2 = Conv2d(out_channels, out_channels, 3, **kw)
        self.nin_shortcut = Conv2d(in_channels, out_channels, 1, **kw) if in_channels != out_channels else None

    def __call__(self, x: jax.Array, zq: jax.Array | None = None) -> jax.Array:
        h = self.conv1(jax.nn.silu(_norm(self.norm1, x, zq)))
        h = self.conv2(jax.nn.silu(_norm(self.norm2, h, zq)))  # dropout is 0 in every released config
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nnx.Module):
    """Single-head self-attention over all positions: 1x1 q/k/v/proj_out, scale 1/sqrt(C), residual."""

    def __init__(self, channels: int, *, zq_channels: int = 0, num_groups: int = 32, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = _make_norm(channels, zq_channels, num_groups, dtype, param_dtype, rngs)
        self.q = Conv2d(channels, channels, 1, **kw)
        self.k = Conv2d(channels, channels, 1, **kw)
        self.v = Conv2d(channels, channels, 1, **kw)
        self.proj_out = Conv2d(channels, channels, 1, **kw)

    def __call__(self, x: jax.Array, zq: jax.Array | None = None) -> jax.Array:
        B, H, W, C = x.shape
        h = _norm(self.norm, x, zq)
        q, k, v = (m(h).reshape(B, H * W, C) for m in (self.q, self.k, self.v))
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * (C ** -0.5)
        p = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bqk,bkc->bqc", p, v).reshape(B, H, W, C)
        return x + self.proj_out(out)


class DCDownBlock2d(nnx.Module):
    """DC-AE down block, C -> C at half resolution: pixel_unshuffle(conv3x3 C->C/4) plus the
    shortcut pixel_unshuffle(x) averaged over groups of 4 consecutive channels (= 2x2 avg pool)."""

    def __init__(self, channels: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if channels % 4:
            raise ValueError(f"DCDownBlock2d: {channels} channels are not divisible by 4")
        self.conv = Conv2d(channels, channels // 4, 3, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = pixel_unshuffle(self.conv(x), 2)
        s = pixel_unshuffle(x, 2)
        B, H, W, C4 = s.shape
        s = s.reshape(B, H, W, C4 // 4, 4).mean(axis=-1, dtype=jnp.float32).astype(y.dtype)
        return y + s


class DCUpBlock2d(nnx.Module):
    """DC-AE up block, C -> C at double resolution: pixel_shuffle(conv3x3 C->4C) plus the shortcut
    pixel_shuffle(repeat_interleave(x, 4)) (= nearest 2x upsampling)."""

    def __init__(self, channels: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.conv = Conv2d(channels, channels * 4, 3, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = pixel_shuffle(self.conv(x), 2)
        s = pixel_shuffle(jnp.repeat(x, 4, axis=-1), 2)
        return y + s.astype(y.dtype)
