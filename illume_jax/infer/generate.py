"""Jitted text decoding: prefill once, then one token per `lax.while_loop` iteration.

The whole loop is one compiled program (flax gemma / GIVT style): the KV cache is
preallocated for prompt + new tokens and carried through the loop, the step counter is
traced, so prompts of one padded length and any `max_new_tokens` up to the cache size
reuse one compilation. Prompts are left-padded; `prompt_mask` marks real tokens.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from illume_jax.infer.module_jit import module_jit
from illume_jax.models.llm import LLM


def sample_token(logits: jax.Array, rng: jax.Array, temperature: float | jax.Array) -> jax.Array:
    """Greedy when temperature == 0, else categorical at that temperature. logits [B,V]."""
    temperature = jnp.asarray(temperature, jnp.float32)
    greedy = jnp.argmax(logits, axis=-1)
    sampled = jax.random.categorical(rng, logits / jnp.maximum(temperature, 1e-6), axis=-1)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


@functools.partial(module_jit, static_argnames=("cache_len", "unstack_layers"))
def generate(model: LLM, prompt: jax.Array, prompt_mask: jax.Array, rng: jax.Array, *, cache_len: int,
             max_new_tokens: jax.Array | int, temperature: float | jax.Array = 0.0,
             eos_id: int | jax.Array = -1, unstack_layers: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """prompt [B,P] int32 (left-padded), prompt_mask [B,P] (1 = real token).

    Returns (tokens [B, cache_len - P] with new tokens then zeros, per-position logits of
    the whole buffer [B, cache_len, V] for checking). Rows stop after `eos_id`.
    unstack_layers: steps on per-layer weights and cache buffers (`LLM.unstacked_layers`;
    default: on CPU only), the same numbers.
    """
    B, P = prompt.shape
    n_new = cache_len - P
    seg = prompt_mask.astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0)
    cache = model.init_cache(B, cache_len)
    logits, cache = model.decode(prompt, cache, positions=positions, segment_ids=seg)
    V = logits.shape[-1]
    all_logits = jnp.zeros((B, cache_len, V), jnp.float32).at[:, :P].set(logits)
    next_pos = positions[:, -1] + 1
    cache, layers = model.loop_cache(cache, unstack_layers)

    def cond(carry):
        i, _, _, _, _, done, _ = carry
        return (i < jnp.minimum(max_new_tokens, n_new)) & ~jnp.all(done)

    def body(carry):
        i, last_logits, pos, out, cache, done, all_logits = carry
        tok = sample_token(last_logits, jax.random.fold_in(rng, i), temperature)
        tok = jnp.where(done, 0, tok)
        out = out.at[:, i].set(tok)
        done = done | (tok == eos_id)
        step_logits, cache = model.decode(tok[:, None], cache, positions=pos[:, None],
                                          segment_ids=jnp.ones((B, 1), jnp.int32), layers=layers)
        all_logits = jax.lax.dynamic_update_slice(all_logits, step_logits, (0, P + i, 0))
        return i + 1, step_logits[:, 0], pos + 1, out, cache, done, all_logits

    init = (jnp.zeros((), jnp.int32), logits[:, -1], next_pos, jnp.zeros((B, n_new), jnp.int32), cache,
            jnp.zeros((B,), bool), all_logits)
    _, _, _, out, _, _, all_logits = jax.lax.while_loop(cond, body, init)
    return out, all_logits
