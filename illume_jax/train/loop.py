"""The staged training loop: `python -m illume_jax train --config=... --workdir=...`.

Stages run in order; stage N starts from the parameters stage N-1 ended with and gets a
fresh optimizer (its own trainable set, learning rates and schedule) and its own data
iterator. Checkpoints are written every `config.checkpoint.every_steps`, at the end of each
stage and on SIGTERM (preemption); re-running the same command restores the stage, step,
train state and data position and continues as if never interrupted.
"""
from __future__ import annotations

import os
import signal
from typing import Any, Callable

import jax
from absl import logging

from illume_jax import sharding
from illume_jax.train import checkpoint as ckpt_lib
from illume_jax.train import metrics as metrics_lib
from illume_jax.train import optim as optim_lib
from illume_jax.train import state as state_lib
from illume_jax.train import step as step_lib


class _Preemption:
    """Turns SIGTERM into a flag the loop checks between steps (then it saves and exits).

    A second SIGTERM exits at once (SystemExit, no checkpoint): the flag is only read between steps,
    so a process stuck before the next one (a data iterator that never yields, say) would otherwise
    ignore every SIGTERM and need SIGKILL. The newest checkpoint is still the last saved one."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. some test runners): no handler
            self._previous = None
        return self

    def _handle(self, signum, frame):
        if self.requested:
            logging.warning("second SIGTERM: exiting now, without a checkpoint")
            raise SystemExit(128 + signal.SIGTERM)
        logging.warning("SIGTERM received: saving a checkpoint and stopping after this step "
                        "(a second SIGTERM exits at once)")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class StepPacer:
    """Keeps the host at most one step ahead of the device.

    JAX dispatches steps asynchronously and the loop only reads results when it logs metrics, so
    without a bound the host runs up to `log_every` steps ahead. A SIGTERM seen at host step N then
    saves only after the device has worked through all of them (on 2 CPU cores: 50 steps, over a
    minute, longer than a preemption's grace period). Waiting for the previous step's metrics
    still lets the host fetch and shard the next batch while the device computes this one."""

    def __init__(self):
        self._previous = None

    def __call__(self, metrics) -> None:
        if self._previous is not None:
            jax.block_until_ready(self._previous)
        self._previous = metrics


def stage_offsets(config: Any) -> list[int]:
    """Global step at which each stage starts."""
    out, total = [], 0
    for st in config.stages:
        out.append(total)
        total += st.steps
    return out


def stage_end_steps(config: Any) -> tuple[int, ...]:
    """Global step of each stage's last checkpoint (kept when `checkpoint.keep_stage_ends`)."""
    return tuple(o + st.steps for o, st in zip(stage_offsets(config), config.stages))


def stage_end_step(config: Any, name: str) -> int:
    """Global step at which the stage called `name` ends; the error lists the config's stages."""
    names = [st.name for st in config.stages]
    if name not in names:
        raise ValueError(f"stage {name!r}: the config's stages are {names}")
    return stage_end_steps(config)[names.index(name)]


def default_iterator_factory(config: Any, workdir: str, tokenizer=None) -> Callable[[int], Any]:
    """Builds the datasets and tokenizer once; returns stage_index -> Grain iterator."""
    from illume_jax.data import build, pipeline
    from illume_jax.data.tokenizers import load_or_train_tokenizer

    data_dir = config.data.data_dir or os.path.join(workdir, "data")
    build.build_datasets(config, data_dir)
    tokenizer = tokenizer or load_or_train_tokenizer(config, workdir)
    if "vision" in config:
        from illume_jax.data import multimodal

        return lambda stage_index: multimodal.make_multimodal_iterator(
            config, stage_index, tokenizer, data_dir, seed=config.seed, process_index=jax.process_index(),
            process_count=jax.process_count())
    return lambda stage_index: pipeline.make_train_iterator(
        config, stage_index, tokenizer, data_dir, process_index=jax.process_index(),
        process_count=jax.process_count(), seed=config.seed)


def train(config: Any, workdir: str, *, make_iterator: Callable[[int], Any] | None = None, tokenizer=None,
          stop_after_steps: int | None = None, stop_after_stage: str | None = None, mesh=None) -> dict:
    """Runs (or resumes) all stages. `stop_after_steps` stops this run after that many
    steps as if preempted (checkpoint, then return) — for tests and demos. `stop_after_stage`
    stops at the end of the stage of that name (the same command without it continues), e.g. to
    fork stage 3 from the stage-2 model."""
    workdir = os.path.abspath(workdir)
    stop_at = stage_end_step(config, stop_after_stage) if stop_after_stage else None
    mesh = mesh or sharding.make_mesh(dict(config.mesh))
    make_iterator = make_iterator or default_iterator_factory(config, workdir, tokenizer)
    offsets = stage_offsets(config)
    keep = stage_end_steps(config) if config.checkpoint.get("keep_stage_ends", True) else ()
    ckpt = ckpt_lib.Checkpointer(config.checkpoint.get("directory") or os.path.join(workdir, "checkpoints"),
                                 max_to_keep=config.checkpoint.max_to_keep, async_save=config.checkpoint.async_save,
                                 keep_steps=keep)
    total = offsets[-1] + config.stages[-1].steps
    meta = ckpt.restore_meta()
    resume_step = ckpt.latest_step()
    start_stage = meta["stage_index"] if meta else 0
    logger = metrics_lib.MetricsLogger(workdir, total_steps=total, initial_step=resume_step or 0)
    if meta:
        logging.info("resuming from checkpoint step %d (stage %s)", resume_step, meta["stage_name"])
        print(f"resuming from step {resume_step} (stage {meta['stage_name']!r})", flush=True)

    if stop_at is not None and (resume_step or 0) >= stop_at:
        print(f"stage {stop_after_stage!r} already ended (checkpoint step {resume_step}); nothing to do", flush=True)
        ckpt.close()
        logger.close()
        return dict(stopped_at=resume_step, preempted=False)
    vision = None
    if "vision" in config:  # MLLM: the frozen tokenizer makes the codes and seeds the tower
        from illume_jax.train.multimodal import VisionTokenizer
        vision = VisionTokenizer(config, mesh)
    params, last_row, run_steps = None, {}, 0
    pace = StepPacer()
    with _Preemption() as preempt:
        for si in range(start_stage, len(config.stages)):
            stage = config.stages[si]
            iterator = make_iterator(si)
            abstract = state_lib.abstract_state(config, si, mesh)
            graphdef, tx, abs_state = abstract
            if meta and si == start_stage:
                state = ckpt.restore(resume_step, abs_state, iterator)
            else:
                fresh = params is None
                init = config.get("model_init", {}) if fresh else {}
                weights_from = init.get("weights_from", "")
                # Forking a `train` run (a model that changes, say, by a new module) or fine-tuning
                # converted weights (the MLLM's own tower included).
                from_run = bool(weights_from) and state_lib.is_train_run(weights_from)
                # An MLLM starting from a converted text LLM (ILLUME+'s Qwen2.5, ILLUME's Vicuna): fresh
                # parameters, the LLM grafted in, the tower from the vision tokenizer.
                from illume_jax.convert import weights as weights_lib
                from_text_llm = bool(weights_from) and not from_run and vision is not None and \
                    weights_lib.info(weights_from)["kind"] == "llm"
                if weights_from and not from_run and not from_text_llm:
                    params = state_lib.load_converted_params(weights_from, abs_state.params, "vision" in config)
                _, _, state = state_lib.create_state(config, si, mesh, params=params, step=offsets[si],
                                                     abstract=abstract)
                if from_text_llm:
                    state = state.replace(params=state_lib.graft_text_llm(weights_from, state.params, config))
                if fresh and (from_run or from_text_llm or not weights_from) and vision is not None:
                    state = state.replace(params=vision.with_tower(state.params))
                if from_run:
                    step0 = init.get("weights_step", -1)
                    state = state.replace(params=state_lib.load_run_params(
                        weights_from, state.params, mesh, step=None if step0 < 0 else step0,
                        reinit=tuple(init.get("reinit", ())), workdir=workdir))
            step_fn = step_lib.make_train_step(config, si, mesh, graphdef, tx, abs_state, vision=vision)
            stage_step, step = int(state.stage_step), int(state.step)
            if stage_step < stage.steps:
                print(f"stage {si} {stage.name!r}: steps {stage_step}..{stage.steps} "
                      f"(global {step}..{offsets[si] + stage.steps}); "
                      f"{optim_lib.trainable_summary(abs_state.params, stage)}"
                      + (f"; {state_lib.stage_resolution(config, si)}² images" if vision is not None else ""),
                      flush=True)

            def save(force: bool):
                ckpt.save(step, state, iterator, dict(stage_index=si, stage_name=stage.name, step=step,
                                                      stage_step=stage_step, mesh=dict(mesh.shape),
                                                      config=config.to_json()), force=force)

            while stage_step < stage.steps:
                batch = sharding.global_batch(mesh, next(iterator))
                state, metrics = step_fn(state, batch)
                pace(metrics)
                stage_step += 1
                step += 1
                run_steps += 1
                logger.accumulate(metrics)
                if stage_step % config.log_every == 0 or stage_step == stage.steps:
                    last_row = logger.log(step, {"stage": stage.name}) or last_row
                stopping = (preempt.requested or (stop_after_steps is not None and run_steps >= stop_after_steps)
                            or step == stop_at)
                if stopping or step % config.checkpoint.every_steps == 0 or stage_step == stage.steps:
                    logger.log(step, {"stage": stage.name})
                    save(force=True)
                if stopping:
                    ckpt.close()
                    logger.close()
                    if step == stop_at and not preempt.requested:
                        print(f"stage {stop_after_stage!r} done at step {step}; stopped as asked (checkpoint in "
                              f"{ckpt.directory}; run without --stop_after_stage to continue)", flush=True)
                        return dict(last_row, stopped_at=step, preempted=False)
                    print(f"stopped at step {step} (checkpoint saved in {ckpt.directory})", flush=True)
                    return dict(last_row, stopped_at=step, preempted=True)
            params = state.params
            meta = None
    ckpt.close()
    logger.close()
    print(f"training done: {total} steps; checkpoints in {ckpt.directory}, metrics in {logger.path}", flush=True)
    return dict(last_row, preempted=False)
