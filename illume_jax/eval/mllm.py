"""Held-out ShapeComp evaluation of a trained MLLM: GenEval-style generation, POPE-style
understanding and editing success, all graded exactly by the scene-graph scorer.

`python -m illume_jax eval --workdir=runs/illume_tiny [--level=L] [--eval_split=test|compositional]` writes
`<workdir>/eval/level<L>_<split>/`: metrics.json, a self-contained report.html, overview.png and the GenEval- /
POPE-format files of every sample (`evaluate_and_report`). Prompts, questions and edit pairs come
from a held-out split of the level ('test'; or 'compositional' at levels >= 3), so none was seen
in training (ShapeComp's splits are disjoint by construction).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from collections import defaultdict
from typing import Sequence

import numpy as np

from illume_jax.data import shapecomp
from illume_jax.eval import shapecomp_scorer as scorer
from illume_jax.infer import interleaved as il


def geneval_prompts(level: int, n_scenes: int, split: str = "test") -> list[tuple[str, dict, int]]:
    """(prompt, metadata, prompt id) for every tag each of the first n scenes of `split` supports."""
    out = []
    for i in range(n_scenes):
        scene = shapecomp.make_scene(level, split, i)
        for tag in shapecomp.available_tags(scene):
            text, meta = shapecomp.prompt_for(scene, tag)
            out.append((text, meta, len(out)))
    return out


def vqa_accuracy(model, *, level: int = 1, split: str = "test", scenes: int = 32, progress: bool = False) -> dict:
    """Short-answer questions on held-out scenes (counting, colour, relation, size; ShapeComp's QA
    task, which stages 2-3 train on): exact match of the answer's first word. Finer than POPE-style
    existence for tiny models, which tend to answer every existence question 'yes'."""
    imgs, questions, answers, kinds = [], [], [], []
    for i in range(scenes):
        scene = shapecomp.make_scene(level, split, i)
        img = shapecomp.render(scene)
        for q in shapecomp.attribute_questions(scene):
            imgs.append(img)
            questions.append(q["question"])
            answers.append(q["answer"])
            kinds.append(q["kind"])
    if not questions:
        raise ValueError(f"vqa_accuracy: no questions in {scenes} scenes of level {level}, split {split!r}")
    replies = model.understand(imgs, questions, max_new_tokens=8, progress=progress)
    first = [(re.findall(r"[a-z]+", r.lower()) or [""])[0] for r in replies]
    right = np.asarray([f == a for f, a in zip(first, answers)])
    per_kind = {k: float(right[[x == k for x in kinds]].mean()) for k in sorted(set(kinds))}
    # What one fixed reply to every question scores (e.g. 'one': level-1 counting questions are many).
    prior = max(float(np.mean([a == c for a in answers])) for c in set(answers))
    return dict(accuracy=float(right.mean()), per_kind=per_kind, questions=len(questions),
                constant_answer_accuracy=prior)


def geneval_suite(model, *, level: int = 1, split: str = "test", scenes: int = 32, samples_per_prompt: int = 2,
                  seed: int = 0, progress: bool = False, sampling=None) -> tuple[dict, list[dict]]:
    """GenEval-style text-to-image on every tag of the first `scenes` held-out scenes, graded by the
    scorer: (scores per tag and overall, per-image samples with verdicts). sampling: an
    `interleaved.Sampling` (default: the official text-to-image settings)."""
    prompts = geneval_prompts(level, scenes, split)
    texts = [p for p, _, _ in prompts for _ in range(samples_per_prompt)]
    metas = [m for _, m, _ in prompts for _ in range(samples_per_prompt)]
    ids = [i for _, _, i in prompts for _ in range(samples_per_prompt)]
    images = model.generate(texts, seed=seed, progress=progress, sampling=sampling)
    # Every shape of the world is a possible reading (as GenEval's detector knows all 80 classes);
    # rotation only where the level rotates objects.
    det_kw = dict(rotated=shapecomp.get_level(level).rotation)
    results = dict(scorer.geneval_scores(images, metas, ids, **det_kw), prompts=len(prompts), images=len(images))
    samples = []
    for img, text, meta, pid in zip(images, texts, metas, ids):
        ok, why = scorer.grade(img, meta, **det_kw)
        samples.append(dict(image=img, prompt=text, metadata=meta, prompt_id=pid, correct=bool(ok), reasons=why))
    return results, samples


def existence_items(level: int, split: str, scenes: int, pope_split: str) -> list[tuple[int, shapecomp.Scene, dict]]:
    """(scene index, scene, question) of the POPE-style suite's questions of one split, scene by scene."""
    out = []
    for i in range(scenes):
        scene = shapecomp.make_scene(level, split, i)
        out += [(i, scene, q) for q in shapecomp.existence_questions(scene, pope_split)]
    return out


