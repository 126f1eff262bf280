"""PatchGAN discriminator (taming-transformers `NLayerDiscriminator`, spec §1.10) and hinge losses.

4x4 convolutions: in -> ndf (stride 2), then n_layers-1 more stride-2 convs doubling the width
(capped at 8*ndf), one stride-1 conv, and a stride-1 conv to one logit per patch; BatchNorm
after the middle convs, LeakyReLU 0.2. BatchNorm here always uses the batch's statistics:
the discriminator only ever runs in training, where PyTorch's BatchNorm does the same, so
no running averages are kept.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def _conv(cin: int, cout: int, stride: int, bias: bool, rngs: nnx.Rngs) -> nnx.Conv:
    return nnx.Conv(cin, cout, kernel_size=(4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)),
                    use_bias=bias, rngs=rngs,
                    kernel_init=nnx.with_partitioning(nnx.initializers.normal(0.02), (None, None, None, None)),
                    bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (None,)))


class BatchStatNorm(nnx.Module):
    """BatchNorm with batch statistics only (training-mode torch BatchNorm2d, eps 1e-5)."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        del rngs
        # taming initialises BatchNorm weights N(1, 0.02); ones is the deterministic centre.
        self.scale = nnx.Param(jnp.ones((channels,)), out_sharding=("norm",))
        self.bias = nnx.Param(jnp.zeros((channels,)), out_sharding=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mu = x32.mean((0, 1, 2))
        var = x32.var((0, 1, 2))
        return ((x32 - mu) * jax.lax.rsqrt(var + 1e-5) * self.scale[...] + self.bias[...]).astype(x.dtype)


class PatchGAN(nnx.Module):
    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3, *, rngs: nnx.Rngs):
        self.convs = nnx.List([_conv(in_channels, ndf, 2, True, rngs)])
        self.norms = nnx.List([])
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            self.convs.append(_conv(ndf * prev, ndf * mult, stride, False, rngs))
            self.norms.append(BatchStatNorm(ndf * mult, rngs=rngs))
        self.out = _conv(ndf * mult, 1, 1, True, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Images [B,H,W,C] -> patch logits [B,h,w,1]."""
        h = jax.nn.leaky_relu(self.convs[0](x), 0.2)
        for conv, norm in zip(self.convs[1:], self.norms):
            h = jax.nn.leaky_relu(norm(conv(h)), 0.2)
        return self.out(h)


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def hinge_g_loss(logits_fake: jax.Array) -> jax.Array:
    return -jnp.mean(logits_fake)
