"""The metrics logger's averaging over a log window."""
import json

import numpy as np

from illume_jax.train.metrics import MetricsLogger


def test_dataset_losses_average_by_their_tokens_and_absent_datasets_are_left_out(tmp_path):
    log = MetricsLogger(str(tmp_path), total_steps=10, enabled=True)
    log.accumulate({"loss": np.float32(2.0), "tokens": np.float32(100.0), "loss/qa": np.float32(1.0),
                    "tokens/qa": np.float32(10.0), "loss/edit": np.float32(0.0), "tokens/edit": np.float32(0.0)})
    log.accumulate({"loss": np.float32(4.0), "tokens": np.float32(100.0), "loss/qa": np.float32(4.0),
                    "tokens/qa": np.float32(30.0), "loss/edit": np.float32(0.0), "tokens/edit": np.float32(0.0)})
    row = log.log(2)
    log.close()
    assert row["loss"] == 3.0                                 # plain metrics: the mean over steps
    assert row["loss/qa"] == (1.0 * 10 + 4.0 * 30) / 40       # 3.25, not the step mean 2.5
    assert row["tokens/qa"] == 20.0
    assert "loss/edit" not in row and row["tokens/edit"] == 0.0  # no rows drawn: no made-up 0 loss
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1]) == row


def test_the_console_line_ends_with_the_dataset_losses():
    row = {"step": 7, "loss": 1.0, "text_loss": 0.5, "image_loss": 1.5, "grad_norm": 0.1, "lr": 1e-3,
           "trained_tokens_per_s": 900.0, "loss/shapecomp_qa": 0.25, "tokens/shapecomp_qa": 12.0}
    assert MetricsLogger._line(row).endswith("900 tok/s | shapecomp_qa 0.250")
    del row["loss/shapecomp_qa"]
    assert MetricsLogger._line(row).endswith("900 tok/s")
