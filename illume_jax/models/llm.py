"""Decoder-only LLM for both ILLUME families: Qwen2/Qwen2.5 (ILLUME+) and LLaMA/Vicuna (ILLUME).

Matches HF `Qwen2ForCausalLM` (GQA, q/k/v bias, RMSNorm, SwiGLU, rotate-half RoPE, tied or
untied head) and `LlamaForCausalLM` (no bias, usually MHA); the two differ only in config.
The vocabulary is the text vocabulary plus extra rows for ILLUME's visual and structure
tokens (`vocab_size` total rows, `text_vocab_size` text rows; spec §3.2), one shared
embedding / head over all of them.

Layers are stacked along a leading 'layers' axis (one `nnx.vmap`-created module) and run
with `lax.scan` + a named remat policy, so compile time does not grow with depth. Every
parameter carries logical axis names (see `illume_jax.sharding`).

Parameter paths (used by stage patterns and the converters): `embed/embedding` [V,D],
`layers/input_norm/scale`, `layers/attn/{q,k,v}_proj/{kernel,bias}` [L,D,N|K,H],
`layers/attn/o_proj/kernel` [L,N,H,D], `layers/post_attn_norm/scale`,
`layers/mlp/{gate,up}_proj/kernel` [L,D,F], `layers/mlp/down_proj/kernel` [L,F,D],
`final_norm/scale`, `lm_head/kernel` [D,V] (absent when tied).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from illume_jax.modules.attention import IMPLEMENTATIONS, attend
from illume_jax.modules.embedding import Embed
from illume_jax.modules.linear import Dense
from illume_jax.modules.mlp import GatedMLP
from illume_jax.modules.norms import RMSNorm
from illume_jax.modules.rope import apply_rope
from illume_jax.sharding import constrain

FAMILIES = ("qwen2", "llama")
# Named remat policies, from least to most memory (MaxText's naming idea, jax's policies).
REMAT_POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "none": None,  # no rematerialisation
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class LLMConfig:
    family: str = "qwen2"
    text_vocab_size: int = 512
    vocab_size: int = 512
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    mlp_dim: int = 128
    rope_theta: float = 1_000_000.0
    norm_eps: float = 1e-6
    qkv_bias: bool = True
    tie_embeddings: bool = True
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention: str = "xla"
    remat: str = "nothing_saveable"
    scan_layers: bool = True
    # Pallas interpreter for the splash kernel (CPU tests only).
    splash_interpret: bool = False

    def __post_init__(self):
        def bad(key, value, allowed):
            raise ValueError(f"config.model.{key}={value!r}: expected {allowed}")
        if self.family not in FAMILIES:
            bad("family", self.family, f"one of {FAMILIES}")
        if self.attention not in IMPLEMENTATIONS:
            bad("attention", self.attention, f"one of {IMPLEMENTATIONS}")
        if self.remat not in REMAT_POLICIES:
            bad("remat", self.remat, f"one of {tuple(REMAT_POLICIES)}")
        for key in ("dtype", "param_dtype"):
            if getattr(self, key) not in DTYPES:
                bad(key, getattr(self, key), f"one of {tuple(DTYPES)}")
        for key in ("text_vocab_size", "vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads",
                    "head_dim", "mlp_dim"):
            if int(getattr(self, key)) <= 0:
                bad(key, getattr(self, key), "a positive integer")
        if self.vocab_size < self.text_vocab_size:
            bad("vocab_size", self.vocab_size, f">= text_vocab_size ({self.text_vocab_size})")
        if self.num_heads % self.num_kv_heads:
            bad("num_heads", self.num_heads, f"a multiple of num_kv_heads ({self.num_kv_heads})")

    @classmethod
    def from_config(cls, config: Any) -> "LLMConfig":
        """From `config.model` (a ConfigDict or mapping); unknown keys are an error."""
        items = dict(config.items() if hasattr(config, "items") else config)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(items) - known)
        if unknown:
            raise ValueError(f"config.model has unknown keys {unknown}; allowed: {sorted(known)}")
        return cls(**items)

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return DTYPES[self.param_dtype]

    def num_params(self) -> int:
        D, F, L, V = self.d_model, self.mlp_dim, self.num_layers, self.vocab_size
        qo = 2 * D * self.num_heads * self.head_dim
        kv = 2 * D * self.num_kv_heads * self.head_dim
        bias = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim if self.qkv_bias else 0
        per_layer = qo + kv + bias + 3 * D * F + 2 * D
        return L * per_layer + V * D * (1 if self.tie_embeddings else 2) + D


@struct.dataclass
class KVCache:
    """Preallocated decode cache. k, v: [L,B,S,K,H]; segment_ids: [B,S] (0 = empty or padding);
    index: next slot to write (scalar int32). A pytree, so it rides in `lax.while_loop` carries
    and can be donated."""
    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array
    index: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


@struct.dataclass
class LayerKVCache:
    """The decode cache as one buffer per layer (k, v: tuples of L arrays [B,S,K,H]), for step
    loops that run the layers unrolled over per-layer weights (`LLM.unstacked_layers`). Each
    step writes one slot of each buffer in place; a scan over the stacked [L,...] cache instead
    rebuilds the whole cache from the scan's outputs every step."""
    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    segment_ids: jax.Array
    index: jax.Array

    @classmethod
    def from_stacked(cls, cache: KVCache) -> "LayerKVCache":
        L = cache.k.shape[0]
        return cls(k=tuple(cache.k[i] for i in range(L)), v=tuple(cache.v[i] for i in range(L)),
                   segment_ids=cache.segment_ids, index=cache.index)


