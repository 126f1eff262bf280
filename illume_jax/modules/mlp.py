"""Gated MLP (SwiGLU) of Qwen2 / LLaMA: down(silu(gate(x)) * up(x))."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from illume_jax.sharding import constrain


class GatedMLP(nnx.Module):
    def __init__(self, d_model: int, mlp_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)

        def proj(shape, axes):
            return nnx.Einsum("btd,df->btf" if axes[0] == "embed" else "btf,fd->btd", shape,
                              dtype=dtype, param_dtype=param_dtype,
                              kernel_init=nnx.with_partitioning(init, axes), rngs=rngs)

        self.gate_proj = proj((d_model, mlp_dim), ("embed", "mlp"))
        self.up_proj = proj((d_model, mlp_dim), ("embed", "mlp"))
        self.down_proj = proj((mlp_dim, d_model), ("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        h = constrain(h, "batch", "act_seq", "act_mlp")
        return self.down_proj(h)
