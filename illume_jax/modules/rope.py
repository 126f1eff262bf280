"""Rotary position embeddings, HF "rotate-half" convention: 1-D (the LLM's) and 2-D (the Qwen2-VL ViT's).

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


# --- 2-D vision RoPE (Qwen2-VL ViT) -------------------------------------------------------

def vision_rope_frequencies(head_dim: int, theta: float = 10_000.0) -> jax.Array:
    """Qwen2-VL vision inv_freq: rotary dim = H/2, so H/4 frequencies theta^(-2i/(H/2))."""
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head_dim divisible by 4, got {head_dim}")
    dim = head_dim // 2
    return 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))


def vision_rope_angles(positions: jax.Array, head_dim: int, theta: float = 10_000.0) -> jax.Array:
    """positions [..., 2] int (row, col) -> angles [..., H/2] fp32: H/4 row angles, then H/4 col angles."""
    freqs = vision_rope_frequencies(head_dim, theta)
    angles = positions.astype(jnp.float32)[..., None] * freqs  # [..., 2, H/4]
    return angles.reshape(*positions.shape[:-1], head_dim // 2)


def apply_rope_2d(x: jax.Array, positions: jax.Array, theta: float = 10_000.0) -> jax.Array:
    """Qwen2-VL 2-D rotary embedding. x: [B, T, N, H]; positions: [B, T, 2] (row, col).

    The H/2 angles are duplicated to H (cos/sin = cat(a, a)) and applied rotate-half style,
    in fp32, result cast back to x.dtype (as HF `apply_rotary_pos_emb_vision`).
    """
    head_dim = x.shape[-1]
    angles = vision_rope_angles(positions, head_dim, theta)  # [B,T,H/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : head_dim // 2], x32[..., head_dim // 2:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
