"""The resumable phase loop (`train/phase.py`): a SIGTERM saves and stops at the next step, and the
host never runs more than one step ahead of the device, so that save does not first wait for a
queue of asynchronously dispatched steps (tens of steps on CPU before this was bounded)."""
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np

from configs import common
from illume_jax import sharding
from illume_jax.train import checkpoint as ckpt_lib
from illume_jax.train.phase import run_phase


class _CountingIterator:
    """Endless batches; its position is checkpointed like a Grain iterator's."""

    def __init__(self):
        self.position = 0

    def __next__(self):
        self.position += 1
        return {"x": np.full((8, 256), self.position * 1e-3, np.float32)}

    def get_state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: bytes) -> None:  # what grain's checkpoint handler hands back
        self.position = json.loads(state)["position"]

    def start_prefetch(self) -> None:
        pass


@jax.jit
def _slow_step(state, batch):
    # ~10 ms of device work per step on CPU: enough for an unbounded host loop to race ahead.
    w = state["w"]
    for _ in range(8):
        w = jnp.tanh(w @ w.T) * 0.5 + jnp.mean(batch["x"])
    return {"step": state["step"] + 1, "w": w}, {"loss": jnp.mean(w)}


def _init_state():
    return {"step": jnp.zeros((), jnp.int32), "w": jnp.eye(384, dtype=jnp.float32)}


def _run(tmp_path, steps, on_dispatch, iterator=None):
    mesh = sharding.make_mesh(dict(common.mesh_config()))

    def step_fn(state, batch, step):
        out = _slow_step(state, batch)
        on_dispatch(step, out[1])
        return out

    jax.block_until_ready(_slow_step(_init_state(), next(_CountingIterator())))  # compile outside the loop
    return run_phase("toy", str(tmp_path), mesh=mesh, steps=steps, abstract_state=jax.eval_shape(_init_state),
                     init_state=_init_state, step_fn=step_fn, iterator=iterator or _CountingIterator(),
                     checkpoint=common.checkpoint_config(every_steps=1000, async_save=False), log_every=1000,
                     config_json="{}")


def test_host_stays_within_one_step_of_the_device(tmp_path):
    dispatched = []

    def on_dispatch(step, metrics):
        dispatched.append(metrics)

    def in_flight():
        return sum(not m["loss"].is_ready() for m in dispatched)

    counts = []
    _run(tmp_path, 30, lambda step, m: (on_dispatch(step, m), counts.append(in_flight())))
    # At each dispatch: this step and at most the one before it are still being computed.
    assert max(counts) <= 2, counts


def test_sigterm_saves_and_stops_at_the_next_step(tmp_path):
    def on_dispatch(step, metrics):
        if step == 3:  # the preemption notice arrives while step 3 (0-based) is being dispatched
            os.kill(os.getpid(), signal.SIGTERM)

    out = _run(tmp_path, 40, on_dispatch)
    assert out["preempted"] and out["step"] == 4, out
    assert ckpt_lib.Checkpointer(os.path.join(tmp_path, "checkpoints")).latest_step() == 4
    assert int(out["state"]["step"]) == 4
    # Resuming picks up from there (the data position too) and finishes.
    iterator = _CountingIterator()
    done = _run(tmp_path, 6, lambda step, m: None, iterator)
    assert not done["preempted"] and done["step"] == 6 and int(done["state"]["step"]) == 6
    assert iterator.position == 6


def test_second_sigterm_exits_at_once():
    """The first SIGTERM only sets the flag the loops read between steps; a process stuck before
    the next step (here: a data iterator that never yields) leaves on the second one."""
    import time

    import pytest

    from illume_jax.train.loop import _Preemption
    before = signal.getsignal(signal.SIGTERM)
    with _Preemption() as preempt:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # Python runs the handler between bytecodes
        assert preempt.requested
        with pytest.raises(SystemExit) as exit_info:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(500):  # stands in for a hung iterator; the handler raises in here
                time.sleep(0.01)
        assert exit_info.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before
