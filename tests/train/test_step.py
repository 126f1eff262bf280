"""The train step: learning, gradient accumulation, NaN guard, sharding, modality split."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from optax.tree import norm as optax_norm

from illume_jax import sharding
from illume_jax.data import pipeline
from illume_jax.train import state as state_lib, step as step_lib
from train.helpers import synthetic_batch, tiny_config

def _mesh1():
    return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


def _state_and_step(config, mesh):
    _, _, state = state_lib.create_state(config, 0, mesh)
    return state, step_lib.make_train_step(config, 0, mesh)


def test_loss_decreases_on_a_fixed_batch():
    mesh = _mesh1()
    state, step = _state_and_step(tiny_config(), mesh)
    batch = sharding.global_batch(mesh, synthetic_batch(np.random.default_rng(0), 8, 16, 64))
    losses = []
    for _ in range(20):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses
    assert int(state.step) == 20 and int(state.nan_skips) == 0


def test_gradient_accumulation_equals_one_big_batch():
    mesh = _mesh1()
    batch = synthetic_batch(np.random.default_rng(1), 8, 16, 64)
    batch["loss_mask"][0, :5] = 0.0  # unequal token counts per micro-batch: averaging must be by tokens
    results = []
    for accum in (1, 2, 4):
        state, step = _state_and_step(tiny_config(grad_accum=accum), mesh)
        state, m = step(state, sharding.global_batch(mesh, batch))
        results.append((float(m["loss"]), float(m["grad_norm"]), state.params))
    for loss, gnorm, params in results[1:]:
        np.testing.assert_allclose(loss, results[0][0], rtol=1e-6)
        np.testing.assert_allclose(gnorm, results[0][1], rtol=1e-5)
        # After one Adam step of size ~lr=1e-2: equal up to summation order. Adam divides by
        # sqrt(v), so an element whose gradient is ~eps moves by a noise-sized fraction of lr
        # (measured: 2.2e-5 on one of 32 elements with the pinned stack, 2026-12-02); 1% of lr
        # still catches a wrong update. The scale of the gradient is checked by grad_norm above.
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(results[0][2])):
            np.testing.assert_allclose(a, b, atol=1e-4)


def test_loss_splits_by_mixture_dataset_and_survives_accumulation():
    """`loss/<name>` is the mean NLL of that dataset's trained tokens, whatever the micro-batching;
    padding (source 0) counts in no dataset, a zero-weight dataset gets no metric."""
    mesh = _mesh1()
    batch = synthetic_batch(np.random.default_rng(5), 8, 16, 64)
    batch["sources"][:3] = 2               # rows 0-2 from the second dataset, 3-7 from the first...
    batch["sources"][7, 10:] = 0           # ...but the tail of row 7 is padding
    batch["loss_mask"][1, :6] = 0.0
    results = []
    for accum in (1, 4):
        config = tiny_config(grad_accum=accum)
        config.data.datasets["other"] = dict(config.data.datasets["synthetic"])
        config.stages[0].mixture = {"synthetic": 0.7, "skipped": 0.0, "other": 0.3}
        state, step = _state_and_step(config, mesh)
        results.append(step(state, sharding.global_batch(mesh, batch))[1])
    # The reference: per-token NLL of the same (seeded) initial model, summed by hand.
    graphdef, _, state = state_lib.create_state(tiny_config(), 0, mesh)
    logits = nnx.merge(graphdef, state.params)(jnp.asarray(batch["tokens"]), positions=jnp.asarray(batch["positions"]),
                                               segment_ids=jnp.asarray(batch["segment_ids"]))
    nll = np.asarray(jax.nn.logsumexp(logits, -1)
                     - jnp.take_along_axis(logits, jnp.asarray(batch["targets"])[..., None], -1)[..., 0])
    for m in results:
        assert {k for k in m if "/" in k} == {"loss/synthetic", "tokens/synthetic", "loss/other", "tokens/other"}
        # Source ids follow the stage's mixture order (ml_collections keeps its keys sorted).
        assert pipeline.mixture_names(config.stages[0]) == ["other", "synthetic"]
        for name, sid in (("other", 1), ("synthetic", 2)):
            sel = batch["loss_mask"] * (batch["sources"] == sid)
            assert float(m[f"tokens/{name}"]) == sel.sum() > 0
            np.testing.assert_allclose(float(m[f"loss/{name}"]), (nll * sel).sum() / sel.sum(), rtol=1e-5)
        assert float(m["tokens/synthetic"]) + float(m["tokens/other"]) == float(m["tokens"]) - 6


def test_dataset_weighting_balances_the_datasets_exactly_under_accumulation():
    """loss_weighting='dataset': the objective is sum_s (w_s / W) x mean NLL of dataset s over the
    datasets present (W renormalises), its gradient is that objective's, and micro-batching changes
    neither; the per-dataset metrics stay token means."""
    mesh = _mesh1()
    batch = synthetic_batch(np.random.default_rng(6), 8, 16, 64)
    batch["sources"][:2] = 1               # 'other' (0.2): two rows ...
    batch["sources"][2:] = 2               # ... 'synthetic' (0.3): six, about 3x the tokens ...
    batch["sources"][7, 12:] = 0           # ... an untagged tail, which weighs nothing; and 'third'
                                           # (0.5) is absent from this batch
    batch["loss_mask"][3, :9] = 0.0

    def config(accum):
        c = tiny_config(grad_accum=accum)
        for extra in ("other", "third"):
            c.data.datasets[extra] = dict(c.data.datasets["synthetic"])
        c.stages[0].mixture = {"other": 0.2, "synthetic": 0.3, "third": 0.5}
        c.stages[0].loss_weighting = "dataset"
        return c

    graphdef, _, ref_state = state_lib.create_state(tiny_config(), 0, mesh)
    sel = [batch["loss_mask"] * (batch["sources"] == s) for s in (1, 2)]

    def objective(params):  # written from the definition, not from the step's weights
        logits = nnx.merge(graphdef, params)(jnp.asarray(batch["tokens"]), positions=jnp.asarray(batch["positions"]),
                                             segment_ids=jnp.asarray(batch["segment_ids"]))
        nll = (jax.nn.logsumexp(logits, -1)
               - jnp.take_along_axis(logits, jnp.asarray(batch["targets"])[..., None], -1)[..., 0])
        means = [jnp.sum(nll * m) / m.sum() for m in sel]
        token_mean = sum(jnp.sum(nll * m) for m in sel) / sum(m.sum() for m in sel)
        return (0.2 * means[0] + 0.3 * means[1]) / 0.5, (means, token_mean)

    (want, (means, _)), grads = jax.value_and_grad(objective, has_aux=True)(ref_state.params)
    token_grads = jax.grad(lambda p: objective(p)[1][1])(ref_state.params)
    # At init every token's NLL is near ln V, so the two objectives differ in their gradients.
    assert float(optax_norm(jax.tree.map(jnp.subtract, grads, token_grads))) > 0.1 * float(optax_norm(grads))
    results = []
    for accum in (1, 4):
        state, step = _state_and_step(config(accum), mesh)
        state, m = step(state, sharding.global_batch(mesh, batch))
        np.testing.assert_allclose(float(m["loss"]), float(want), rtol=1e-5)
        np.testing.assert_allclose(float(m["grad_norm"]), float(optax_norm(grads)), rtol=1e-4)
        np.testing.assert_allclose(float(m["loss/other"]), float(means[0]), rtol=1e-5)
        np.testing.assert_allclose(float(m["loss/synthetic"]), float(means[1]), rtol=1e-5)
        assert "loss/third" not in m or float(m["tokens/third"]) == 0
        results.append(state.params)
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_dataset_weights_are_zero_for_untagged_tokens_and_sum_to_one():
    batch = dict(loss_mask=jnp.ones((2, 4)), sources=jnp.asarray([[1, 1, 0, 2], [2, 2, 2, 0]]))
    w = step_lib.dataset_balanced_weights(batch, (1.0, 3.0, 5.0))
    np.testing.assert_allclose(np.asarray(w), [[0.125, 0.125, 0, 0.1875], [0.1875, 0.1875, 0.1875, 0]], rtol=1e-6)
    none = step_lib.dataset_balanced_weights(dict(batch, loss_mask=jnp.zeros((2, 4))), (1.0, 3.0, 5.0))
    assert float(jnp.sum(none)) == 0.0


def test_unknown_loss_weighting_is_refused_by_name():
    from illume_jax import config_check
    c = tiny_config()
    c.stages[0].loss_weighting = "per_row"
    with pytest.raises(ValueError, match=r"stages\[0\]\.loss_weighting.*'token', 'dataset'"):
        config_check.validate(c)


def test_nan_guard_skips_the_update():
    mesh = _mesh1()
    state, step = _state_and_step(tiny_config(), mesh)
    good = sharding.global_batch(mesh, synthetic_batch(np.random.default_rng(2), 8, 16, 64))
    state, _ = step(state, good)
    # Poison one embedding row used by the batch: the loss becomes NaN.
    params = state.params
    emb = params["embed"]["embedding"]
    emb[...] = emb[...].at[int(good["tokens"][0, 0])].set(jnp.nan)
    state = state.replace(params=params)
    before = [np.asarray(x).copy() for x in jax.tree.leaves(state.params)]
    opt_before = [np.asarray(x).copy() for x in jax.tree.leaves(state.opt_state)]
    state, m = step(state, good)
    assert int(m["nan_skipped"]) == 1 and int(state.nan_skips) == 1 and int(state.step) == 2
    for a, b in zip(before, jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, np.asarray(b))
    for a, b in zip(opt_before, jax.tree.leaves(state.opt_state)):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_sharded_step_on_8_devices_keeps_shardings_and_compiles_once():
    config = tiny_config()
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    _, _, state = state_lib.create_state(config, 0, mesh)
    up = state.params["layers"]["mlp"]["up_proj"]["kernel"][...]
    assert up.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert up.addressable_shards[0].data.shape == (2, 16, 32)
    step = step_lib.make_train_step(config, 0, mesh)
    rng = np.random.default_rng(3)
    ref_state = state_lib.create_state(config, 0, _mesh1())[2]
    ref_step = step_lib.make_train_step(config, 0, _mesh1())
    for _ in range(3):
        b = synthetic_batch(rng, 8, 16, 64)
        state, m = step(state, sharding.global_batch(mesh, b))
        ref_state, ref_m = ref_step(ref_state, sharding.global_batch(_mesh1(), b))
        np.testing.assert_allclose(float(m["loss"]), float(ref_m["loss"]), rtol=1e-5)
    assert step.cache_size() == 1
    up = state.params["layers"]["mlp"]["up_proj"]["kernel"][...]
    assert up.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    mu_leaves = [x for x in jax.tree.leaves(state.opt_state) if getattr(x, "ndim", 0) == 3 and x.shape == up.shape]
    assert mu_leaves and all(x.sharding.spec == up.sharding.spec for x in mu_leaves)


def test_eager_init_equals_the_init_program_with_its_shardings(monkeypatch):
    """Small states are created op by op (InitProgram), big ones by one compiled program: the same
    numbers and the same shardings either way."""
    config = tiny_config()
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    step_lib._PROGRAMS.clear()
    eager = state_lib.create_state(config, 0, mesh)[2]
    monkeypatch.setattr(step_lib, "EAGER_INIT_MAX_BYTES", 0)
    step_lib._PROGRAMS.clear()
    compiled = state_lib.create_state(config, 0, mesh)[2]
    step_lib._PROGRAMS.clear()
    assert len(jax.tree.leaves(eager)) == len(jax.tree.leaves(compiled)) > 10
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(compiled)):
        assert a.sharding == b.sharding
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_text_and_image_losses_split_by_target_id():
    config = tiny_config()
    mesh = _mesh1()
    graphdef, _, state = state_lib.create_state(config, 0, mesh)
    b = synthetic_batch(np.random.default_rng(4), 8, 16, 64)
    _, sums = step_lib.token_losses(state.params, graphdef, {k: jnp.asarray(v) for k, v in b.items()}, 48)
    image = (b["targets"] >= 48).sum()
    assert float(sums["image_tokens"]) == image and float(sums["text_tokens"]) == b["targets"].size - image
    np.testing.assert_allclose(float(sums["text_nll"] + sums["image_nll"]), float(sums["nll"]), rtol=1e-6)
