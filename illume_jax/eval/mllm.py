"""Held-out ShapeComp evaluation of a trained MLLM: GenEval-style generation, POPE-style
understanding and editing success, all graded exactly by the scene-graph scorer.

`python -m illume_jax eval-mllm --workdir=runs/illume_tiny` writes `<workdir>/eval/mllm.json`
(+ sample PNGs). Prompts, questions and edit pairs come from the 'test' split of the level, so
none was seen in training (ShapeComp's splits are disjoint by construction).
"""
from __future__ import annotations

import json
import os
from collections import defaultdict

import numpy as np

from illume_jax.data import shapecomp
from illume_jax.eval import shapecomp_scorer as scorer


def geneval_prompts(level: int, n_scenes: int) -> list[tuple[str, dict, int]]:
    """(prompt, metadata, prompt id) for every tag each of the first n test scenes supports."""
    out = []
    for i in range(n_scenes):
        scene = shapecomp.make_scene(level, "test", i)
        for tag in shapecomp.available_tags(scene):
            text, meta = shapecomp.prompt_for(scene, tag)
            out.append((text, meta, len(out)))
    return out


def evaluate(model, *, level: int = 1, gen_scenes: int = 32, samples_per_prompt: int = 2, pope_scenes: int = 50,
             edit_pairs: int = 48, seed: int = 0, out_dir: str | None = None, progress: bool = False) -> dict:
    """model: an `Illume`. Returns {'geneval': ..., 'pope': {split: metrics, 'mean': ...},
    'edit': {'success': ..., 'per_op': ...}} and writes sample images to out_dir."""
    results: dict = {}
    # -- GenEval-style generation --------------------------------------------------------------
    prompts = geneval_prompts(level, gen_scenes)
    texts = [p for p, _, _ in prompts for _ in range(samples_per_prompt)]
    metas = [m for _, m, _ in prompts for _ in range(samples_per_prompt)]
    ids = [i for _, _, i in prompts for _ in range(samples_per_prompt)]
    images = model.generate(texts, seed=seed, progress=progress)
    results["geneval"] = dict(scorer.geneval_scores(images, metas, ids), prompts=len(prompts),
                              images=len(images))
    # -- POPE-style understanding ----------------------------------------------------------------
    pope = {}
    for split in shapecomp.POPE_SPLITS:
        imgs, questions, labels = [], [], []
        for i in range(pope_scenes):
            scene = shapecomp.make_scene(level, "test", i)
            img = shapecomp.render(scene)
            for q in shapecomp.existence_questions(scene, split):
                imgs.append(img)
                questions.append(q["question"])
                labels.append(q["answer"])
        answers = model.understand(imgs, questions, progress=progress)
        pope[split] = dict(scorer.pope_metrics(answers, labels), questions=len(questions))
    pope["mean"] = {k: float(np.mean([pope[s][k] for s in shapecomp.POPE_SPLITS]))
                    for k in ("accuracy", "f1", "yes_ratio")}
    results["pope"] = pope
    # -- editing ------------------------------------------------------------------------------
    pairs = [shapecomp.edit_pair(level, "test", i) for i in range(edit_pairs)]
    edited = model.edit([shapecomp.render(p.before) for p in pairs], [p.instruction for p in pairs], seed=seed,
                        progress=progress)
    per_op, preservation, l1 = defaultdict(list), [], []
    for pair, img in zip(pairs, edited):
        # Success = the target scene is exactly what the image shows (instruction followed,
        # untouched objects preserved, nothing extra): the scorer's 'instruction' verdict.
        g = scorer.grade_edit(img, pair.before, pair.after, pair.edited, pair.untouched)
        per_op[pair.op].append(bool(g["instruction"]))
        preservation.append(g["preservation"])
        l1.append(g["l1_outside"])
    results["edit"] = {"success": float(np.mean([x for v in per_op.values() for x in v])),
                       "per_op": {op: float(np.mean(v)) for op, v in sorted(per_op.items())},
                       "preservation": float(np.mean(preservation)), "l1_outside": float(np.mean(l1)),
                       "pairs": len(pairs)}
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        from PIL import Image
        for k in range(min(16, len(images))):
            Image.fromarray(images[k]).save(os.path.join(out_dir, f"t2i_{k:02d}.png"))
        for k in range(min(8, len(edited))):
            Image.fromarray(np.concatenate([shapecomp.render(pairs[k].before), edited[k],
                                            shapecomp.render(pairs[k].after)], 1)).save(
                os.path.join(out_dir, f"edit_{k:02d}.png"))
        with open(os.path.join(out_dir, "mllm.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(out_dir, "samples.jsonl"), "w") as f:
            for k in range(min(16, len(images))):
                f.write(json.dumps({"prompt": texts[k], "metadata": metas[k],
                                    "correct": scorer.grade(images[k], metas[k])[0]}) + "\n")
    return results
