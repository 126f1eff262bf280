"""Dense projection with multi-axis input/output shapes, computed as one 2-D matmul.

Kernels keep their logical per-axis shape (e.g. [D, N, H] for a query projection, so each
axis has its own sharding name and the HF converter maps them directly), but the product
is taken on [tokens, prod(in)] x [prod(in), prod(out)]. XLA:CPU ran the backward pass of the
equivalent 3-D einsum ('btd,dnh->btnh') at 89 GFLOP/s against 154 for the 2-D form on
the small config's MLP (bench/train_step.py figures in the README); on TPU/GPU the two compile alike.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


class Dense(nnx.Module):
    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...], *, axes: tuple[str, ...],
                 use_bias: bool = False, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs,
                 init=nnx.initializers.normal(0.02)):
        self.in_shape, self.out_shape, self.dtype = tuple(in_shape), tuple(out_shape), dtype
        kernel_init = nnx.with_partitioning(init, axes)
        self.kernel = nnx.Param(kernel_init(rngs.params(), self.in_shape + self.out_shape, param_dtype))
        if use_bias:
            bias_init = nnx.with_partitioning(nnx.initializers.zeros_init(), axes[len(self.in_shape):])
            self.bias = nnx.Param(bias_init(rngs.params(), self.out_shape, param_dtype))
        else:
            self.bias = None

    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = len(self.in_shape)
        lead = x.shape[:-n_in]
        k_in, k_out = math.prod(self.in_shape), math.prod(self.out_shape)
        y = x.reshape(-1, k_in).astype(self.dtype) @ self.kernel[...].astype(self.dtype).reshape(k_in, k_out)
        y = y.reshape(*lead, *self.out_shape)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y
