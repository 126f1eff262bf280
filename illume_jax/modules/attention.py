"""Multi-head / grouped-query attention with four interchangeable kernels.

- 'xla':    `jax.nn.dot_product_attention(implementation='xla')` with a boolean [B,1,T,S]
            mask built from segment ids. The numerical reference; runs anywhere.
- 'cudnn':  cuDNN fused attention on GPU. Full forwards use cuDNN's own causal mask; packed
            rows go through its packed-segment layout (per-row segment offsets and lengths
            derived from the segment ids), so no mask is materialised. Cached prefill and
            decoding steps (queries offset into a key buffer) take the 'xla' path: one query
            over the cache gains nothing from fusion, and cuDNN's fused kernel constrains
            query lengths, dtypes and explicit masks in ways a decode loop should not depend on.
- 'splash': Pallas splash attention on TPU, inside `shard_map` over the mesh (batch over
            data/fsdp, heads over tensor). Causal structure is a static block-sparse mask
            and packing comes from segment ids, so no T×T mask is ever materialised.
            `interpret=True` runs the kernel through the Pallas interpreter on CPU (tests).
- 'cpu':    the 'xla' math one example at a time (`lax.map` over the batch), each example's
            scores recomputed in the backward pass instead of stored. On a CPU host the
            batch-wide fp32 [B,N,T,S] score tensor is memory-bound; one example's fits in cache.
            bench/attention.py: 2.3-7.5x the 'xla' kernel's forward, 1.8-6x its forward+backward
            from 256 tokens up (2 cores). The loop runs over the batch axis, so it is for
            unsharded batches (CPU runs), not for meshes that split the batch. Short rows
            and decode steps (below CPU_LOOP_MIN_SCORES scores per example) take the 'xla' path.
            Causal full forwards longer than 2 x CPU_QUERY_CHUNK run in query chunks that read
            only the keys up to their own end (the upper triangle is skipped).

All take q [B,T,N,H], k/v [B,S,K,H] with N % K == 0 (GQA), q pre-RoPE'd, and return
[B,T,N,H]. Scaling is 1/sqrt(H) (HF Qwen2/LLaMA).

`attend(..., causal=False)` is bidirectional (vision encoders): with segment ids it is
block-diagonal (each token sees exactly the tokens of its own segment, like Qwen2-VL's
cu_seqlens), without them plain full attention. Padding (segment 0) attends only to
padding there, so no query row is fully masked and every kernel stays finite.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

IMPLEMENTATIONS = ("xla", "cudnn", "splash", "cpu")
# 'cpu' loops over examples only when one example's scores (N*T*S) are at least this many: a
# decode step (T = 1, S = 640, 4 heads) ran 2.5x slower looped, while 4 heads x 256² ran 1.8x faster.
CPU_LOOP_MIN_SCORES = 1 << 16
# Query-chunk length of the 'cpu' kernel's causal full forwards (rows longer than two chunks);
# 128 was as fast as or faster than 256 and 512 at every length measured (512 to 2,432).
CPU_QUERY_CHUNK = 128


def causal_segment_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array,
                        q_slots: jax.Array, kv_slots: jax.Array) -> jax.Array:
    """Boolean [B,1,T,S]: same non-zero segment and key slot <= query slot.

    Slots are positions in the (possibly cached) sequence buffer, not RoPE positions, so
    left padding and packing both work. Segment id 0 marks padding / empty cache rows.
    """
    same = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (kv_segment_ids[:, None, :] != 0)
    causal = kv_slots[..., None, :] <= q_slots[..., :, None]
    if causal.ndim == 2:
        causal = causal[None]
    return (same & causal)[:, None]


def segment_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array) -> jax.Array:
    """Boolean [B,1,T,S] block-diagonal mask for bidirectional attention: same segment id.

    Padding (0) matches only padding, so padded queries never have an empty row.
    """
    return (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, q_segment_ids: jax.Array | None = None,
           kv_segment_ids: jax.Array | None = None, q_offset: jax.Array | int = 0,
           implementation: str = "xla", splash_interpret: bool = False, causal: bool = True) -> jax.Array:
    """Attention of T queries over S keys; causal unless `causal=False`.

    q_offset: slot of the first query within the key buffer (0 for a full forward; the
    cache write index while decoding). Segment ids default to "one segment, no padding".
    With causal=False q_offset is ignored and the mask is block-diagonal over segments.
    """
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    if N % K:
        raise ValueError(f"attention: {N} query heads are not a multiple of {K} kv heads")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}: expected one of {IMPLEMENTATIONS}")
    if implementation == "cpu":
        if N * T * S >= CPU_LOOP_MIN_SCORES:
            return _attend_per_example(q, k, v, q_segment_ids, kv_segment_ids, q_offset, causal)
        implementation = "xla"  # decode steps, short rows: the batched path is faster there
    if not causal:
        return _attend_bidirectional(q, k, v, q_segment_ids, kv_segment_ids, implementation, splash_interpret)
    full_forward = isinstance(q_offset, int) and q_offset == 0 and S == T
    if implementation == "splash":
        if not full_forward:
            raise ValueError("splash attention is for full-sequence forwards; decode with 'xla' or 'cudnn'")
        return _splash(q, k, v, q_segment_ids, interpret=splash_interpret)
    if implementation == "cudnn" and full_forward:
        if q_segment_ids is None:
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
        return _cudnn_packed(q, k, v, q_segment_ids)
    if q_segment_ids is None:
        q_segment_ids = jnp.ones((B, T), jnp.int32)
    if kv_segment_ids is None:
        kv_segment_ids = q_segment_ids if S == T else jnp.ones((B, S), jnp.int32)
    q_slots = q_offset + jnp.arange(T, dtype=jnp.int32)
    mask = causal_segment_mask(q_segment_ids, kv_segment_ids, q_slots, jnp.arange(S, dtype=jnp.int32))
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


def _attend_bidirectional(q, k, v, q_segment_ids, kv_segment_ids, implementation, splash_interpret):
    B, T = q.shape[:2]
    S = k.shape[1]
    if implementation == "splash":
        if S != T:
            raise ValueError("splash attention needs as many keys as queries")
        if kv_segment_ids is not None and kv_segment_ids is not q_segment_ids:
            raise ValueError("splash attention takes one set of segment ids (queries and keys alike)")
        return _splash(q, k, v, q_segment_ids, interpret=splash_interpret, causal=False)
    impl = "cudnn" if implementation == "cudnn" else "xla"
    if q_segment_ids is None and kv_segment_ids is None:
        return jax.nn.dot_product_attention(q, k, v, implementation=impl)
    if q_segment_ids is None:
        q_segment_ids = jnp.ones((B, T), jnp.int32)
    if kv_segment_ids is None:
        kv_segment_ids = q_segment_ids if S == T else jnp.ones((B, S), jnp.int32)
    mask = segment_mask(q_segment_ids, kv_segment_ids)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)


def _attend_per_example(q, k, v, q_segment_ids, kv_segment_ids, q_offset, causal):
    """The 'cpu' kernel: `jax.nn.dot_product_attention`'s xla math (fp32 logits, softmax, probs
    cast to the value dtype) for one example at a time, its mask built per example from the
    same rules as `causal_segment_mask` / `segment_mask`."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    masked = causal or q_segment_ids is not None or kv_segment_ids is not None
    if masked:
        if q_segment_ids is None:
            q_segment_ids = jnp.ones((B, T), jnp.int32)
        if kv_segment_ids is None:
            kv_segment_ids = q_segment_ids if S == T else jnp.ones((B, S), jnp.int32)
    q_slots = q_offset + jnp.arange(T, dtype=jnp.int32)
    kv_slots = jnp.arange(S, dtype=jnp.int32)
    # A causal full forward in query chunks: chunk c reads only the keys up to its own end, so the
    # masked upper triangle is mostly not computed (1,408 tokens in chunks of 128: 55% of the
    # scores). Static slices, exact for every query that has a key to attend to (padding queries
    # have none; what they return is unspecified and nothing reads it). Forward + backward on 2
    # cores, 16 rows, 4/2 heads of 32: 1.3x / 1.8x / 2.3x / 2.3x faster at 512 / 768 / 1,408 / 2,432.
    chunked = causal and isinstance(q_offset, int) and q_offset == 0 and S == T and T > 2 * CPU_QUERY_CHUNK
    bounds = ([(a, min(a + CPU_QUERY_CHUNK, T)) for a in range(0, T, CPU_QUERY_CHUNK)] if chunked
              else [(0, T)])

    def one(args):
        qi, ki, vi, q_seg, kv_seg = args                      # [T,N,H], [S,K,H], [S,K,H], [T] | None, [S] | None
        if K != N:  # GQA: query head n reads kv head n // (N/K). Repeating one example's k/v is cheap;
            # a grouped [T,K,G,H] einsum lowered to a 7x slower dot on CPU.
            ki, vi = jnp.repeat(ki, N // K, axis=1), jnp.repeat(vi, N // K, axis=1)
        outs = []
        for a, b in bounds:
            e = b if chunked else S                           # keys this query chunk can see
            logits = jnp.einsum("tnh,snh->nts", qi[a:b], ki[:e], preferred_element_type=jnp.float32) * (H ** -0.5)
            if masked:
                if causal:
                    mask = causal_segment_mask(q_seg[None, a:b], kv_seg[None, :e], q_slots[a:b], kv_slots[:e])[0, 0]
                else:
                    mask = segment_mask(q_seg[None], kv_seg[None])[0, 0]
                logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
            probs = jax.nn.softmax(logits, axis=-1).astype(vi.dtype)
            outs.append(jnp.einsum("nts,snh->tnh", probs, vi[:e]))
        return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)

    return jax.lax.map(jax.checkpoint(one), (q, k, v, q_segment_ids, kv_segment_ids))


