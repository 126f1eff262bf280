"""illume_jax.modules.quantizers: assignment vs brute force, straight-through, losses, EMA, metrics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from illume_jax import sharding
from illume_jax.modules import quantizers as qz


@pytest.fixture(autouse=True)
def _mesh():
    """Variables carry logical sharding names, so modules are built under a (1-device) mesh."""
    mesh = sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    with sharding.use_mesh(mesh):
        yield


def _brute_argmin(z: np.ndarray, c: np.ndarray) -> np.ndarray:
    z, c = z.astype(np.float64), c.astype(np.float64)
    d = (z * z).sum(-1, keepdims=True) - 2 * z @ c.T + (c * c).sum(-1)[None]
    return d.argmin(-1)


def _min_gap(z: np.ndarray, c: np.ndarray) -> np.ndarray:
    z, c = z.astype(np.float64), c.astype(np.float64)
    d = ((z[:, None, :] - c[None]) ** 2).sum(-1)
    part = np.partition(d, 1, axis=-1)
    return part[:, 1] - part[:, 0]


@pytest.mark.parametrize("num_codes,chunk", [(1000, 1000), (1000, 256), (1000, 300), (777, 4096), (98, 32)])
def test_simvq_assignment_matches_brute_force(num_codes, chunk):
    vq = qz.SimVQ(num_codes, 16, chunk_size=chunk, rngs=nnx.Rngs(0))
    z = np.random.default_rng(0).normal(size=(3, 7, 11, 16)).astype(np.float32) * 0.5
    zq, idx, losses = vq(jnp.asarray(z))
    assert idx.shape == (3, 7, 11) and idx.dtype == jnp.int32 and zq.shape == z.shape
    c = np.asarray(vq.codebook())
    ref = _brute_argmin(z.reshape(-1, 16), c)
    got = np.asarray(idx).reshape(-1)
    ok = _min_gap(z.reshape(-1, 16), c) > 1e-4   # fp32 cannot order codes closer than this
    assert ok.mean() > 0.99
    np.testing.assert_array_equal(got[ok], ref[ok])
    # chunking never changes the assignment
    one = qz.nearest_code(jnp.asarray(z.reshape(-1, 16)), jnp.asarray(c), chunk_size=num_codes)
    np.testing.assert_array_equal(got, np.asarray(one))


def test_nearest_code_ties_pick_lowest_index():
    c = np.zeros((10, 4), np.float32)
    c[3] = c[7] = [1, 0, 0, 0]          # duplicate codes across chunk boundaries
    c[0] = c[5] = c[9] = [5, 5, 5, 5]
    z = np.array([[1, 0, 0, 0], [5, 5, 5, 5], [0.9, 0, 0, 0]], np.float32)
    for chunk in (1, 2, 3, 4, 10):
        got = np.asarray(qz.nearest_code(jnp.asarray(z), jnp.asarray(c), chunk_size=chunk))
        np.testing.assert_array_equal(got, [3, 0, 3])
    # torch argmin agrees on the tie-break
    tref = torch.cdist(torch.from_numpy(z), torch.from_numpy(c)).argmin(-1).numpy()
    np.testing.assert_array_equal(tref, [3, 0, 3])


def test_simvq_matches_torch_forward():
    vq = qz.SimVQ(500, 8, chunk_size=128, rngs=nnx.Rngs(1))
    frozen = torch.from_numpy(np.array(vq.frozen_codebook[...]))
    weight = torch.from_numpy(np.asarray(vq.code_transform.kernel[...]).T.copy())   # torch Linear weight (out, in)
    z = np.random.default_rng(1).normal(size=(2, 5, 6, 8)).astype(np.float32)
    zt = torch.from_numpy(z).reshape(-1, 8)
    codes_t = torch.nn.functional.linear(frozen, weight)
    idx_t = torch.cdist(zt, codes_t).argmin(-1)
    q_t = codes_t[idx_t]
    zq, idx, losses = vq(jnp.asarray(z))
    np.testing.assert_array_equal(np.asarray(idx).reshape(-1), idx_t.numpy())
    np.testing.assert_allclose(np.asarray(zq).reshape(-1, 8), q_t.numpy(), atol=1e-6)
    loss_t = torch.nn.functional.mse_loss(zt, q_t) * 1.25
    np.testing.assert_allclose(float(losses["loss"]), float(loss_t), rtol=1e-5)


def test_simvq_straight_through_and_losses():
    vq = qz.SimVQ(64, 8, chunk_size=16, beta=0.25, rngs=nnx.Rngs(2))
    z = jnp.asarray(np.random.default_rng(2).normal(size=(4, 8)).astype(np.float32))
    zq, idx, losses = vq(z)
    # forward value = looked-up code; lookup = gathered rows of the effective codebook
    np.testing.assert_allclose(np.asarray(zq), np.asarray(vq.lookup(idx)), atol=1e-6)
    np.testing.assert_allclose(np.asarray(vq.lookup(idx)), np.asarray(vq.codebook())[np.asarray(idx)], atol=1e-6)
    # d z_q / d z = identity
    jac = jax.jacobian(lambda x: vq(x)[0])(z)
    np.testing.assert_allclose(np.asarray(jac).reshape(32, 32), np.eye(32), atol=1e-6)
    # loss values
    q = np.asarray(vq.lookup(idx))
    mse = np.mean((np.asarray(z) - q) ** 2)
    np.testing.assert_allclose(float(losses["codebook_loss"]), mse, rtol=1e-5)
    np.testing.assert_allclose(float(losses["commitment_loss"]), mse, rtol=1e-5)
    np.testing.assert_allclose(float(losses["loss"]), 1.25 * mse, rtol=1e-5)
    # gradients: code_transform gets the codebook term, the frozen book is not a Param
    params = nnx.state(vq, nnx.Param)
    assert [p for p, _ in nnx.to_flat_state(params)] == [("code_transform", "kernel")]
    graphdef, p, rest = nnx.split(vq, nnx.Param, ...)

    def loss_fn(p_):
        m = nnx.merge(graphdef, p_, rest)
        return m(z)[2]["codebook_loss"]
    g = jax.grad(loss_fn)(p)
    assert np.abs(np.asarray(g["code_transform"]["kernel"][...])).sum() > 0
    # commitment gradient w.r.t. z = 2 * beta * (z - q) / numel
    gz = jax.grad(lambda x: vq(x)[2]["loss"])(z)
    np.testing.assert_allclose(np.asarray(gz), 2 * 0.25 * (np.asarray(z) - q) / z.size, atol=1e-6)


def test_simvq_bf16_input_and_jit():
    vq = qz.SimVQ(300, 8, chunk_size=128, rngs=nnx.Rngs(3))
    z = jnp.asarray(np.random.default_rng(3).normal(size=(2, 4, 4, 8)), jnp.bfloat16)
    zq, idx, _ = nnx.jit(lambda m, x: m(x))(vq, z)
    assert zq.dtype == jnp.bfloat16
    ref = _brute_argmin(np.asarray(z, np.float32).reshape(-1, 8), np.asarray(vq.codebook()))
    assert (np.asarray(idx).reshape(-1) == ref).mean() > 0.99


def test_vq_l2_normalize():
    vq = qz.VectorQuantizer(50, 6, l2_normalize=True, rngs=nnx.Rngs(4))
    z = np.random.default_rng(4).normal(size=(10, 6)).astype(np.float32) * 3
    zq, idx, losses = vq(jnp.asarray(z))
    c = np.asarray(vq.embedding[...])
    cn = c / np.linalg.norm(c, axis=-1, keepdims=True)
    zn = z / np.linalg.norm(z, axis=-1, keepdims=True)
    np.testing.assert_array_equal(np.asarray(idx), (zn @ cn.T).argmax(-1))
    np.testing.assert_allclose(np.asarray(zq), cn[np.asarray(idx)], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(zq), axis=-1), 1.0, atol=1e-5)
    mse = np.mean((zn - cn[np.asarray(idx)]) ** 2)
    np.testing.assert_allclose(float(losses["loss"]), 1.25 * mse, rtol=1e-5)
    assert [p for p, _ in nnx.to_flat_state(nnx.state(vq, nnx.Param))] == [("embedding",)]


def test_vq_ema_update():
    vq = qz.VectorQuantizer(8, 4, ema_decay=0.5, beta=0.25, eps=1e-5, rngs=nnx.Rngs(5))
    assert len(nnx.state(vq, nnx.Param)) == 0
    assert {p[0] for p, _ in nnx.to_flat_state(nnx.state(vq, qz.Buffer))} == {"embedding", "cluster_size",
                                                                             "embed_sum"}
    z = jnp.asarray(np.random.default_rng(5).normal(size=(64, 4)).astype(np.float32))
    _, idx, losses = vq(z)
    assert float(losses["codebook_loss"]) == 0.0
    np.testing.assert_allclose(float(losses["loss"]), 0.25 * float(losses["commitment_loss"]), rtol=1e-6)
    before = np.asarray(vq.embedding[...]).copy()
    step = nnx.jit(lambda m, x, i: m.update_ema(x, i))
    step(vq, z, idx)
    after = np.asarray(vq.embedding[...])
    zi, ii = np.asarray(z), np.asarray(idx)
    counts = np.bincount(ii, minlength=8)
    for k in range(8):
        if counts[k]:
            mean = zi[ii == k].mean(0)
            assert np.linalg.norm(after[k] - mean) < np.linalg.norm(before[k] - mean)
            # closed form: (d*e + (1-d)*sum) / smoothed(d*1 + (1-d)*n_k)
            cs = 0.5 + 0.5 * counts
            n = cs.sum()
            sm = (cs + 1e-5) / (n + 8 * 1e-5) * n
            np.testing.assert_allclose(after[k], (0.5 * before[k] + 0.5 * zi[ii == k].sum(0)) / sm[k], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(vq.cluster_size[...]), 0.5 + 0.5 * counts, rtol=1e-6)
    # decay 0: used codes become exactly (up to smoothing) the means of their members
    vq0 = qz.VectorQuantizer(8, 4, ema_decay=0.0, eps=1e-9, rngs=nnx.Rngs(5))
    _, idx0, _ = vq0(z)
    vq0.update_ema(z, idx0)
    ii0 = np.asarray(idx0)
    for k in np.unique(ii0):
        np.testing.assert_allclose(np.asarray(vq0.embedding[...])[k], zi[ii0 == k].mean(0), rtol=1e-5, atol=1e-6)


def test_vq_update_ema_requires_ema():
    with pytest.raises(ValueError):
        qz.VectorQuantizer(4, 2, rngs=nnx.Rngs(0)).update_ema(jnp.zeros((1, 2)), jnp.zeros((1,), jnp.int32))


def test_metrics():
    idx = jnp.asarray([[0, 1, 1], [3, 3, 3]])
    counts = qz.code_counts(idx, 5)
    np.testing.assert_array_equal(np.asarray(counts), [1, 2, 0, 3, 0])
    assert float(qz.usage(counts)) == pytest.approx(0.6)
    assert int(qz.dead_codes(counts)) == 2
    p = np.array([1, 2, 3]) / 6
    assert float(qz.perplexity(counts)) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-6)
    uniform = qz.code_counts(jnp.arange(64) % 16, 16)
    assert float(qz.perplexity(uniform)) == pytest.approx(16.0, rel=1e-5)
    assert float(qz.usage(uniform)) == 1.0 and int(qz.dead_codes(uniform)) == 0
    f = jax.jit(lambda i: qz.perplexity(qz.code_counts(i, 5)))
    assert float(f(idx)) == pytest.approx(float(qz.perplexity(counts)))
    assert float(qz.perplexity(jnp.zeros((4,), jnp.int32))) == pytest.approx(1.0)


def test_code_age_marks_dead_codes_after_patience():
    age = jnp.zeros((4,), jnp.int32)
    used = jnp.asarray([3, 0, 1, 0])
    for _ in range(2):
        age, dead = qz.update_code_age(age, used, patience=3, active=True)
        assert not bool(dead.any())
    np.testing.assert_array_equal(np.asarray(age), [0, 2, 0, 2])
    age, dead = qz.update_code_age(age, used, patience=3, active=True)
    np.testing.assert_array_equal(np.asarray(dead), [False, True, False, True])
    np.testing.assert_array_equal(np.asarray(age), [0, 0, 0, 0])       # restarted codes start again
    _, dead = qz.update_code_age(jnp.full((4,), 9), used, patience=3, active=False)
    assert not bool(dead.any())                                        # past dead_code_until: never


def test_restart_candidates_follow_the_quantisation_error():
    z = jnp.asarray(np.arange(12, dtype=np.float32).reshape(6, 2))
    err = jnp.asarray([0, 0, 5.0, 0, 0, 0])
    picks = qz.restart_candidates(z, err, jax.random.key(0), 7)
    np.testing.assert_array_equal(np.asarray(picks), np.repeat(np.asarray(z)[2:3], 7, 0))
    # a batch every code serves exactly still yields picks (uniformly)
    flat = qz.restart_candidates(z, jnp.zeros((6,)), jax.random.key(1), 64)
    assert len({tuple(r) for r in np.asarray(flat)}) > 1


def test_simvq_replace_codes_lands_exactly_on_the_vectors():
    q = qz.SimVQ(16, 4, rngs=nnx.Rngs(3))
    before = np.asarray(q.codebook())
    vectors = jnp.asarray(np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32))
    dead = jnp.zeros((16,), bool).at[jnp.asarray([2, 9])].set(True)
    nnx.jit(lambda m, d, v: m.replace_codes(d, v))(q, dead, vectors)
    after = np.asarray(q.codebook())
    np.testing.assert_allclose(after[[2, 9]], np.asarray(vectors)[[2, 9]], rtol=1e-4, atol=1e-5)
    keep = np.setdiff1d(np.arange(16), [2, 9])
    np.testing.assert_array_equal(after[keep], before[keep])
    # the restarted code is now the nearest one for its vector
    _, idx, _ = q(vectors[2:3])
    assert int(idx[0]) == 2
    np.testing.assert_allclose(np.asarray(q.squared_error(vectors[2:3], idx)), [0.0], atol=1e-8)


@pytest.mark.parametrize("ema_decay", [None, 0.9])
def test_vq_replace_codes(ema_decay):
    vq = qz.VectorQuantizer(8, 4, l2_normalize=True, ema_decay=ema_decay, rngs=nnx.Rngs(1))
    v = jnp.asarray(np.random.default_rng(1).normal(size=(8, 4)).astype(np.float32)) * 3.0
    dead = jnp.arange(8) == 5
    vq.replace_codes(dead, v)
    np.testing.assert_allclose(np.asarray(vq.codebook())[5], np.asarray(qz._l2_normalize(v))[5], rtol=1e-5)
    _, idx, _ = vq(v[5:6])
    assert int(idx[0]) == 5
    if ema_decay:  # the EMA statistics restart with the code: an EMA step with its own vector keeps it
        vq.update_ema(v[5:6], idx)
        np.testing.assert_allclose(np.asarray(vq.codebook())[5], np.asarray(qz._l2_normalize(v))[5], rtol=1e-4)