def unstack_layers_by_default() -> bool:
    """Whether decode loops run the layers unrolled over per-layer weight copies
    (`LLM.unstacked_layers` + `LayerKVCache`): on CPU, where `bench/generate.py --compare-scan`'s
    small model generates 1.2x (batch 1) to 1.45x (batch 8) faster that way; not on accelerators,
    where the scan's weight slices fuse into the matmuls and the copies would double the
    weights' memory."""
    return jax.default_backend() == "cpu"


def _param(init, rngs, shape, axes, dtype):
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=axes)


class Attention(nnx.Module):
    def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        D, N, K, H = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        dt = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)

        def proj(heads, axis_name):
            return Dense((D,), (heads, H), axes=("embed", axis_name, "head_dim"), use_bias=cfg.qkv_bias, **dt)

        self.q_proj = proj(N, "heads")
        self.k_proj = proj(K, "kv_heads")
        self.v_proj = proj(K, "kv_heads")
        self.o_proj = Dense((N, H), (D,), axes=("heads", "head_dim", "embed"), **dt)

    def qkv(self, x, positions):
        q = apply_rope(self.q_proj(x), positions, self.cfg.rope_theta)
        k = apply_rope(self.k_proj(x), positions, self.cfg.rope_theta)
        v = self.v_proj(x)
        q = constrain(q, "batch", "act_seq", "act_heads", "head_dim")
        k = constrain(k, "batch", "act_seq", "act_kv_heads", "head_dim")
        v = constrain(v, "batch", "act_seq", "act_kv_heads", "head_dim")
        return q, k, v

    def __call__(self, x, positions, segment_ids):
        q, k, v = self.qkv(x, positions)
        out = attend(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                     implementation=self.cfg.attention, splash_interpret=self.cfg.splash_interpret)
        return self.o_proj(out)

    def decode(self, x, positions, segment_ids, k_cache, v_cache, cache_segment_ids, index):
        """Writes this step's k/v at `index` and attends over the whole cache."""
        q, k, v = self.qkv(x, positions)
        k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
        v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
        impl = "xla" if self.cfg.attention == "splash" else self.cfg.attention
        out = attend(q, k_cache.astype(q.dtype), v_cache.astype(q.dtype), q_segment_ids=segment_ids,
                     kv_segment_ids=cache_segment_ids, q_offset=index, implementation=impl)
        return self.o_proj(out), k_cache, v_cache


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=cfg.weight_dtype)
        self.attn = Attention(cfg, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=cfg.weight_dtype)
        self.mlp = GatedMLP(cfg.d_model, cfg.mlp_dim, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
                            rngs=rngs)

    def __call__(self, x, positions, segment_ids):
        x = x + self.attn(self.input_norm(x), positions, segment_ids)
        x = x + self.mlp(self.post_attn_norm(x))
        return constrain(x, "batch", "act_seq", "act_embed")

    def decode(self, x, positions, segment_ids, k_cache, v_cache, cache_segment_ids, index):
        h, k_cache, v_cache = self.attn.decode(self.input_norm(x), positions, segment_ids, k_cache, v_cache,
                                               cache_segment_ids, index)
        x = x + h
        x = x + self.mlp(self.post_attn_norm(x))
        return x, k_cache, v_cache