# cuDNN's packed layout costs memory in proportion to the number of segment slots, so rows
# may hold at most this many packed sequences (the data pipeline's packer enforces it).
CUDNN_MAX_SEGMENTS = 16


def segment_offsets(segment_ids: jax.Array, max_segments: int = CUDNN_MAX_SEGMENTS) -> tuple[jax.Array, jax.Array]:
    """Packed-row description for cuDNN: lengths [B,M] and offsets [B,M+1], -1 = absent.

    Assumes each row holds contiguous segments 1..n (n <= M) followed by padding (0), which
    is what the data pipeline's packer emits.
    """
    B, T = segment_ids.shape
    counts = jax.vmap(lambda row: jnp.bincount(row, length=max_segments + 1))(segment_ids)  # [B, M+1]
    lengths = counts[:, 1:].astype(jnp.int32)  # [B,M]: tokens of segment m+1; id 0 = padding
    starts = jnp.cumsum(lengths, axis=1) - lengths
    present = lengths > 0
    lengths = jnp.where(present, lengths, -1)
    offsets = jnp.where(present, starts, -1)
    offsets = jnp.concatenate([offsets, jnp.full((B, 1), -1, jnp.int32)], axis=1)
    return lengths, offsets


def _cudnn_packed(q, k, v, segment_ids):
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention as cudnn_attention
    lengths, offsets = segment_offsets(segment_ids)
    # cuDNN leaves the outputs and the dq/dk/dv of padding positions (outside every segment)
    # unwritten: on an H200 a padded batch trained with NaN gradients from the first step. Selects
    # on the way in and out drop whatever is there, forwards and backwards (a select's gradient
    # is a select, so a NaN in the unused branch never reaches the weights).
    valid = (segment_ids > 0)[:, :, None, None]
    q, k, v = (jnp.where(valid, x, jnp.zeros((), x.dtype)) for x in (q, k, v))
    out = cudnn_attention(q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets, kv_offsets=offsets,
                          scale=q.shape[-1] ** -0.5, mask_type=MaskType.PADDING_CAUSAL)
    return jnp.where(valid, out, jnp.zeros((), out.dtype))


