"""`summarize` tabulates a sweep's pipeline runs: one row per run, only the columns some run has,
and the alignment table step by step (a run without a point at a step shows a dash)."""
import json
import os

import pytest

from illume_jax.eval import sweep


def _run(root, name, phases, points=None):
    os.makedirs(root / name)
    (root / name / "summary.json").write_text(json.dumps(dict(config="c", phases=phases, seconds=1.0)))
    if points is not None:
        (root / name / "alignment.json").write_text(json.dumps(dict(points=points)))


def test_summary_table(tmp_path):
    pt = lambda s, g: dict(step=s, geneval_overall=g, vqa_accuracy=0.5, pope_accuracy=0.5)  # noqa: E731
    _run(tmp_path, "tokenizer-semantic", dict(tokenizer=dict(tokenizer_ceiling=0.5, seconds=60),
                                             alignment=dict(geneval_mean_over_steps=0.25, seconds=120)),
         [pt(90, 0.0), pt(120, 0.5)])
    _run(tmp_path, "tokenizer-pixel", dict(tokenizer=dict(tokenizer_ceiling=0.25, seconds=60)), [pt(90, 0.125)])
    os.makedirs(tmp_path / "unfinished")   # no summary.json: not a run yet
    text = sweep.write_summary(str(tmp_path))
    assert text == open(tmp_path / "summary.md").read()
    lines = text.splitlines()
    assert lines[0] == "| run | tokenizer ceiling | GenEval-style, mean over steps | minutes |"
    assert lines[2] == "| tokenizer-pixel | 0.250 | – | 1 |"
    assert lines[3] == "| tokenizer-semantic | 0.500 | 0.250 | 3 |"
    assert "| 90 | 0.125 / 0.500 / 0.500 | 0.000 / 0.500 / 0.500 |" in lines
    assert "| 120 | – | 0.500 / 0.500 / 0.500 |" in lines
    with pytest.raises(ValueError, match="no such folder"):
        sweep.collect(str(tmp_path / "nope"))