class LLM(nnx.Module):
    def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype,
                           rngs=rngs)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(r):
            return DecoderLayer(cfg, rngs=r)

        self.layers = make_layers(rngs)
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=cfg.weight_dtype)
        if not cfg.tie_embeddings:
            self.lm_head = Dense((cfg.d_model,), (cfg.vocab_size,), axes=("embed", "vocab"),
                                 dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs)

    # -- pieces ---------------------------------------------------------------------------
    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """[B,T] int -> [B,T,D] in the compute dtype (also used to splice image features)."""
        return constrain(self.embed(tokens), "batch", "act_seq", "act_embed")

    def logits(self, x: jax.Array) -> jax.Array:
        """Final norm + head; logits in fp32 (softmax and loss need the range)."""
        return self.head(self.final_norm(x))

    def head(self, x: jax.Array) -> jax.Array:
        """The head alone, on final-normed hidden states x [..., D] -> fp32 logits over every row.
        (Linear: CFG can combine the normed states of its two branches before it.)"""
        if self.cfg.tie_embeddings:
            table = self.embed.embedding[...].astype(x.dtype)
            # 2-D product (see modules/linear.py for why): [B*T, D] x [D, V].
            out = jnp.matmul(x.reshape(-1, x.shape[-1]), table.T, preferred_element_type=jnp.float32)
            out = out.reshape(*x.shape[:-1], -1)
        else:
            out = self.lm_head(x).astype(jnp.float32)
        return constrain(out, "batch", "act_seq", "act_vocab")

    def head_rows(self, start: jax.Array | int, size: int) -> jax.Array:
        """The head's weights for ids [start, start + size) as [size, D] (a copy: make it once)."""
        if self.cfg.tie_embeddings:
            return jax.lax.dynamic_slice_in_dim(self.embed.embedding[...], start, size, axis=0)
        return jax.lax.dynamic_slice_in_dim(self.lm_head.kernel[...], start, size, axis=1).T

    def logits_from_rows(self, x: jax.Array, rows: jax.Array, *, normed: bool = False) -> jax.Array:
        """x [N, D] (pre-norm, or final-normed with `normed`) -> logits [N, size] fp32 of the ids
        whose head rows are `rows`."""
        x = x if normed else self.final_norm(x)
        return jnp.matmul(x, rows.astype(x.dtype).T, preferred_element_type=jnp.float32)

    def logits_window(self, x: jax.Array, start: jax.Array | int, size: int) -> jax.Array:
        """Logits of ids [start, start + size) only: x [N, D] (pre-norm) -> [N, size] fp32.

        Decoding uses it when every row can only emit ids of one range (an image level's
        codes): the head is most of a small model's per-token cost at ILLUME's 283k rows.
        The slice is a copy; loops should take `head_rows` once and use `logits_from_rows`."""
        return self.logits_from_rows(x, self.head_rows(start, size))

    def _scan(self, fn, carry, xs):
        """Runs `fn(layer, carry, xs_i) -> (carry, ys_i)` over the stacked layers."""
        graphdef, state = nnx.split(self.layers)
        policy = REMAT_POLICIES[self.cfg.remat]

        def body(c, inputs):
            layer_state, x_i = inputs
            return fn(nnx.merge(graphdef, layer_state), c, x_i)

        if self.cfg.remat != "none":
            # prevent_cse=False: under scan CSE cannot undo the remat (big_vision does the same).
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        if self.cfg.scan_layers:
            return jax.lax.scan(body, carry, (state, xs))
        ys = []
        for i in range(self.cfg.num_layers):
            carry, y = body(carry, jax.tree.map(lambda a: a[i], (state, xs)))
            ys.append(y)
        return carry, (None if ys[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *ys))

    # -- full forward ---------------------------------------------------------------------
    def __call__(self, tokens: jax.Array | None = None, *, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, inputs_embeds: jax.Array | None = None,
                 return_hidden: bool = False) -> jax.Array:
        """tokens [B,T] (or inputs_embeds [B,T,D]) -> logits [B,T,V] fp32.

        positions default to 0..T-1; segment_ids (packing; 0 = padding) default to one segment.
        """
        x = self.embed_tokens(tokens) if inputs_embeds is None else inputs_embeds.astype(self.cfg.compute_dtype)
        B, T = x.shape[:2]
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))

        def step(layer, h, _):
            return layer(h, positions, segment_ids), None

        x, _ = self._scan(step, x, None)
        return x if return_hidden else self.logits(x)

    # -- cached decoding ------------------------------------------------------------------
    def init_cache(self, batch_size: int, max_len: int, dtype=None) -> KVCache:
        c = self.cfg
        shape = (c.num_layers, batch_size, max_len, c.num_kv_heads, c.head_dim)
        dtype = dtype or c.compute_dtype
        zeros = constrain(jnp.zeros(shape, dtype), "layers", "batch", "cache_len", "act_kv_heads", "head_dim")
        return KVCache(k=zeros, v=zeros, segment_ids=jnp.zeros((batch_size, max_len), jnp.int32),
                       index=jnp.zeros((), jnp.int32))

    def unstacked_layers(self) -> tuple[DecoderLayer, ...]:
        """The layers as L modules with their own weight arrays, for `decode` with a
        `LayerKVCache`. This copies every layer's weights: make it once per generation call,
        not per step. Why: inside a decode loop XLA:CPU copies a layer's slice of the stacked
        weights on every step (a scan's dynamic slice, or a static index alike): the 8 layers of
        `bench/generate.py`'s small model took 8.8 ms per step at 2 rows (38.7 at 16) scanned,
        6.0 (22.0) unrolled on their own arrays. Accelerators fuse the slice into the matmul,
        and there the copy would double the weights' memory."""
        graphdef, state = nnx.split(self.layers)
        return tuple(nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
                     for i in range(self.cfg.num_layers))

    def loop_cache(self, cache: KVCache, unstack_layers: bool | None = None
                   ) -> tuple[KVCache | LayerKVCache, tuple[DecoderLayer, ...] | None]:
        """(cache, layers) for a decode loop's steps, from the prefill's cache: a `LayerKVCache`
        and `unstacked_layers()` when unstacking (default: `unstack_layers_by_default()`), else
        the cache as it is and None (scanned layers). Call once per loop, outside it."""
        if unstack_layers_by_default() if unstack_layers is None else unstack_layers:
            return LayerKVCache.from_stacked(cache), self.unstacked_layers()
        return cache, None

    def decode(self, tokens: jax.Array | None, cache: KVCache | LayerKVCache, *, positions: jax.Array,
               segment_ids: jax.Array | None = None, inputs_embeds: jax.Array | None = None,
               return_hidden: bool = False, layers: tuple[DecoderLayer, ...] | None = None
               ) -> tuple[jax.Array, KVCache | LayerKVCache]:
        """Feeds T new tokens (prefill: the prompt; then T=1 per step) at slot `cache.index`.

        positions [B,T]: RoPE positions (per row, so left-padded rows start at 0);
        segment_ids [B,T]: 1 for real tokens, 0 for padding. Returns logits [B,T,V] fp32
        (or, with return_hidden, the pre-norm hidden states [B,T,D] for `logits_window`).

        With a `KVCache` the stacked layers run as a scan; with a `LayerKVCache`, `layers`
        (from `unstacked_layers`) run unrolled, each on its own cache buffers: the same
        numbers, faster steps on CPU.
        """
        x = self.embed_tokens(tokens) if inputs_embeds is None else inputs_embeds.astype(self.cfg.compute_dtype)
        B, T = x.shape[:2]
        if segment_ids is None:
            segment_ids = jnp.ones((B, T), jnp.int32)
        cache_seg = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids.astype(jnp.int32), (0, cache.index))

        if isinstance(cache, LayerKVCache):
            if layers is None or len(layers) != len(cache.k):
                raise ValueError(f"LLM.decode with a LayerKVCache of {len(cache.k)} layers needs layers= from "
                                 f"unstacked_layers() ({self.cfg.num_layers}), got "
                                 f"{None if layers is None else len(layers)}")
            ks, vs = [], []
            for layer, k, v in zip(layers, cache.k, cache.v):
                x, k, v = layer.decode(x, positions, segment_ids, k, v, cache_seg, cache.index)
                ks.append(k)
                vs.append(v)
            new_cache = LayerKVCache(k=tuple(ks), v=tuple(vs), segment_ids=cache_seg, index=cache.index + T)
        else:
            if layers is not None:
                raise ValueError("LLM.decode: layers= goes with a LayerKVCache (LayerKVCache.from_stacked(cache))")

            def step(layer, h, kv):
                h, k, v = layer.decode(h, positions, segment_ids, kv[0], kv[1], cache_seg, cache.index)
                return h, (k, v)

            x, (k, v) = self._scan(step, x, (cache.k, cache.v))
            new_cache = KVCache(k=k, v=v, segment_ids=cache_seg, index=cache.index + T)
        return (x if return_hidden else self.logits(x)), new_cache


def create_llm(cfg: LLMConfig, mesh: jax.sharding.Mesh | None = None, seed: int = 0) -> LLM:
    """Creates the model with every parameter already sharded (init runs inside jit).

    Without a mesh the model lives on one device (a 1x1x1 mesh: eager sharding needs one).
    """
    from illume_jax.sharding import make_mesh, use_mesh

    @nnx.jit
    def make():
        return LLM(cfg, rngs=nnx.Rngs(seed))

    if mesh is None:
        mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    with use_mesh(mesh):
        return make()
