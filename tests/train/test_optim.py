"""Stage optimizers: freezing really freezes (and allocates nothing), new-vocab-only rows, LR groups."""
import jax
import numpy as np
import pytest

from configs import common
from illume_jax import sharding
from illume_jax.train import optim, state as state_lib, step as step_lib
from train.helpers import synthetic_batch, tiny_config


def _flat(tree):
    return {optim.path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _run(config, steps=3, mesh=None):
    mesh = mesh or sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    _, _, state = state_lib.create_state(config, 0, mesh)
    before = _flat(state.params)
    step = step_lib.make_train_step(config, 0, mesh)
    rng = np.random.default_rng(0)
    for _ in range(steps):
        state, _ = step(state, sharding.global_batch(mesh, synthetic_batch(rng, 8, 16, 64)))
    return before, _flat(state.params), state


def _stage(**kw):
    base = dict(steps=3, seq_len=16, global_batch_size=8, lr=1e-2, warmup_steps=0, mixture={"synthetic": 1.0})
    base.update(kw)
    return [common.stage_config("s", **base)]


def test_frozen_params_bit_identical_and_without_optimizer_state():
    full_before, full_after, full_state = _run(tiny_config(_stage(), weight_decay=0.1))
    before, after, state = _run(tiny_config(_stage(trainable=("layers/mlp/.*",)), weight_decay=0.1))
    for name in before:
        if name.startswith("layers/mlp/"):
            assert not np.array_equal(before[name], after[name]), name
        else:
            np.testing.assert_array_equal(before[name], after[name], err_msg=name)
    # Adam moments exist only for the trainable MLP kernels: 2 (mu, nu) x 3 kernels.
    mlp_bytes = sum(v.nbytes for k, v in before.items() if k.startswith("layers/mlp/"))
    assert state_lib.count_bytes(state.opt_state) <= 2 * mlp_bytes + 64
    assert state_lib.count_bytes(full_state.opt_state) >= 2 * sum(v.nbytes for v in full_before.values())


def test_new_vocab_only_rows_with_weight_decay():
    config = tiny_config(_stage(trainable=("embed/.*", "lm_head/.*"), new_vocab_only=True), weight_decay=0.1)
    before, after, _ = _run(config)
    V = config.model.text_vocab_size
    np.testing.assert_array_equal(before["embed/embedding"][:V], after["embed/embedding"][:V])
    np.testing.assert_array_equal(before["lm_head/kernel"][:, :V], after["lm_head/kernel"][:, :V])
    assert not np.array_equal(before["embed/embedding"][V:], after["embed/embedding"][V:])
    assert not np.array_equal(before["lm_head/kernel"][:, V:], after["lm_head/kernel"][:, V:])
    np.testing.assert_array_equal(before["layers/mlp/up_proj/kernel"], after["layers/mlp/up_proj/kernel"])


def test_lr_multiplier_scales_the_update():
    b0, a0, _ = _run(tiny_config(_stage()), steps=1)
    b1, a1, _ = _run(tiny_config(_stage(lr_multipliers=(("layers/attn/.*", 0.1),))), steps=1)
    d_attn0 = np.abs(a0["layers/attn/q_proj/kernel"] - b0["layers/attn/q_proj/kernel"]).mean()
    d_attn1 = np.abs(a1["layers/attn/q_proj/kernel"] - b1["layers/attn/q_proj/kernel"]).mean()
    np.testing.assert_allclose(d_attn1, 0.1 * d_attn0, rtol=1e-3)  # Adam's first step is lr * sign-like
    np.testing.assert_allclose(np.abs(a1["layers/mlp/up_proj/kernel"] - b1["layers/mlp/up_proj/kernel"]).mean(),
                               np.abs(a0["layers/mlp/up_proj/kernel"] - b0["layers/mlp/up_proj/kernel"]).mean(),
                               rtol=1e-5)


def test_schedule_values():
    st = common.stage_config("s", steps=110, lr=1.0, warmup_steps=10, schedule="cosine", end_lr_ratio=0.1)
    s = optim.schedule(st)
    np.testing.assert_allclose([s(0), s(5), s(10), s(60), s(110)], [0.0, 0.5, 1.0, 0.55, 0.1], atol=1e-6)
    s = optim.schedule(common.stage_config("s", steps=20, lr=2.0, warmup_steps=0, schedule="linear", end_lr_ratio=0.5))
    np.testing.assert_allclose([s(0), s(10), s(20)], [2.0, 1.5, 1.0], atol=1e-6)


def test_pattern_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match="stage 's': trainable pattern 'layer/.*' matches no parameter"):
        _run(tiny_config(_stage(trainable=("layer/.*",))), steps=1)


def test_frozen_gradients_are_not_computed_and_not_in_the_grad_norm():
    """Frozen parameters get constant-zero gradients in the step itself: the compiled step of a stage
    that trains only the MLPs does fewer FLOPs than the all-trainable one (XLA drops the frozen
    weight-gradient matmuls), and the grad-norm metric is the trainable gradients' norm."""
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    batch = sharding.global_batch(mesh, synthetic_batch(np.random.default_rng(0), 8, 16, 64))
    flops, norms = {}, {}
    for name, trainable in (("all", (".*",)), ("mlp", ("layers/mlp/.*",))):
        config = tiny_config(_stage(trainable=trainable, lr=0.0), weight_decay=0.0)
        _, _, state = state_lib.create_state(config, 0, mesh)
        step = step_lib.make_train_step(config, 0, mesh)
        flops[name] = step.lower(state, batch).compile().cost_analysis()["flops"]
        if name == "all":  # the full gradient, to take the MLP part's norm by hand (before the step donates)
            grads, sums = step_lib._grads(state.params, config_graphdef(config, mesh), batch,
                                          config.model.text_vocab_size, 1)
            flat = _flat(jax.tree.map(lambda g: g / sums["tokens"], grads))
            mlp_norm = np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for k, v in flat.items()
                                   if k.startswith("layers/mlp/")))
        _, metrics = step(state, batch)
        norms[name] = float(metrics["grad_norm"])
    assert flops["mlp"] < 0.9 * flops["all"], flops
    assert norms["mlp"] == pytest.approx(mlp_norm, rel=1e-4)
    assert norms["mlp"] < norms["all"]


def config_graphdef(config, mesh):
    graphdef, _, _ = step_lib.abstract_state(config, 0, mesh)
    return graphdef


def test_stage_header_counts_the_trainable_parameters():
    """The stage header's 'trains X of Y parameters' is the sum of the unfrozen arrays' sizes."""
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    config = tiny_config(_stage(trainable=("layers/mlp/.*",)))
    _, _, abstract = state_lib.abstract_state(config, 0, mesh)
    sizes = {k: v.size for k, v in _flat(state_lib.create_state(config, 0, mesh)[2].params).items()}
    mlp = sum(n for k, n in sizes.items() if k.startswith("layers/mlp/"))
    assert 0 < mlp < sum(sizes.values())
    assert optim.trainable_summary(abstract.params, config.stages[0]) == (
        f"trains {mlp:,} of {sum(sizes.values()):,} parameters")
    rows = tiny_config(_stage(trainable=("embed/.*",), new_vocab_only=True)).stages[0]
    assert optim.trainable_summary(abstract.params, rows).endswith("only the new vocabulary rows)")