@functools.lru_cache(maxsize=32)
def _splash_kernel(num_heads: int, seq_len: int, interpret: bool, causal: bool = True):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
    block = min(512, seq_len)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                          block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                          block_q_dq=block, block_kv_dq=block)
    make = sm.CausalMask if causal else sm.FullMask
    mask = sm.MultiHeadMask([make((seq_len, seq_len)) for _ in range(num_heads)])
    return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash(q, k, v, segment_ids, *, interpret: bool, causal: bool = True):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    B, T, N, H = q.shape
    if segment_ids is None:
        segment_ids = jnp.ones((B, T), jnp.int32)
    # Splash expects [heads, T, H] per example and unscaled logits.
    qh = jnp.swapaxes(q * (H ** -0.5), 1, 2)
    kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)

    def per_shard(qs, ks, vs, seg):
        kernel = _splash_kernel(qs.shape[1], T, interpret, causal)
        one = lambda a, b, c, s: kernel(a, b, c, segment_ids=sk.SegmentIds(q=s, kv=s))
        return jax.vmap(one)(qs, ks, vs, seg)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        out = per_shard(qh, kh, vh, segment_ids)
    else:
        heads = P(("data", "fsdp"), "tensor", None, None)
        out = jax.shard_map(per_shard, mesh=mesh, in_specs=(heads, heads, heads, P(("data", "fsdp"), None)),
                            out_specs=heads, check_vma=False)(qh, kh, vh, segment_ids)
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)
