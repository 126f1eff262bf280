"""Gated MLP (SwiGLU) of Qwen2 / LLaMA: down(silu(gate(x)) * up(x))."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from illume_jax.modules.linear import Dense
from illume_jax.sharding import constrain


class GatedMLP(nnx.Module):
    def __init__(self, d_model: int, mlp_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        dt = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Dense((d_model,), (mlp_dim,), axes=("embed", "mlp"), **dt)
        self.up_proj = Dense((d_model,), (mlp_dim,), axes=("embed", "mlp"), **dt)
        self.down_proj = Dense((mlp_dim,), (d_model,), axes=("mlp", "embed"), **dt)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        h = constrain(h, "batch", "act_seq", "act_mlp")
        return self.down_proj(h)