def accuracy_by_kind(correct: Sequence[bool], kinds: Sequence[str]) -> dict:
    """{kind: accuracy, questions} over shapecomp.EXISTENCE_KINDS (what the asked object shares with the scene)."""
    correct, kinds = np.asarray(correct, bool), list(kinds)
    return {k: dict(accuracy=float(np.mean(correct[np.asarray(kinds) == k])), questions=kinds.count(k))
            for k in shapecomp.EXISTENCE_KINDS if k in kinds}


def pope_suite(model, *, level: int = 1, split: str = "test", scenes: int = 50, progress: bool = False
               ) -> tuple[dict, list[dict]]:
    """POPE-style existence questions (random / popular / adversarial negatives) on held-out scenes:
    ({split: metrics, 'mean': ...}, per-question samples). Besides POPE's accuracy / F1 / yes-ratio,
    `auc`: of the log p(yes) - log p(no) margin (`scorer.margin_auc`), which tells a model that
    answers a constant but has started to read the question (AUC > 0.5) from one that has not.
    `by_kind`: accuracy per what the asked object shares with the scene (shapecomp.EXISTENCE_KINDS):
    a model that answers from one attribute fails one of the `absent_*_present` kinds."""
    pope, samples = {}, []
    for pope_split in shapecomp.POPE_SPLITS:
        items = existence_items(level, split, scenes, pope_split)
        renders = {i: shapecomp.render(scene) for i, scene in {i: scene for i, scene, _ in items}.items()}  # once a scene
        imgs = [renders[i] for i, _, _ in items]
        questions, labels = [q["question"] for _, _, q in items], [q["answer"] for _, _, q in items]
        scene_ids, kinds = [i for i, _, _ in items], [q["asks"] for _, _, q in items]
        answers = model.understand(imgs, questions, progress=progress)
        lp = model.answer_logprobs(imgs, questions, ("yes", "no"))
        margins = lp[:, 0] - lp[:, 1]
        correct = [scorer.parse_yes_no(a) == label for a, label in zip(answers, labels)]
        pope[pope_split] = dict(scorer.pope_metrics(answers, labels), auc=scorer.margin_auc(margins, labels),
                                questions=len(questions), by_kind=accuracy_by_kind(correct, kinds))
        for img, q, a, label, i, m, ok, k in zip(imgs, questions, answers, labels, scene_ids, margins, correct, kinds):
            samples.append(dict(image=img, scene=i, split=pope_split, question=q, answer=a, label=label,
                                correct=ok, yes_margin=float(m), asks=k))
    pope["mean"] = {k: float(np.mean([pope[s][k] for s in shapecomp.POPE_SPLITS]))
                    for k in ("accuracy", "f1", "yes_ratio", "auc")}
    return pope, samples


