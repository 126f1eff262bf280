"""The main job on the built-in default world (ShapeComp): `bash launch/local.sh demo`.

1. builds ShapeComp level 0-1 datasets (TFDS / ArrayRecord) and trains the sentencepiece
   tokenizer (both cached in the workdir);
2. trains the tiny LLM through the config's stages in a child process, preempts it with
   SIGTERM part-way (as a TPU pod would), and restarts the same command, which resumes
   from the checkpoint it saved on the way out;
3. prints the loss curve per stage and where every output is.
Later issues extend it with the vision tokenizer, generation and the ShapeComp scores.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from absl import logging


def _train_cmd(config_arg: str, workdir: str, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "illume_jax", "train", f"--config={config_arg}", f"--workdir={workdir}", *overrides]


def _read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _wait_for_step(proc: subprocess.Popen, workdir: str, step: int, timeout_s: float) -> int | None:
    """Polls metrics.jsonl until a logged step >= `step`; None if the child ended first."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            return None
        rows = _read_metrics(workdir)
        if rows and rows[-1].get("step", 0) >= step:
            return rows[-1]["step"]
        time.sleep(0.5)
    return None


def run(config, config_arg: str, workdir: str, overrides: list[str], preempt_at_step: int = 40) -> dict:
    from illume_jax.data import build
    from illume_jax.data.tokenizers import load_or_train_tokenizer

    t0 = time.time()
    data_dir = config.data.data_dir or os.path.join(workdir, "data")
    print(f"[1/3] building ShapeComp datasets in {data_dir} and the tokenizer ...", flush=True)
    infos = build.build_datasets(config, data_dir)
    tokenizer = load_or_train_tokenizer(config, workdir)
    for name, info in infos.items():
        print(f"      {name}: {info}")
    print(f"      tokenizer: {tokenizer.vocab_size} pieces ({time.time() - t0:.0f}s)", flush=True)

    cmd = _train_cmd(config_arg, workdir, overrides)
    resumed = False
    if not _read_metrics(workdir):
        print(f"[2/3] training; will preempt with SIGTERM after step {preempt_at_step}: {' '.join(cmd)}", flush=True)
        proc = subprocess.Popen(cmd)
        hit = _wait_for_step(proc, workdir, preempt_at_step, timeout_s=600)
        if hit is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait()
            print(f"      SIGTERM sent after step {hit}; the run saved and exited with code {proc.returncode}; "
                  f"restarting the same command",
                  flush=True)
            resumed = True
        else:
            proc.wait()
            if proc.returncode:
                raise SystemExit(f"training failed with exit code {proc.returncode}")
    if resumed or _read_metrics(workdir):
        proc = subprocess.run(cmd)
        if proc.returncode:
            raise SystemExit(f"training failed with exit code {proc.returncode}")

    rows = _read_metrics(workdir)
    print("[3/3] results", flush=True)
    summary = {"stages": {}, "resumed_after_preemption": resumed, "seconds": round(time.time() - t0, 1)}
    for row in rows:
        st = summary["stages"].setdefault(row.get("stage", "?"), {"first_loss": row["loss"], "steps": []})
        st["last_loss"] = row["loss"]
        st["steps"].append(row["step"])
    for name, st in summary["stages"].items():
        print(f"      stage {name}: loss {st['first_loss']:.3f} -> {st['last_loss']:.3f} "
              f"(steps {st['steps'][0]}..{st['steps'][-1]})")
    first, last = rows[0]["loss"], rows[-1]["loss"]
    summary.update(first_loss=first, last_loss=last)
    print(f"      loss {first:.3f} -> {last:.3f}; {'resumed after preemption; ' if resumed else ''}"
          f"{summary['seconds']:.0f}s in all")
    print(f"      outputs: checkpoints {os.path.join(workdir, 'checkpoints')}\n"
          f"               metrics     {os.path.join(workdir, 'metrics.jsonl')} (+ TensorBoard events in {workdir})\n"
          f"               tokenizer   {os.path.join(workdir, 'tokenizer')}\n"
          f"               datasets    {data_dir}")
    with open(os.path.join(workdir, "demo_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if not last < first:
        logging.error("the loss did not fall (%.3f -> %.3f)", first, last)
        raise SystemExit(1)
    return summary
