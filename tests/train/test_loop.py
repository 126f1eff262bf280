"""The staged loop: exact resume after a stop (same losses, same next batch), stage hand-over,
restore onto another mesh, metrics files."""
import json
import os

import jax
import numpy as np
import pytest

from configs import common
from illume_jax import sharding
from illume_jax.train import checkpoint as ckpt_lib, loop, state as state_lib
from train.helpers import synthetic_iterator_factory, tiny_config


def _config():
    return tiny_config(stages=[
        common.stage_config("a", steps=5, seq_len=16, global_batch_size=8, lr=1e-2, warmup_steps=0,
                            mixture={"synthetic": 1.0}),
        common.stage_config("b", steps=5, seq_len=16, global_batch_size=8, lr=5e-3, warmup_steps=1,
                            trainable=("layers/.*",), mixture={"synthetic": 1.0})])


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f)]


class RecordingFactory:
    """Wraps the synthetic iterators and records every batch handed to the loop."""

    def __init__(self, config):
        self.inner = synthetic_iterator_factory(config, 64)
        self.batches = []

    def __call__(self, stage_index):
        it = self.inner(stage_index)
        outer = self

        class It:
            def __next__(self):
                b = next(it)
                outer.batches.append(b["tokens"].copy())
                return b

            def get_state(self):
                return it.get_state()

            def set_state(self, s):  # grain's handler passes bytes to non-grain iterators
                it.set_state(json.loads(s) if isinstance(s, bytes) else s)

            def start_prefetch(self):
                pass
        return It()


def test_resume_after_stops_matches_uninterrupted_run(tmp_path):
    config = _config()
    full = RecordingFactory(config)
    loop.train(config, str(tmp_path / "full"), make_iterator=full)
    parts = RecordingFactory(config)
    r = loop.train(config, str(tmp_path / "parts"), make_iterator=parts, stop_after_steps=3)
    assert r["preempted"] and r["stopped_at"] == 3
    loop.train(config, str(tmp_path / "parts"), make_iterator=parts, stop_after_steps=4)  # crosses into stage b
    loop.train(config, str(tmp_path / "parts"), make_iterator=parts)
    assert _losses(tmp_path / "full") == _losses(tmp_path / "parts")
    assert len(parts.batches) == len(full.batches) == 10
    for a, b in zip(full.batches, parts.batches):
        np.testing.assert_array_equal(a, b)
    with open(tmp_path / "full" / "metrics.jsonl") as f:
        row = json.loads(f.readline())
    for key in ("loss", "text_loss", "image_loss", "grad_norm", "lr", "trained_tokens_per_s", "steps_per_s",
                "stage", "nan_skipped"):
        assert key in row
    assert os.listdir(tmp_path / "full" / "tensorboard")


def test_restore_onto_a_different_mesh(tmp_path, monkeypatch):
    config = _config()
    mesh8 = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    loop.train(config, str(tmp_path), make_iterator=synthetic_iterator_factory(config, 64), stop_after_steps=2,
               mesh=mesh8)
    ck = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"))
    step = ck.latest_step()
    saved = {}
    for name, mesh in (("8", mesh8), ("4", sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 1},
                                                              devices=jax.devices()[:4])),
                       ("1", sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1]))):
        _, _, abs_state = state_lib.abstract_state(config, 0, mesh)
        state = ck.restore(step, abs_state, None)
        up = state.params["layers"]["mlp"]["up_proj"]["kernel"][...]
        assert len(up.sharding.device_set) == int(name)
        saved[name] = [np.asarray(x) for x in jax.tree.leaves(state)]
        assert int(state.step) == 2
    for a, b in zip(saved["8"], saved["4"]):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(saved["8"], saved["1"]):
        np.testing.assert_array_equal(a, b)
    # Inference loads only some fields (no optimizer state), onto any mesh; the rest are None.
    _, _, abs_state = state_lib.abstract_state(config, 0, mesh8)
    full = ck.restore(step, abs_state, None)
    part = ck.restore_fields(step, state_lib.abstract_state(config, 0, sharding.make_mesh(
        {"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1]))[2], ("step", "params"))
    assert part.opt_state is None and part.rng is None and int(part.step) == 2
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(part.params)):
        assert len(b.sharding.device_set) == 1
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="not fields of TrainState"):
        ck.restore_fields(step, abs_state, ("params", "ema"))
    # Small single-process states go through host memory (checkpoint.through_host); a pod's
    # sharded path reads those files, and the host path reads a pod's.
    assert ckpt_lib.through_host(abs_state)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(abs_state)):
        assert a.sharding == b.sharding
    monkeypatch.setattr(ckpt_lib, "HOST_SIDE_MAX_BYTES", 0)
    sharded = ck.restore(step, abs_state, None)
    pod = ckpt_lib.Checkpointer(str(tmp_path / "pod"), async_save=False)
    pod.save(step, sharded, None, {"step": step})
    monkeypatch.undo()
    for got in (sharded, pod.restore(step, abs_state, None)):
        for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(got)):
            assert a.sharding == b.sharding
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    pod.close()
    ck.close()


