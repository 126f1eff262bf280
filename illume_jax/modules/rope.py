"""Rotary position embeddings (1-D, the LLM's), HF "rotate-half" convention.

HF Qwen2/LLaMA split the head dim into two halves (not interleaved pairs); converted LLaMA
weights already carry the permutation that makes this equivalent to the original paper.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_frequencies(head_dim: int, theta: float) -> jax.Array:
    """inv_freq[i] = theta^(-2i/H), i < H/2 (fp32, as HF computes it)."""
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """x: [B, T, N, H]; positions: [B, T] int. Angles in fp32, result in x.dtype."""
    head_dim = x.shape[-1]
    angles = positions.astype(jnp.float32)[..., None] * rope_frequencies(head_dim, theta)  # [B,T,H/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : head_dim // 2], x32[..., head_dim // 2:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