def run_suites(model, *, level: int = 1, split: str = "test", gen_scenes: int = 32, samples_per_prompt: int = 2,
               pope_scenes: int = 50, edit_pairs: int = 48, seed: int = 0, progress: bool = False,
               on_suite=None, t2i_sampling=None, edit_sampling=None) -> tuple[dict, dict]:
    """model: an `Illume`. Returns (results, samples): results = {'geneval': ..., 'pope': {split:
    metrics, 'mean': ...}, 'edit': {'success': ..., 'per_op': ...}}; samples holds every image,
    answer and verdict behind them (for the report and the public-harness files).

    on_suite(name, results): called after each suite with the results so far, so a run that is
    stopped (a time box, a preempted machine) keeps the suites it finished.

    split: 'test' (held out) or 'compositional' (levels >= 3: scenes with the colour-shape pairs
    that never occur in training, CLEVR-CoGenT style).

    gen_scenes / pope_scenes / edit_pairs = 0 skips that suite (e.g. POPE alone for a model trained
    only on understanding); its key is then absent from the results.

    t2i_sampling / edit_sampling: `interleaved.Sampling` for generation and editing (default: the
    official settings, `Sampling.for_task`); results['sampling'] records the ones used."""
    sizes = dict(gen_scenes=gen_scenes, pope_scenes=pope_scenes, edit_pairs=edit_pairs)
    for name, n in sizes.items():
        if n < 0:
            raise ValueError(f"{name}={n}: expected a count >= 0 (0 skips that suite)")
    if not any(sizes.values()):
        raise ValueError("gen_scenes, pope_scenes and edit_pairs are all 0: nothing to evaluate")
    if split not in ("test", "compositional"):
        raise ValueError(f"split={split!r}: expected 'test' or 'compositional' (held-out splits only)")
    if split == "compositional" and level < 3:
        raise ValueError(f"split='compositional' needs level >= 3 (held-out colour-shape pairs), got level={level}")
    results: dict = dict(level=level, split=split)
    samples: dict = dict(level=level, split=split)
    t2i_sampling = t2i_sampling or il.Sampling.for_task("t2i")
    edit_sampling = edit_sampling or il.Sampling.for_task("edit")
    used = dict(t2i=t2i_sampling) if gen_scenes else {}
    used.update(dict(edit=edit_sampling) if edit_pairs else {})
    if used:  # which settings made the images (a sampling sweep writes one metrics.json per setting)
        results["sampling"] = {task: _sampling_json(v) for task, v in used.items()}
    # -- GenEval-style generation --------------------------------------------------------------
    if gen_scenes:
        results["geneval"], samples["t2i"] = geneval_suite(model, level=level, split=split, scenes=gen_scenes,
                                                           samples_per_prompt=samples_per_prompt, seed=seed,
                                                           progress=progress, sampling=t2i_sampling)
        if on_suite is not None:
            on_suite("geneval", results)
    # -- POPE-style understanding ----------------------------------------------------------------
    if pope_scenes:
        results["pope"], samples["pope"] = pope_suite(model, level=level, split=split, scenes=pope_scenes,
                                                      progress=progress)
        if on_suite is not None:
            on_suite("pope", results)
    if edit_pairs:
        results["edit"], samples["edit"] = edit_suite(model, level=level, split=split, pairs=edit_pairs,
                                                      seed=seed, progress=progress, sampling=edit_sampling)
        if on_suite is not None:
            on_suite("edit", results)
    return results, samples


def _sampling_json(sampling) -> dict:
    """A `Sampling` as metrics.json holds it (lists, as JSON reads them back)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(sampling).items()}


def edit_suite(model, *, level: int = 1, split: str = "test", pairs: int = 48, seed: int = 0,
               progress: bool = False, sampling=None) -> tuple[dict, list]:
    """Editing success on `pairs` held-out edit pairs: ({'success', 'per_op', 'preservation',
    'l1_outside', 'pairs'}, one sample per pair). sampling: as `geneval_suite`'s (default: the
    official editing settings)."""
    edit_pairs = [shapecomp.edit_pair(level, split, i) for i in range(pairs)]
    edited = model.edit([shapecomp.render(p.before) for p in edit_pairs], [p.instruction for p in edit_pairs],
                        seed=seed, progress=progress, sampling=sampling)
    per_op, preservation, l1 = defaultdict(list), [], []
    rows = []
    for pair, img in zip(edit_pairs, edited):
        # Success = the target scene is exactly what the image shows (instruction followed,
        # untouched objects preserved, nothing extra): the scorer's 'instruction' verdict.
        g = scorer.grade_edit(img, pair.before, pair.after, pair.edited, pair.untouched,
                              rotated=shapecomp.get_level(level).rotation)
        per_op[pair.op].append(bool(g["instruction"]))
        preservation.append(g["preservation"])
        l1.append(g["l1_outside"])
        rows.append(dict(before=shapecomp.render(pair.before), edited=img, target=shapecomp.render(pair.after),
                         instruction=pair.instruction, op=pair.op, success=bool(g["instruction"]),
                         preservation=float(g["preservation"])))
    result = {"success": float(np.mean([x for v in per_op.values() for x in v])),
              "per_op": {op: float(np.mean(v)) for op, v in sorted(per_op.items())},
              "preservation": float(np.mean(preservation)), "l1_outside": float(np.mean(l1)),
              "pairs": len(edit_pairs)}
    return result, rows


def _headline(results: dict) -> str:
    """The issue's three figures, as far as `results` has them."""
    parts = []
    if "geneval" in results:
        parts.append(f"GenEval-style overall {results['geneval']['overall']:.3f}")
    if "pope" in results:
        m = results["pope"]["mean"]
        auc = f", margin AUC {m['auc']:.3f}" if "auc" in m else ""
        parts.append(f"POPE-style accuracy {m['accuracy']:.3f} (yes-ratio {m['yes_ratio']:.3f}{auc})")
    if "edit" in results:
        parts.append(f"editing success {results['edit']['success']:.3f}")
    return ", ".join(parts)


