"""A sweep's runs side by side: `python -m illume_jax summarize --workdir=ROOT` (launch/sweep.sh calls it
after its local runs) reads every `ROOT/<run>/summary.json` written by the pipeline and writes
`ROOT/summary.md`: one row per run with each phase's key figures, and, when the runs have an
alignment phase, the held-out scores at every stage-2 step, run by run (the "alignment speed" table).
"""
from __future__ import annotations

import json
import os

# (phase, key, column title); a column appears when any run has it.
COLUMNS = (
    ("tokenizer", "tokenizer_ceiling", "tokenizer ceiling"),
    ("tokenizer", "val_psnr", "tokenizer PSNR (val)"),
    ("tokenizer", "semantic_usage", "level-0 usage"),
    ("tokenizer", "pixel_usage", "level-1 usage"),
    ("mllm", "final_loss", "stage-2 loss"),
    ("alignment", "final_text_loss", "stage-2 text loss"),
    ("alignment", "final_image_loss", "stage-2 image loss"),
    ("alignment", "geneval_mean_over_steps", "GenEval-style, mean over steps"),
    ("alignment", "vqa_mean_over_steps", "VQA, mean over steps"),
    ("alignment", "geneval_overall", "GenEval-style, last step"),
    ("alignment", "vqa_accuracy", "VQA, last step"),
    ("self_enhance", "dialogues", "dialogues"),
    ("self_enhance", "final_loss", "stage-3 loss"),
    ("eval", "geneval_overall", "GenEval-style"),
    ("eval", "pope_accuracy", "POPE-style"),
    ("eval", "edit_success", "editing success"),
)


def collect(root: str) -> list[dict]:
    """[{name, summary, alignment}] for every run folder of `root` with a summary.json, by name."""
    if not os.path.isdir(root):
        raise ValueError(f"--workdir={root}: no such folder (a sweep's --root)")
    runs = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name, "summary.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            summary = json.load(f)
        align = os.path.join(root, name, "alignment.json")
        runs.append(dict(name=name, summary=summary,
                         alignment=json.load(open(align)) if os.path.exists(align) else None))
    return runs


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def markdown(runs: list[dict]) -> str:
    if not runs:
        return "No finished runs (no <run>/summary.json).\n"
    cols = [c for c in COLUMNS if any(c[1] in r["summary"]["phases"].get(c[0], {}) for r in runs)]
    lines = ["| run | " + " | ".join(t for _, _, t in cols) + " | minutes |",
             "|---|" + "---|" * (len(cols) + 1)]
    for r in runs:
        p = r["summary"]["phases"]
        minutes = sum(ph.get("seconds", 0) for ph in p.values()) / 60
        lines.append(f"| {r['name']} | " + " | ".join(_fmt(p.get(ph, {}).get(k)) for ph, k, _ in cols)
                     + f" | {minutes:.0f} |")
    aligned = [r for r in runs if r["alignment"]]
    if aligned:
        steps = sorted({pt["step"] for r in aligned for pt in r["alignment"]["points"]})
        lines += ["", "Held-out scores at each stage-2 step (GenEval-style / short-answer VQA / POPE-style):", "",
                  "| step | " + " | ".join(r["name"] for r in aligned) + " |", "|---|" + "---|" * len(aligned)]
        for s in steps:
            cells = []
            for r in aligned:
                pt = next((x for x in r["alignment"]["points"] if x["step"] == s), None)
                cells.append("–" if pt is None else
                             f"{pt['geneval_overall']:.3f} / {pt['vqa_accuracy']:.3f} / {pt['pope_accuracy']:.3f}")
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary(root: str) -> str:
    text = markdown(collect(root))
    path = os.path.join(root, "summary.md")
    with open(path, "w") as f:
        f.write(text)
    return text
