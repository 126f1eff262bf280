"""Normalisation layers."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):
    """RMSNorm as in HF Qwen2/LLaMA: statistics in fp32, scale applied after casting back.

    Matches `Qwen2RMSNorm` / `LlamaRMSNorm`: `w * (x32 * rsqrt(mean(x32^2) + eps)).astype(x.dtype)`.
    """

    def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        del rngs  # deterministic init (ones); kept for a uniform constructor signature
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * y.astype(x.dtype)
