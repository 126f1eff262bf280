"""The 'cpu' attention kernel (per-example loop, rematerialised scores, causal query chunks)
against the 'xla' reference: causal with packing and padding, bidirectional with and without
segments, GQA, a decode step at a cache offset, and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from illume_jax.modules import attention
from illume_jax.modules.attention import attend


@pytest.fixture(autouse=True)
def _always_loop(monkeypatch):
    """These shapes are small; make the 'cpu' kernel take its per-example loop anyway."""
    monkeypatch.setattr(attention, "CPU_LOOP_MIN_SCORES", 0)


def _qkv(B=3, T=12, S=None, N=4, K=2, H=8, seed=0):
    S = S or T
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(ks[0], (B, T, N, H)), jax.random.normal(ks[1], (B, S, K, H)),
            jax.random.normal(ks[2], (B, S, K, H)))


# rows: two packed sequences then padding; one sequence; left padding then one sequence
SEGMENTS = jnp.asarray([[1] * 5 + [2] * 4 + [0] * 3, [1] * 12, [0] * 4 + [1] * 8], jnp.int32)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("segments", [None, SEGMENTS])
@pytest.mark.parametrize("chunk", [256, 5])
def test_cpu_kernel_matches_xla(causal, segments, chunk, monkeypatch):
    """chunk=5: causal rows of 12 run as query chunks of 5, 5 and 2, each reading the keys up to its
    end (chunk edges cut through packed sequences and padding)."""
    monkeypatch.setattr(attention, "CPU_QUERY_CHUNK", chunk)
    q, k, v = _qkv()
    kw = dict(q_segment_ids=segments, kv_segment_ids=segments, causal=causal)
    # Causal padding queries have no key to attend to; what they return is unspecified (the
    # chunked path averages fewer keys), and nothing reads it: compare and train real tokens only.
    real = (segments != 0 if causal and segments is not None else jnp.ones((3, 12), bool))[:, :, None, None]
    want = attend(q, k, v, implementation="xla", **kw)
    got = attend(q, k, v, implementation="cpu", **kw)
    np.testing.assert_allclose(np.asarray(jnp.where(real, got, 0)), np.asarray(jnp.where(real, want, 0)),
                               atol=2e-6, rtol=2e-6)

    def loss(impl):
        return lambda q, k, v: jnp.sum(jnp.where(real, jnp.sin(attend(q, k, v, implementation=impl, **kw)), 0))
    g_want = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    g_got = jax.jit(jax.grad(loss("cpu"), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g_got, g_want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_cpu_kernel_decode_step_at_an_offset():
    """One query per row at cache slot 7 over a 12-slot cache whose rows hold different segments."""
    q, _, _ = _qkv(T=1, seed=1)
    _, k, v = _qkv(T=12, seed=2)
    cache_seg = SEGMENTS
    q_seg = jnp.asarray([[2], [1], [1]], jnp.int32)
    kw = dict(q_segment_ids=q_seg, kv_segment_ids=cache_seg, q_offset=jnp.int32(7))
    want = attend(q, k, v, implementation="xla", **kw)
    got = jax.jit(lambda q, k, v: attend(q, k, v, implementation="cpu", **kw))(q, k, v)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6, rtol=2e-6)


def test_cpu_kernel_bfloat16_and_cross_attention():
    """bf16 inputs (fp32 logits, probs cast back) and keys longer than queries (cross-attention)."""
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(T=6, S=10, K=4))
    want = attend(q, k, v, implementation="xla", causal=False)
    got = attend(q, k, v, implementation="cpu", causal=False)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=2e-2)


def test_cpu_kernel_loops_only_over_large_score_tensors(monkeypatch):
    """Below CPU_LOOP_MIN_SCORES scores per example (decode steps) 'cpu' is the batched 'xla' path:
    no loop (scan) in the program; above it, the loop."""
    q, k, v = _qkv()
    monkeypatch.setattr(attention, "CPU_LOOP_MIN_SCORES", 4 * 12 * 12 + 1)
    assert "while" not in str(jax.make_jaxpr(lambda q, k, v: attend(q, k, v, implementation="cpu"))(q, k, v))
    monkeypatch.setattr(attention, "CPU_LOOP_MIN_SCORES", 4 * 12 * 12)
    assert "scan" in str(jax.make_jaxpr(lambda q, k, v: attend(q, k, v, implementation="cpu"))(q, k, v))


def test_unknown_kernel_is_named():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="'gpu'.*'cpu'"):
        attend(q, k, v, implementation="gpu")
