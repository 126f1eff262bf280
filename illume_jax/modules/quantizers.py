"""Vector quantizers (SimVQ for DualViTok, a plain / EMA VQ for the ILLUME semantic tokenizer).

Inputs are channels-last `[..., dim]`; codes come back with the leading shape `[...]` (int32).

Why it looks like this:
- Non-trainable state (SimVQ's frozen codebook, EMA codebooks and statistics) lives in a
  `Buffer` variable type, not `nnx.Param`, so `nnx.state(model, nnx.Param)` — what the
  optimizers and trainers take — never sees it, while checkpoints (the full state) keep it.
  The frozen codebook is part of the released state dict (spec §1.3): load it, never resample.
- Assignment is always fp32 with HIGHEST-precision matmuls (spec §8.3): a TPU's default fp32
  matmul uses bf16 passes, which flips argmins between near-equal codes. Distances
  `||z||^2 - 2 z.C + ||C||^2` are taken over static chunks of `chunk_size` codes (the released
  98,304-code book is 3 chunks of 32,768), so the [tokens, chunk] distance block bounds memory;
  the running (min, argmin) is carried across chunks with a strict `<`, which keeps torch's
  lowest-index tie-break.
- Codebooks are small (<= 98,304 x 32), so they are replicated: logical names (None, None).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from illume_jax.modules.linear import Dense

_HIGHEST = jax.lax.Precision.HIGHEST


class Buffer(nnx.Variable):
    """Non-trainable module state (frozen codebooks, EMA statistics): kept in checkpoints,
    excluded from `nnx.state(model, nnx.Param)` and hence from gradients and optimizers."""


def _torch_linear_init(key, shape, dtype=jnp.float32):
    """torch nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)); shape is (in, out)."""
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def _l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """torch F.normalize(x, dim=-1): x / max(||x||, eps)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def nearest_code(z: jax.Array, codebook: jax.Array, chunk_size: int = 32768) -> jax.Array:
    """Index of the Euclidean-nearest row of `codebook` [K, D] for every row of `z` [N, D] (fp32).

    Chunks of `chunk_size` codes; full chunks run under `lax.scan`, a shorter last chunk after
    it. Ties resolve to the lowest index (torch argmin / cdist().argmin()).
    """
    z = z.astype(jnp.float32)
    codebook = codebook.astype(jnp.float32)
    num_codes, dim = codebook.shape
    chunk = max(1, min(int(chunk_size), num_codes))
    zz = jnp.sum(z * z, axis=-1, keepdims=True)                          # [N, 1]

    def block(c: jax.Array, offset) -> tuple[jax.Array, jax.Array]:
        cc = jnp.sum(c * c, axis=-1)                                     # [k]
        d = zz - 2.0 * jnp.matmul(z, c.T, precision=_HIGHEST) + cc[None, :]
        i = jnp.argmin(d, axis=-1)
        return jnp.take_along_axis(d, i[:, None], axis=-1)[:, 0], i.astype(jnp.int32) + offset

    n_full = num_codes // chunk
    best_d, best_i = block(codebook[:chunk], 0)
    if n_full > 1:
        rest = codebook[chunk:n_full * chunk].reshape(n_full - 1, chunk, dim)
        offsets = (jnp.arange(1, n_full, dtype=jnp.int32) * chunk)

        def step(carry, xs):
            bd, bi = carry
            d, i = block(*xs)
            better = d < bd
            return (jnp.where(better, d, bd), jnp.where(better, i, bi)), None

        (best_d, best_i), _ = jax.lax.scan(step, (best_d, best_i), (rest, offsets))
    if n_full * chunk < num_codes:
        d, i = block(codebook[n_full * chunk:], n_full * chunk)
        better = d < best_d
        best_i = jnp.where(better, i, best_i)
    return best_i


