"""A resumable training phase: the loop shared by the vision-tokenizer trainers.

The LLM engine (`train/loop.py`) runs config stages over one TrainState; the tokenizer
trainers (SigLIP pre-training of the semantic ViT, then the tokenizer with its GAN
discriminator) each have their own state pytree and step functions, but need the same
machinery: sharded state created inside jit, Orbax checkpoints holding the state and the
Grain iterator position, resume from the workdir, SIGTERM -> save and exit, metrics.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import jax

from illume_jax import sharding
from illume_jax.train import checkpoint as ckpt_lib
from illume_jax.train import metrics as metrics_lib
from illume_jax.train.loop import StepPacer, _Preemption


def run_phase(name: str, workdir: str, *, mesh, steps: int, abstract_state: Any,
              init_state: Callable[[], Any], step_fn: Callable[[Any, dict, int], tuple[Any, dict]],
              iterator, checkpoint: Any, log_every: int, config_json: str,
              eval_fn: Callable[[Any, int], dict] | None = None, eval_every: int = 0,
              stop_after_steps: int | None = None) -> dict:
    """Runs (or resumes) one phase in `workdir`; returns the last logged metrics row.

    abstract_state: ShapeDtypeStructs with shardings (restore target); init_state() makes a
    fresh sharded state; step_fn(state, batch, step) -> (state, metrics), where `step` is the
    host-side step (lets the caller switch compiled variants, e.g. before/after the
    discriminator starts). `eval_fn(state, step)` runs every `eval_every` steps and at the end;
    its results are logged with the metrics and returned.
    """
    os.makedirs(workdir, exist_ok=True)
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=checkpoint.max_to_keep,
                                 async_save=checkpoint.async_save)
    step = ckpt.latest_step()
    if step is not None:
        state = ckpt.restore(step, abstract_state, iterator)
        print(f"{name}: resuming from step {step}", flush=True)
    else:
        state, step = init_state(), 0
    logger = metrics_lib.MetricsLogger(workdir, total_steps=steps, initial_step=step)
    last_row: dict = {}
    run_steps = 0

    def save():
        ckpt.save(step, state, iterator, dict(phase=name, step=step, mesh=dict(mesh.shape), config=config_json),
                  force=True)

    if step >= steps:  # finished earlier: report what was logged then (no re-evaluation)
        ckpt.close()
        logger.close()
        return dict(_last_logged(workdir), step=step, state=state, preempted=False)
    print(f"{name}: steps {step}..{steps}", flush=True)
    pace = StepPacer()
    with _Preemption() as preempt:
        while step < steps:
            batch = sharding.global_batch(mesh, next(iterator))
            state, metrics = step_fn(state, batch, step)
            pace(metrics)
            step += 1
            run_steps += 1
            logger.accumulate(metrics)
            extra = {"phase": name}
            if eval_fn is not None and eval_every and step % eval_every == 0 and step < steps:
                extra.update(eval_fn(state, step))
            if step % log_every == 0 or step == steps or len(extra) > 1:
                last_row = logger.log(step, extra) or last_row
            stopping = step < steps and (preempt.requested or
                                         (stop_after_steps is not None and run_steps >= stop_after_steps))
            if stopping or step % checkpoint.every_steps == 0 or step == steps:
                save()
            if stopping:
                ckpt.close()
                logger.close()
                print(f"{name}: stopped at step {step} (checkpoint saved in {ckpt.directory})", flush=True)
                return dict(last_row, step=step, state=state, preempted=True)
    ckpt.close()
    if eval_fn is not None:
        final = eval_fn(state, step)
        last_row = dict(last_row, **logger.log_row(step, dict(final, phase=name)))
    logger.close()
    print(f"{name}: done ({steps} steps); checkpoints in {ckpt.directory}", flush=True)
    return dict(last_row, step=step, state=state, preempted=False)


def _last_logged(workdir: str) -> dict:
    """The merged last training row and last evaluation row of a finished phase's metrics.jsonl."""
    import json
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    rows = [json.loads(line) for line in open(path) if line.strip()]
    out: dict = {}
    for row in rows[-2:]:
        out.update(row)
    return out
