"""The self-enhancement ablation (ILLUME Table 7 at ShapeComp scale):
`python -m illume_jax self-enhance --config=... --workdir=W --ablation --seeds=0,1,2`.

After a round in W (its dialogues and its starting weights), stage 3 runs again for the same budget
(`self_enhance.train_steps`) from the same weights, per seed, in two arms:
  with      the round's assessment dialogues mixed in at `self_enhance.mix_weight`
  without   the stage's own mixture only
Each run is evaluated on the held-out GenEval-, POPE- and editing-style suites, and its model judges
its own images for held-out prompts, scored against the exact judge (how far the model-as-judge
that the scheme relies on at scale can be trusted). Results per run and the mean / std
per arm go to `W/self_enhance/ablation/steps{N}_mix{w}/results.json`; each run resumes from its own
folder. The round's own stage-3 run is the 'with' arm of its seed when its budget is the same.
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

from illume_jax.align import round as round_lib


def _metrics(res: dict) -> dict:
    g, p, e = res["geneval"], res["pope"], res["edit"]
    out = {"geneval_overall": g["overall"], **{f"geneval_{t}": v for t, v in g["tags"].items()},
           "pope_accuracy": p["mean"]["accuracy"], "pope_f1": p["mean"]["f1"], "pope_yes_ratio": p["mean"]["yes_ratio"],
           "edit_success": e["success"], "edit_preservation": e["preservation"]}
    out |= {f"pope_{s}_accuracy": v["accuracy"] for s, v in p.items() if s != "mean"}
    return out


def judge_agreement(model, se: Any, num_scenes: int = 16) -> dict:
    """The model as the judge of its own images for held-out ('test' split) prompts — never the
    round's training images, whose assessments it was trained on — against the exact judge."""
    from illume_jax.align import judges
    held = round_lib.prompts(se, split="test", num_scenes=num_scenes)
    texts, metas = [p["prompt"] for p in held], [p["metadata"] for p in held]
    images = model.generate(texts, seed=int(se.seed))
    exact = judges.ExactJudge(int(se.level)).judge_many(images, texts, metas)
    verdicts = judges.ModelJudge(model).judge_many(images, texts, metas)
    return dict(judges.agreement(verdicts, exact), split="test", parsed=sum(v.ok for v in verdicts),
                samples=len(verdicts), exact_consistent=sum(v.assessment.consistent for v in exact),
                examples=[v.raw for v in verdicts[:3]])


def ablation_dir(root: str, se: Any) -> str:
    """One folder per stage-3 budget and mixing share, so settings can be compared side by side."""
    return os.path.join(root, "ablation", f"steps{int(se.train_steps)}_mix{float(se.mix_weight):g}")


def run_ablation(config: Any, workdir: str, seeds: Sequence[int] = (0, 1, 2),
                 arms: Sequence[str] = ("with", "without")) -> dict:
    from illume_jax.eval import mllm as eval_mllm
    from illume_jax.infer.illume import Illume
    from illume_jax.train import loop
    se = config.self_enhance
    workdir = os.path.abspath(workdir)
    root = os.path.join(workdir, "self_enhance")
    if round_lib._done(os.path.join(root, "dialogues")) is None:
        raise ValueError(f"no finished self-enhancement round in {root}: run `self-enhance` first")
    base = round_lib.snapshot_weights(workdir, os.path.join(root, "base"), round_lib.start_step(config, workdir))
    data_dir = config.data.data_dir or os.path.join(workdir, "data")
    runs = {}
    bad = sorted(set(arms) - {"with", "without"})
    if bad:
        raise ValueError(f"ablation arms {bad}: expected 'with' and/or 'without'")
    out_dir = ablation_dir(root, se)
    for seed in seeds:
        for arm in arms:
            name = f"{arm}_seed{seed}"
            folder = os.path.join(out_dir, name)
            done = round_lib._done(folder)
            if done is None:
                # The round's own stage-3 run is this arm when it had the same seed and budget.
                trained = round_lib._done(os.path.join(root, "train")) or {}
                reuse = (arm == "with" and seed == int(config.seed) and trained.get("step") == int(se.train_steps)
                         and round_lib._done(os.path.join(root, "eval")) is not None)
                train_dir = os.path.join(root, "train") if reuse else os.path.join(folder, "train")
                if not reuse:
                    c = round_lib.training_config(config, se, os.path.join(root, "dialogues") if arm == "with"
                                                  else None, base, data_dir)
                    with c.unlocked():
                        c.seed, c.data.shuffle_seed = int(seed), int(seed)
                    round_lib._share_text_tokenizer(workdir, train_dir)
                    out = loop.train(c, train_dir)
                    if out.get("preempted"):
                        raise round_lib.Stop(f"ablation run {name} stopped")
                model = Illume.load(train_dir)
                if reuse:
                    res = json.load(open(os.path.join(root, "eval", "mllm.json")))
                else:
                    e = se.eval
                    res = eval_mllm.evaluate(model, level=int(se.level), gen_scenes=int(e.gen_scenes),
                                             samples_per_prompt=1, pope_scenes=int(e.pope_scenes),
                                             edit_pairs=int(e.edit_pairs), seed=int(se.seed),
                                             out_dir=os.path.join(folder, "eval"))
                done = round_lib._finish(folder, dict(arm=arm, seed=int(seed), reused_round_run=bool(reuse),
                                                      **_metrics(res), judge=judge_agreement(model, se)))
                print(f"ablation {name}: geneval {done['geneval_overall']:.3f}, pope {done['pope_accuracy']:.3f}, "
                      f"edit {done['edit_success']:.3f}, model-judge agreement "
                      f"{done['judge']['consistent']} over {done['judge']['compared']} parsed", flush=True)
            runs[name] = done
    results = dict(seeds=list(seeds), train_steps=int(se.train_steps), mix_weight=float(se.mix_weight),
                   runs=runs, arms={arm: _aggregate([r for r in runs.values() if r["arm"] == arm]) for arm in arms})
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


def _aggregate(runs: list[dict]) -> dict:
    """Mean and std (over seeds) of every numeric metric, and of the model-judge agreement."""
    keys = sorted(k for k in runs[0] if isinstance(runs[0][k], float))
    out = {k: dict(mean=float(np.mean([r[k] for r in runs])), std=float(np.std([r[k] for r in runs])))
           for k in keys}
    agree = [r["judge"]["consistent"] for r in runs if r["judge"]["consistent"] is not None]
    out["judge_agreement"] = dict(mean=float(np.mean(agree)) if agree else None,
                                  std=float(np.std(agree)) if agree else None, runs=len(agree))
    out["judge_parsed"] = dict(mean=float(np.mean([r["judge"]["parsed"] / r["judge"]["samples"] for r in runs])))
    return out