def _quantize_outputs(z: jax.Array, q: jax.Array, *, beta: float, codebook_loss: bool):
    """Straight-through output and losses for fp32 z, q of the same shape."""
    z_q = z + jax.lax.stop_gradient(q - z)
    commit = jnp.mean((z - jax.lax.stop_gradient(q)) ** 2)
    if codebook_loss:
        cb = jnp.mean((jax.lax.stop_gradient(z) - q) ** 2)
        total = cb + beta * commit
    else:
        cb = jnp.zeros((), jnp.float32)
        total = beta * commit
    return z_q, {"loss": total, "codebook_loss": cb, "commitment_loss": commit}


class SimVQ(nnx.Module):
    """SimVQ (spec §1.3, §1.6): a frozen Gaussian codebook times a trainable linear map.

    `frozen_codebook` [K, D] is a Buffer drawn N(0,1) * D**-0.5; `code_transform.kernel` [D, D] is
    stored (in, out), i.e. torch's `code_transform.weight` transposed, no bias. The effective
    codebook is `C = frozen_codebook @ kernel`.

    `__call__(z)` -> (z_q, indices, losses): z [..., D] (any float dtype), z_q [..., D] in z's
    dtype (straight-through: forward value C[idx], gradient identity to z), indices [...] int32,
    losses {"loss", "codebook_loss", "commitment_loss"} fp32 scalars with
    loss = mean((sg(z) - q)^2) + beta * mean((z - sg(q))^2).
    """

    def __init__(self, num_codes: int, dim: int, *, chunk_size: int = 32768, beta: float = 0.25,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.num_codes, self.dim, self.chunk_size, self.beta = int(num_codes), int(dim), int(chunk_size), beta
        frozen = jax.random.normal(rngs.params(), (num_codes, dim), jnp.float32) * dim ** -0.5
        self.frozen_codebook = Buffer(frozen.astype(param_dtype), out_sharding=(None, None))
        self.code_transform = Dense((dim,), (dim,), axes=(None, None), use_bias=False, param_dtype=param_dtype,
                                    rngs=rngs, init=_torch_linear_init)

    def _transform(self, rows: jax.Array) -> jax.Array:
        return jnp.matmul(rows.astype(jnp.float32), self.code_transform.kernel[...].astype(jnp.float32),
                          precision=_HIGHEST)

    def codebook(self) -> jax.Array:
        """The effective codebook C [K, D] fp32 (precompute it once for inference)."""
        return self._transform(self.frozen_codebook[...])

    def lookup(self, indices: jax.Array) -> jax.Array:
        """Codes [...] -> vectors [..., D] fp32: gather frozen rows, then transform (= C[indices])."""
        return self._transform(jnp.take(self.frozen_codebook[...], indices, axis=0))

    def __call__(self, z: jax.Array):
        if z.shape[-1] != self.dim:
            raise ValueError(f"SimVQ: expected [..., {self.dim}], got {z.shape}")
        lead = z.shape[:-1]
        z32 = z.astype(jnp.float32).reshape(-1, self.dim)
        idx = nearest_code(jax.lax.stop_gradient(z32), jax.lax.stop_gradient(self.codebook()), self.chunk_size)
        q = self.lookup(idx)                      # gradient reaches code_transform through here
        z_q, losses = _quantize_outputs(z32, q, beta=self.beta, codebook_loss=True)
        return z_q.reshape(z.shape).astype(z.dtype), idx.reshape(lead), losses

    def squared_error(self, z: jax.Array, indices: jax.Array) -> jax.Array:
        """||z - C[indices]||^2 per row: z [..., D], indices [...] -> [...] fp32."""
        return jnp.sum((z.astype(jnp.float32) - self.lookup(indices)) ** 2, axis=-1)

    def replace_codes(self, dead: jax.Array, vectors: jax.Array) -> None:
        """Dead-code restart (training only; in place): effective codes `C[i]` with `dead[i]` become
        `vectors[i]` [K, D]. The frozen row is set to `vectors[i] @ pinv(kernel)`, so the transform
        stays shared and trainable while the code lands exactly on the given vector."""
        kernel = self.code_transform.kernel[...].astype(jnp.float32)
        rows = jnp.matmul(vectors.astype(jnp.float32), jnp.linalg.pinv(kernel), precision=_HIGHEST)
        old = self.frozen_codebook[...]
        self.frozen_codebook[...] = jnp.where(dead[:, None], rows.astype(old.dtype), old)


class VectorQuantizer(nnx.Module):
    """Plain VQ (ILLUME's semantic tokenizer): learned codebook `embedding` [K, D].

    - `ema_decay=None`: `embedding` is an nnx.Param trained by the codebook loss;
      loss = mean((sg(z) - q)^2) + beta * mean((z - sg(q))^2).
    - `ema_decay=d`: `embedding` is a Buffer updated by `update_ema` (EMA of per-code counts
      `cluster_size` and vector sums `embed_sum`, Laplace-smoothed counts); loss = beta * commitment.
    - `l2_normalize`: inputs and codes are L2-normalised before the distance, and the returned
      code (and the straight-through output) is the normalised one.

    Codebook init: N(0, 1) * D**-0.5 (same as SimVQ's frozen book; checkpoints overwrite it).
    Same return signature as SimVQ.
    """

    def __init__(self, num_codes: int, dim: int, *, l2_normalize: bool = False, ema_decay: float | None = None,
                 beta: float = 0.25, eps: float = 1e-5, chunk_size: int = 32768, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.num_codes, self.dim, self.chunk_size = int(num_codes), int(dim), int(chunk_size)
        self.l2_normalize, self.beta, self.eps = bool(l2_normalize), beta, eps
        self.ema_decay = None if ema_decay is None else float(ema_decay)
        init = (jax.random.normal(rngs.params(), (num_codes, dim), jnp.float32) * dim ** -0.5).astype(param_dtype)
        if self.ema_decay is None:
            self.embedding = nnx.Param(init, out_sharding=(None, None))
        else:
            self.embedding = Buffer(init, out_sharding=(None, None))
            self.cluster_size = Buffer(jnp.ones((num_codes,), jnp.float32), out_sharding=(None,))
            self.embed_sum = Buffer(init.astype(jnp.float32), out_sharding=(None, None))

    def _prep(self, x: jax.Array) -> jax.Array:
        x = x.astype(jnp.float32)
        return _l2_normalize(x) if self.l2_normalize else x

    def prepare(self, z: jax.Array) -> jax.Array:
        """Inputs as the distance sees them (fp32, normalised when l2_normalize)."""
        return self._prep(z)

    def codebook(self) -> jax.Array:
        """The codes actually returned [K, D] fp32 (normalised when l2_normalize)."""
        return self._prep(self.embedding[...])

    def lookup(self, indices: jax.Array) -> jax.Array:
        return self._prep(jnp.take(self.embedding[...], indices, axis=0))

    def __call__(self, z: jax.Array):
        if z.shape[-1] != self.dim:
            raise ValueError(f"VectorQuantizer: expected [..., {self.dim}], got {z.shape}")
        lead = z.shape[:-1]
        zn = self._prep(z.reshape(-1, self.dim))
        idx = nearest_code(jax.lax.stop_gradient(zn), jax.lax.stop_gradient(self.codebook()), self.chunk_size)
        q = self.lookup(idx)
        z_q, losses = _quantize_outputs(zn, q, beta=self.beta, codebook_loss=self.ema_decay is None)
        return z_q.reshape(z.shape).astype(z.dtype), idx.reshape(lead), losses

    def update_ema(self, z: jax.Array, indices: jax.Array) -> None:
        """One EMA step from inputs z [..., D] and their codes [...] (in place; fine inside nnx.jit).

        cluster_size <- d*cluster_size + (1-d)*counts; embed_sum <- d*embed_sum + (1-d)*sums;
        embedding <- embed_sum / smoothed(cluster_size), smoothed(n_k) = (n_k + eps) / (n + K*eps) * n.
        With l2_normalize the sums are of normalised inputs. Pass stop_gradient'ed z.
        """
        if self.ema_decay is None:
            raise ValueError("update_ema: this VectorQuantizer was built without ema_decay")
        d = self.ema_decay
        zf = self._prep(jax.lax.stop_gradient(z).reshape(-1, self.dim))
        idx = indices.reshape(-1)
        counts = code_counts(idx, self.num_codes).astype(jnp.float32)
        sums = jax.ops.segment_sum(zf, idx, num_segments=self.num_codes)
        cs = d * self.cluster_size[...] + (1.0 - d) * counts
        es = d * self.embed_sum[...] + (1.0 - d) * sums
        n = jnp.sum(cs)
        smoothed = (cs + self.eps) / (n + self.num_codes * self.eps) * n
        self.cluster_size[...] = cs
        self.embed_sum[...] = es
        self.embedding[...] = (es / smoothed[:, None]).astype(self.embedding[...].dtype)

    def squared_error(self, z: jax.Array, indices: jax.Array) -> jax.Array:
        """||z' - code||^2 per row, z' = z normalised when the book is (the distance assignment used)."""
        return jnp.sum((self._prep(z) - self.lookup(indices)) ** 2, axis=-1)

    def replace_codes(self, dead: jax.Array, vectors: jax.Array) -> None:
        """Dead-code restart (training only; in place): rows `i` with `dead[i]` become `vectors[i]`.
        EMA books also restart the row's statistics (count 1, sum = the vector), so the next EMA
        step keeps it there instead of dividing a stale sum by a tiny count."""
        vectors = self._prep(vectors)
        old = self.embedding[...]
        self.embedding[...] = jnp.where(dead[:, None], vectors.astype(old.dtype), old)
        if self.ema_decay is not None:
            self.cluster_size[...] = jnp.where(dead, 1.0, self.cluster_size[...])
            self.embed_sum[...] = jnp.where(dead[:, None], vectors, self.embed_sum[...])


# -- dead-code restarts ------------------------------------------------------------------------------

def restart_candidates(z: jax.Array, err: jax.Array, key: jax.Array, num: int) -> jax.Array:
    """`num` rows drawn from the encoder outputs `z` [N, D] with probability proportional to their
    quantisation error `err` [N] (the quantizer's `squared_error`). A restarted code lands where
    the book serves the data worst (shape edges, rare colours), not on the background patches
    that make up most of a batch and are already coded well."""
    z, err = z.astype(jnp.float32), err.astype(jnp.float32)
    p = err + 1e-12 * jnp.maximum(jnp.max(err), 1e-12)   # an exact batch still samples uniformly
    pick = jax.random.choice(key, z.shape[0], (num,), replace=True, p=p / jnp.sum(p))
    return z[pick]


def update_code_age(age: jax.Array, counts: jax.Array, patience: int, active) -> tuple[jax.Array, jax.Array]:
    """Steps since each code was last chosen -> (new age, dead mask). A code unused for `patience`
    consecutive steps is dead (and restarted) while `active`; its age then starts again at 0."""
    age = jnp.where(counts > 0, 0, age + 1)
    dead = (age >= patience) & active
    return jnp.where(dead, 0, age), dead


# -- code-usage metrics (pure, jit friendly) ---------------------------------------------------------

def code_counts(indices: jax.Array, num_codes: int) -> jax.Array:
    """[num_codes] int32 histogram of `indices` (any shape); out-of-range values are dropped."""
    return jnp.bincount(jnp.asarray(indices).reshape(-1), length=num_codes).astype(jnp.int32)


def usage(counts: jax.Array) -> jax.Array:
    """Fraction of codes used at least once."""
    return jnp.mean((counts > 0).astype(jnp.float32))


def perplexity(counts: jax.Array) -> jax.Array:
    """exp(entropy) of the empirical code distribution (= num_codes when usage is uniform)."""
    c = counts.astype(jnp.float32)
    p = c / jnp.maximum(jnp.sum(c), 1.0)
    ent = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return jnp.exp(ent)


def dead_codes(counts: jax.Array) -> jax.Array:
    """Number of codes never used."""
    return jnp.sum(counts == 0).astype(jnp.int32)


__all__ = ["Buffer", "SimVQ", "VectorQuantizer", "nearest_code", "code_counts", "usage", "perplexity", "dead_codes",
           "restart_candidates", "update_code_age"]