def test_stage_ends_survive_pruning_and_stop_after_stage(tmp_path):
    """A run stopped at the end of stage 'a' continues with the same command without the flag;
    each stage's last checkpoint outlives max_to_keep, so the self-enhancement round (or any fork
    of a later stage) can start from the stage before the last."""
    import pytest

    from illume_jax.align import round as round_lib
    config = _config()
    config.checkpoint.update(every_steps=1, max_to_keep=2, async_save=False)
    make = synthetic_iterator_factory(config, 64)
    with pytest.raises(ValueError, match=r"stage 'c': the config's stages are \['a', 'b'\]"):
        loop.stage_end_step(config, "c")
    r = loop.train(config, str(tmp_path), make_iterator=make, stop_after_stage="a")
    assert r == dict(r, stopped_at=5, preempted=False)
    again = loop.train(config, str(tmp_path), make_iterator=make, stop_after_stage="a")
    assert again["stopped_at"] == 5  # nothing to do: no step is run twice
    loop.train(config, str(tmp_path), make_iterator=make)
    ck = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"))
    assert ck.all_steps() == [5, 9, 10]  # the last two, and the end of stage 'a'
    assert ck.restore_meta(5)["stage_name"] == "a"
    ck.close()
    assert [s for s, _ in _losses(tmp_path)][-1] == 10

    with config.unlocked():
        config.self_enhance = common.self_enhance_config()
    assert round_lib.start_step(config, str(tmp_path)) == 5  # '' = the stage before the last
    config.self_enhance.from_stage = "latest"
    assert round_lib.start_step(config, str(tmp_path)) is None
    config.self_enhance.from_stage = "b"
    assert round_lib.start_step(config, str(tmp_path)) == 10
    config.checkpoint.keep_stage_ends = False
    config.self_enhance.from_stage = ""
    loop.train(config, str(tmp_path / "pruned"), make_iterator=synthetic_iterator_factory(config, 64))
    with pytest.raises(ValueError, match=r"from_stage='a'.*step 5.*--stop_after_stage=a"):
        round_lib.start_step(config, str(tmp_path / "pruned"))


def test_an_llm_run_forks_from_a_checkpoint_of_another_run(tmp_path):
    """model_init.weights_from = a `train` workdir also serves the LLM-only configs (configs/tiny.py and the
    ILLUME+ 3B / 7B configs carry `model_init`): the fork's first stage starts from that run's checkpoint
    at weights_step (here the end of stage 'a'; with lr 0 it ends there too), not from config.seed."""
    from illume_jax.train import state as state_lib
    config = _config()
    loop.train(config, str(tmp_path / "run"), make_iterator=synthetic_iterator_factory(config, 64))
    fork = _config()
    fork.stages = [fork.stages[1]]
    fork.stages[0].lr = 0.0
    with fork.unlocked():
        fork.model_init = common.model_init_config(weights_from=str(tmp_path / "run"), weights_step=5)
    loop.train(fork, str(tmp_path / "fork"), make_iterator=synthetic_iterator_factory(fork, 64))
    mesh = sharding.make_mesh(dict(config.mesh))
    flat = lambda run, step: {str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(  # noqa: E731
        state_lib.checkpoint_params(str(tmp_path / run), step, mesh, where=run)[1])[0]}
    source, forked, last = flat("run", 5), flat("fork", None), flat("run", 10)
    assert source.keys() == forked.keys()
    for name, x in source.items():
        np.testing.assert_array_equal(forked[name], x, err_msg=name)
    assert any(not np.array_equal(last[name], x) for name, x in source.items())   # (stage 'b' moved them)