def evaluate(model, *, level: int = 1, split: str = "test", gen_scenes: int = 32, samples_per_prompt: int = 2,
             pope_scenes: int = 50, edit_pairs: int = 48, seed: int = 0, out_dir: str | None = None,
             progress: bool = False) -> dict:
    """`run_suites`, plus (with out_dir) mllm.json, the first sample images and their verdicts."""
    results, samples = run_suites(model, level=level, split=split, gen_scenes=gen_scenes,
                                  samples_per_prompt=samples_per_prompt, pope_scenes=pope_scenes,
                                  edit_pairs=edit_pairs, seed=seed, progress=progress)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        from PIL import Image
        t2i, edits = samples.get("t2i", []), samples.get("edit", [])
        for k in range(min(16, len(t2i))):
            Image.fromarray(t2i[k]["image"]).save(os.path.join(out_dir, f"t2i_{k:02d}.png"))
        for k in range(min(8, len(edits))):
            e = edits[k]
            Image.fromarray(np.concatenate([e["before"], e["edited"], e["target"]], 1)).save(
                os.path.join(out_dir, f"edit_{k:02d}.png"))
        with open(os.path.join(out_dir, "mllm.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(out_dir, "samples.jsonl"), "w") as f:
            for k in range(min(16, len(t2i))):
                f.write(json.dumps({"prompt": t2i[k]["prompt"], "metadata": t2i[k]["metadata"],
                                    "correct": t2i[k]["correct"]}) + "\n")
    return results


def evaluate_and_report(model, workdir: str, *, level: int = 1, split: str = "test", gen_scenes: int = 32,
                        samples_per_prompt: int = 2, pope_scenes: int = 50, edit_pairs: int = 48, seed: int = 0,
                        out_dir: str | None = None, extra_metrics: dict | None = None, progress: bool = True,
                        curves: dict | None = None, reconstructions=(), title: str = "illume_jax: ShapeComp evaluation",
                        t2i_sampling=None, edit_sampling=None) -> dict:
    """`python -m illume_jax eval`: the suites on the MLLM of `workdir`, written to
    `out_dir` (default <workdir>/eval/level<L>_<split>/): metrics.json, report.html (self-contained,
    with the run's training curves when <workdir>/metrics.jsonl exists), and the GenEval- and
    POPE-format files of every sample (eval/report.py). `curves` ({name: [(step, value)]}) and
    `reconstructions` (tuples of images) add those sections (the demo passes every phase's).
    t2i_sampling / edit_sampling: as `run_suites`'."""
    from illume_jax.eval import report
    out_dir = os.path.abspath(out_dir or os.path.join(workdir, "eval", f"level{level}_{split}"))
    os.makedirs(out_dir, exist_ok=True)
    partial = os.path.join(out_dir, "metrics.partial.json")
    t0 = time.perf_counter()

    def on_suite(name: str, so_far: dict) -> None:  # the finished suites survive a stopped run
        finished = [k for k in ("geneval", "pope", "edit") if k in so_far]
        row = dict(so_far, seconds=round(time.perf_counter() - t0, 1), finished=finished)
        with open(partial + ".tmp", "w") as f:
            json.dump(row, f, indent=1)
        os.replace(partial + ".tmp", partial)
        print(f"eval: {name} done after {row['seconds']} s: {_headline(so_far)}", flush=True)

    results, samples = run_suites(model, level=level, split=split, gen_scenes=gen_scenes,
                                  samples_per_prompt=samples_per_prompt, pope_scenes=pope_scenes,
                                  edit_pairs=edit_pairs, seed=seed, progress=progress, on_suite=on_suite,
                                  t2i_sampling=t2i_sampling, edit_sampling=edit_sampling)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    results["workdir"] = os.path.abspath(workdir)
    if getattr(model, "pixel_decoder_dir", None):  # images decoded by a tokenizer other than the training one
        results["pixel_decoder"] = model.pixel_decoder_dir
    results["files"] = report.write_public_formats(out_dir, samples)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(results, f, indent=1)
    if os.path.exists(partial):
        os.remove(partial)
    results["files"]["report"] = report.write_report(
        os.path.join(out_dir, "report.html"), results, samples, title=title,
        subtitle=f"{workdir} · level {level}, split {split!r}, seed {seed}", extra_metrics=extra_metrics,
        curves=report.read_curves(os.path.join(workdir, "metrics.jsonl")) if curves is None else curves,
        reconstructions=reconstructions)
    if samples.get("t2i") or samples.get("edit") or reconstructions:  # a POPE-only run has no pictures to show
        results["files"]["overview"] = report.write_overview(os.path.join(out_dir, "overview.png"), samples,
                                                             reconstructions)
    return results
