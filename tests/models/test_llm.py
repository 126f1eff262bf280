"""LLM behaviour: cached decoding == full forward (scanned and unstacked layers), packing, sharding, scan/remat, config errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from illume_jax import sharding
from illume_jax.infer.generate import generate
from illume_jax.models.llm import LayerKVCache, LLMConfig, create_llm

CFG = LLMConfig(vocab_size=128, text_vocab_size=100, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=8, mlp_dim=64, rope_theta=1e4, tie_embeddings=False)


@pytest.fixture(scope="module")
def model():
    return create_llm(CFG, seed=1)


def test_generate_matches_full_forward_and_compiles_once(model):
    rng = np.random.default_rng(0)
    # Left-padded batch: row 1 has a 3-token shorter prompt.
    prompt = jnp.asarray(rng.integers(1, 128, size=(2, 8)), jnp.int32)
    mask = jnp.asarray([[1] * 8, [0] * 3 + [1] * 5], jnp.int32)
    before = generate.pure._cache_size()
    toks, cached_logits = generate(model, prompt, mask, jax.random.key(0), cache_len=20, max_new_tokens=12)
    toks2, _ = generate(model, prompt, mask, jax.random.key(1), cache_len=20, max_new_tokens=7)
    np.testing.assert_array_equal(toks2[:, :7], toks[:, :7])  # greedy: independent of rng and length
    assert (np.asarray(toks2[:, 7:]) == 0).all()
    assert generate.pure._cache_size() == before + 1

    for row in range(2):
        start = 0 if row == 0 else 3
        seq = jnp.concatenate([prompt[row, start:], toks[row]])[None]
        full = model(seq)[0]
        # The buffer holds left padding first; compare the real positions (the last token has no
        # successor, so its logits are not produced by the loop).
        cached = cached_logits[row, start:19]
        np.testing.assert_allclose(np.asarray(cached), np.asarray(full[:19 - start]), atol=2e-5, rtol=1e-5)
        # Greedy tokens are the argmax of the full forward.
        P = 8 - start
        np.testing.assert_array_equal(np.asarray(toks[row]), np.asarray(jnp.argmax(full[P - 1:P + 11], -1)))


def test_unstacked_decode_equals_the_scanned_one(model):
    """Per-layer weights + LayerKVCache (the CPU decode loop) against the scan over the stacked
    layers and cache: the same logits and the same cache, step after step, from the same prefill."""
    rng = np.random.default_rng(3)
    prompt = jnp.asarray(rng.integers(1, 128, size=(2, 6)), jnp.int32)
    seg = jnp.asarray([[1] * 6, [0, 0] + [1] * 4], jnp.int32)
    pos = jnp.maximum(jnp.cumsum(seg, 1) - 1, 0)

    @nnx.jit(static_argnames=("unstack",))
    def run(m, unstack):
        logits, cache = m.decode(prompt, m.init_cache(2, 12), positions=pos, segment_ids=seg)
        layers = None
        if unstack:
            layers, cache = m.unstacked_layers(), LayerKVCache.from_stacked(cache)
        steps = []
        for i in range(5):
            tok = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)[:, None]
            logits, cache = m.decode(tok, cache, positions=pos[:, -1:] + 1 + i, layers=layers)
            steps.append(logits[:, 0])
        k = jnp.stack(cache.k) if unstack else cache.k
        return jnp.stack(steps, 1), k, cache.index

    ref_logits, ref_k, ref_index = run(model, False)
    logits, k, index = run(model, True)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(k), np.asarray(ref_k), atol=1e-6)
    assert int(index) == int(ref_index) == 11
    assert np.abs(np.asarray(k[:, :, 6:11])).min() > 0   # the steps wrote their slots


def test_decode_rejects_a_cache_without_its_layers(model):
    cache = model.init_cache(1, 4)
    tok, pos = jnp.ones((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32)
    with pytest.raises(ValueError, match="LayerKVCache of 2 layers needs layers="):
        model.decode(tok, LayerKVCache.from_stacked(cache), positions=pos)
    with pytest.raises(ValueError, match="layers= goes with a LayerKVCache"):
        model.decode(tok, cache, positions=pos, layers=model.unstacked_layers())


def test_packed_segments_equal_separate_forwards(model):
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 128, 10), rng.integers(0, 128, 6)
    tokens = jnp.asarray(np.concatenate([a, b, [0, 0]])[None], jnp.int32)
    seg = jnp.asarray([[1] * 10 + [2] * 6 + [0, 0]], jnp.int32)
    pos = jnp.asarray([list(range(10)) + list(range(6)) + [0, 0]], jnp.int32)
    packed = model(tokens, positions=pos, segment_ids=seg)[0]
    np.testing.assert_allclose(packed[:10], model(jnp.asarray(a[None], jnp.int32))[0], atol=1e-5)
    np.testing.assert_allclose(packed[10:16], model(jnp.asarray(b[None], jnp.int32))[0], atol=1e-5)


def test_scan_remat_and_unrolled_agree():
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 128, (2, 12)), jnp.int32)

    def loss_and_grad(cfg):
        m = create_llm(cfg, seed=3)
        g, p = nnx.split(m, nnx.Param)

        def loss(p):
            return jnp.mean(jax.nn.log_softmax(nnx.merge(g, p)(tokens))[..., 0])
        return jax.jit(jax.value_and_grad(loss))(p)  # jitted: eager op-by-op scans took ~100 s

    import dataclasses
    ref_loss, ref_grad = loss_and_grad(dataclasses.replace(CFG, scan_layers=False, remat="none"))
    for remat in ("none", "nothing_saveable", "dots_with_no_batch_dims"):
        loss, grad = loss_and_grad(dataclasses.replace(CFG, scan_layers=True, remat=remat))
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
        for x, y in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
            np.testing.assert_allclose(x, y, atol=1e-6)


def test_sharded_model_on_8_devices():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    m = create_llm(CFG, mesh)
    params = dict(nnx.to_flat_state(nnx.state(m, nnx.Param)))
    up = params[("layers", "mlp", "up_proj", "kernel")][...]
    assert up.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert up.addressable_shards[0].data.shape == (2, 16, 32)
    emb = params[("embed", "embedding")][...]
    assert emb.addressable_shards[0].data.shape == (64, 16)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 128, (8, 16)), jnp.int32)
    with sharding.use_mesh(mesh):
        out = nnx.jit(lambda m, t: m(t))(m, tokens)
    assert out.sharding.spec[0] == ("data", "fsdp")
    ref = create_llm(CFG)(tokens)
    np.testing.assert_allclose(out, ref, atol=2e-5)


def test_splash_attention_interpret_matches_xla():
    import dataclasses
    pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")
    from illume_jax.modules.attention import attend
    rng = np.random.default_rng(4)
    q = jnp.asarray(rng.normal(size=(1, 128, 4, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 128, 2, 16)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(1, 128, 2, 16)), jnp.float32)
    seg = jnp.asarray([[1] * 70 + [2] * 50 + [0] * 8], jnp.int32)
    ref = attend(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, implementation="xla")
    out = attend(q, k, v, q_segment_ids=seg, implementation="splash", splash_interpret=True)
    np.testing.assert_allclose(out[:, :120], ref[:, :120], atol=1e-4)
    del dataclasses


@pytest.mark.parametrize("key,value,match", [
    ("family", "gpt2", "family"), ("attention", "flash", "attention"), ("remat", "some", "remat"),
    ("num_kv_heads", 3, "num_heads"), ("vocab_size", 10, "vocab_size"), ("dtype", "fp8", "dtype")])
def test_config_errors_name_the_key(key, value, match):
    import dataclasses
    with pytest.raises(ValueError, match=f"config.model.{match}"):
        dataclasses.replace(CFG, **{key: value})


def test_from_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown keys.*hidden"):
        LLMConfig.from_config({"hidden": 3})
