"""Metrics: JSONL lines and TensorBoard event files (tensorboardX, no TensorFlow), plus a
tqdm bar for interactive runs. Only process 0 writes.

Step metrics stay on device between log steps; `MetricsLogger.log` pulls them with one
`device_get` every `log_every` steps, so the training loop has no per-step host sync.
"""
from __future__ import annotations

import json
import os
import sys
import time

import jax
import numpy as np


class MetricsLogger:
    def __init__(self, workdir: str, *, total_steps: int, initial_step: int = 0, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._pending: list[dict] = []
        self._last_time = time.perf_counter()
        self._last_step = initial_step
        self._tb = None
        self._bar = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(logdir=os.path.join(workdir, "tensorboard"))
        interactive = sys.stderr.isatty() and not os.environ.get("CI")
        if interactive:
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)

    def accumulate(self, metrics: dict) -> None:
        """Keeps this step's (device) metrics until the next log."""
        self._pending.append(metrics)

    def log(self, step: int, extra: dict | None = None) -> dict | None:
        """Averages the pending metrics, adds throughput, writes them. Returns the row.

        `loss/<dataset>` is averaged weighted by `tokens/<dataset>` (the train step's per-dataset split).

        Throughput: `tokens` (LLM) and `images` (tokenizers) per-step counts become per-second rates.
        """
        if not self._pending:
            return None
        host = jax.device_get(self._pending)
        self._pending = []
        now = time.perf_counter()
        steps = max(step - self._last_step, 1)
        elapsed = max(now - self._last_time, 1e-9)
        self._last_time, self._last_step = now, step
        row = {"step": int(step)}
        for k in host[-1]:
            vals = np.asarray([h[k] for h in host], np.float64)
            if k.startswith("loss/") and "tokens/" + k[5:] in host[-1]:
                # A dataset's loss over the window: weighted by its tokens in each step, so steps
                # the mixture gave it no rows count for nothing (and none at all leaves it out).
                weights = np.asarray([h["tokens/" + k[5:]] for h in host], np.float64)
                if weights.sum() > 0:
                    row[k] = float((vals * weights).sum() / weights.sum())
                continue
            row[k] = float(vals.sum() if k in ("nan_skipped",) else vals.mean())
        for count, rate in (("tokens", "trained_tokens_per_s"), ("images", "images_per_s")):
            if count in host[-1]:
                row[rate] = float(sum(h[count] for h in host)) / elapsed
        row["steps_per_s"] = steps / elapsed
        if "lr" in host[-1]:
            row["lr"] = float(host[-1]["lr"])
        row.update(extra or {})
        self._write(row)
        return row

    def log_row(self, step: int, row: dict) -> dict:
        """Writes a row of its own (e.g. a final evaluation, after the last training row)."""
        row = {"step": int(step), **row}
        self._write(row)
        return row

    def _write(self, row: dict) -> None:
        if not self.enabled:
            return
        step = row["step"]
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if isinstance(v, (int, float)) and k != "step":
                self._tb.add_scalar(k, v, step)
        if self._bar is not None:
            if "loss" in row:
                self._bar.n = step
                self._bar.set_postfix(loss=f"{row['loss']:.3f}", refresh=True)
        else:
            print(self._line(row), flush=True)

    @staticmethod
    def _line(row: dict) -> str:
        if "text_loss" in row:   # the LLM engine's row
            by_dataset = ", ".join(f"{k[5:]} {v:.3f}" for k, v in row.items() if k.startswith("loss/"))
            return (f"step {row['step']}: loss {row['loss']:.4f} (text {row['text_loss']:.4f}, image "
                    f"{row['image_loss']:.4f}) grad_norm {row['grad_norm']:.3f} lr {row['lr']:.2e} "
                    f"{row['trained_tokens_per_s']:.0f} tok/s" + (f" | {by_dataset}" if by_dataset else ""))
        skip = {"step", "phase", "steps_per_s", "lr", "images", "tokens"}
        parts = [f"{k} {v:.4g}" for k, v in row.items() if k not in skip and isinstance(v, (int, float))]
        return f"{row.get('phase', '')} step {row['step']}: " + ", ".join(parts)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._bar is not None:
            self._bar.close()
