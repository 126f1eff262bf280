"""One self-enhancement round (ILLUME §3.3): `python -m illume_jax self-enhance --config=... --workdir=W`.

W holds a trained MLLM (a `train` workdir, or a converted folder). The round lives in
`W/self_enhance/` and runs five steps, each writing a dataset (ArrayRecord + a JSONL preview) and a
`DONE.json` summary when complete:

  generate   the model draws images for ShapeComp text prompts (config.self_enhance: level, split, scenes;
             every GenEval-style tag a scene supports)                 -> generate/part-*.array_record, images/
  judge      the configured judge ('exact' ShapeComp scorer, 'model' = the MLLM itself, 'http' = an
             OpenAI-compatible endpoint) rates object / count / color / spatial with a rationale; the exact
             judge always runs too, so every round reports how often the chosen judge agrees with it.
             A sample whose judge fails (after the judge's bounded retries) is skipped and counted
  dialogues  good samples -> one-turn assessment dialogues; bad ones -> two turns (assessment, then the
             corrected image: the exact render of the prompt's scene)  -> dialogues/self_enhance.jsonl
  train      stage 3 again from the round's starting weights, with the dialogues mixed into its data
             (config.self_enhance.mix_weight), for config.self_enhance.train_steps steps  -> train/
  eval       held-out GenEval-, POPE- and editing-style scores of the result -> eval/mllm.json

With `self_enhance.mix_weight=0` (a sweep's `self_enhance=0` arm) generate, judge and dialogues are
skipped: train is then the control run (stage 3 again from the same weights, without dialogues).

Steps are resumable after a kill: generate and judge write their output in parts of `chunk`
samples (each part written under a temporary name, then renamed), so a restart redoes at most one
part; a finished step is never redone; training resumes from its own checkpoints. The wordings,
rating dimensions and dialogue formats are in `align/assessment.py`.
"""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import time
from typing import Any, Callable, Iterable

import numpy as np

from illume_jax.align import assessment as assess_lib

STEPS = ("generate", "judge", "dialogues", "train", "eval")


# -- storage: parts of JSON records (ArrayRecord + JSONL preview) ---------------------------------------

def _png(image: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _unpng(data: bytes) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _write_part(folder: str, index: int, records: list[dict], preview: Callable[[dict], dict]) -> None:
    """part-{index}: an ArrayRecord of JSON records and a readable JSONL preview, written atomically."""
    from array_record.python.array_record_module import ArrayRecordWriter
    os.makedirs(folder, exist_ok=True)
    name = os.path.join(folder, f"part-{index:05d}")
    writer = ArrayRecordWriter(name + ".array_record.tmp", "group_size:1")
    for r in records:
        writer.write(json.dumps(r).encode())
    writer.close()
    with open(name + ".jsonl.tmp", "w") as f:
        for r in records:
            f.write(json.dumps(preview(r)) + "\n")
    os.replace(name + ".jsonl.tmp", name + ".jsonl")
    os.replace(name + ".array_record.tmp", name + ".array_record")  # the part exists once this is there


def read_records(folder: str) -> list[dict]:
    from array_record.python.array_record_module import ArrayRecordReader
    out = []
    for name in sorted(f for f in os.listdir(folder) if f.startswith("part-") and f.endswith(".array_record")):
        reader = ArrayRecordReader(os.path.join(folder, name))
        out += [json.loads(b) for b in reader.read_all()]
        reader.close()
    return out


def _parts_done(folder: str) -> int:
    if not os.path.isdir(folder):
        return 0
    return len([f for f in os.listdir(folder) if f.startswith("part-") and f.endswith(".array_record")])


def _done(folder: str) -> dict | None:
    path = os.path.join(folder, "DONE.json")
    return json.load(open(path)) if os.path.exists(path) else None


def _finish(folder: str, summary: dict) -> dict:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "DONE.json.tmp"), "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(os.path.join(folder, "DONE.json.tmp"), os.path.join(folder, "DONE.json"))
    return summary


class Stop(Exception):
    """Raised by `stop_after` (tests, demos): the round stops as if killed."""


def _parse_stop(stop_after: str | None) -> tuple[str | None, int | None]:
    if not stop_after:
        return None, None
    step, _, parts = stop_after.partition(":")
    if step not in STEPS:
        raise ValueError(f"stop_after={stop_after!r}: expected STEP or STEP:PARTS with STEP one of {STEPS}")
    return step, int(parts) if parts else None


# -- the prompts ------------------------------------------------------------------------------------------

def prompts(se: Any, *, split: str | None = None, num_scenes: int | None = None) -> list[dict]:
    """Every (scene, tag) prompt of the configured ShapeComp scenes, samples_per_prompt times
    (`split` / `num_scenes` override the config's, e.g. held-out 'test' prompts)."""
    from illume_jax.data import shapecomp
    split = split or se.split
    out = []
    for i in range(int(num_scenes or se.num_scenes)):
        scene = shapecomp.make_scene(int(se.level), split, i)
        for tag in shapecomp.available_tags(scene):
            text, meta = shapecomp.prompt_for(scene, tag)
            for s in range(int(se.samples_per_prompt)):
                out.append(dict(id=len(out), prompt=text, metadata=meta,
                                scene=dict(level=int(se.level), split=split, index=i), sample=s))
    return out


def _chunks(items: list, size: int, start: int) -> Iterable[tuple[int, list]]:
    for p in range(start, -(-len(items) // size)):
        yield p, items[p * size:(p + 1) * size]


# -- judges ------------------------------------------------------------------------------------------------

def make_judge(se: Any, illume_loader: Callable[[], Any]):
    from illume_jax.align import judges
    if se.judge == "exact":
        return judges.ExactJudge(int(se.level))
    if se.judge == "model":
        return judges.ModelJudge(illume_loader())
    if se.judge == "http":
        from illume_jax.align.http_judge import HTTPJudge
        h = se.http
        return HTTPJudge(h.url, h.model, api_key_env=h.api_key_env, timeout_s=h.timeout_s,
                         concurrency=h.concurrency, max_retries=h.max_retries)
    raise ValueError(f"config.self_enhance.judge={se.judge!r}: expected 'exact', 'model' or 'http'")


def _verdict_json(v) -> dict:
    return dict(ok=v.ok, assessment=v.assessment.to_json() if v.assessment is not None else None, error=v.error,
                attempts=v.attempts, raw=v.raw)


# -- the round ---------------------------------------------------------------------------------------------

def run_round(config: Any, workdir: str, *, stop_after: str | None = None, rerun_from: str | None = None) -> dict:
    """Runs (or resumes) the round on the MLLM in `workdir`; returns the summary (also in
    `self_enhance/summary.json`). `stop_after='STEP'` or `'STEP:N'` stops after that step or after
    N parts of it, as a kill would (raises `Stop`). `rerun_from='STEP'` discards that step's output
    and every later step's first (e.g. 'judge' to judge the same images with another judge)."""
    if "self_enhance" not in config:
        raise ValueError("config.self_enhance is missing: use an MLLM config with a self_enhance block "
                         "(configs/illume_tiny.py has one)")
    se = config.self_enhance
    workdir = os.path.abspath(workdir)
    root = os.path.join(workdir, "self_enhance")
    stop_step, stop_parts = _parse_stop(stop_after)
    if rerun_from:
        if rerun_from not in STEPS:
            raise ValueError(f"rerun_from={rerun_from!r}: expected one of {STEPS}")
        for step in STEPS[STEPS.index(rerun_from):]:
            shutil.rmtree(os.path.join(root, step), ignore_errors=True)
    state: dict = {}

    start = start_step(config, workdir)

    def illume():
        if "model" not in state:
            from illume_jax.infer.illume import Illume
            state["model"] = Illume.load(workdir, step=start)
        return state["model"]

    summary = {}
    for step in STEPS:
        folder = os.path.join(root, step)
        done = _done(folder)
        if done is None and step in ("generate", "judge", "dialogues") and float(se.mix_weight) <= 0:
            # The control arm of a sweep (`self_enhance=0`): stage 3 again from the same weights, no
            # dialogues, so nothing to draw or judge.
            done = _finish(folder, dict(skipped="self_enhance.mix_weight=0"))
        if done is None:
            t0 = time.perf_counter()
            fn = {"generate": _generate, "judge": _judge, "dialogues": _dialogues, "train": _train, "eval": _eval}[step]
            done = fn(config, se, root, folder, illume, stop_parts if stop_step == step else None)
            done["seconds"] = round(time.perf_counter() - t0, 1)
            _finish(folder, done)
            print(f"self-enhance {step}: " + ", ".join(f"{k}={v}" for k, v in done.items()
                                                       if isinstance(v, (int, float, str))), flush=True)
        summary[step] = done
        if stop_step == step:
            raise Stop(f"stopped after step {step!r}")
    with open(os.path.join(root, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def start_step(config: Any, workdir: str) -> int | None:
    """The checkpoint step of `workdir` the round starts from: the end of `self_enhance.from_stage`
    ('' = the stage before the config's last: as in ILLUME, the stage-2 model draws and is judged,
    and stage 3 is trained again with the assessments; 'latest' = the newest checkpoint). None for
    a converted folder, whose weights are the start."""
    from illume_jax.convert import weights
    from illume_jax.train import checkpoint as ckpt_lib
    from illume_jax.train import loop
    if weights.is_converted(workdir):
        return None
    name = str(config.self_enhance.get("from_stage", ""))
    if name == "latest":
        return None
    if not name:
        if len(config.stages) < 2:
            raise ValueError("self_enhance.from_stage='': the config needs at least two stages (the round starts "
                             "from the one before the last); name a stage or use 'latest'")
        name = config.stages[-2].name
    step = loop.stage_end_step(config, name)
    folder = os.path.join(workdir, "checkpoints")
    steps, meta = [], {}
    if os.path.isdir(folder):  # (the Checkpointer would create it)
        ckpt = ckpt_lib.Checkpointer(folder, async_save=False)
        steps = ckpt.all_steps()
        meta = ckpt.restore_meta(step) if step in steps else {}
        ckpt.close()
    if step not in steps:
        raise ValueError(f"self_enhance.from_stage={name!r}: the round starts from the checkpoint at the end of that "
                         f"stage (step {step}), which is not in {folder} (steps there: {steps}). Train with "
                         f"`train --stop_after_stage={name}` (checkpoint.keep_stage_ends keeps it afterwards)")
    if meta.get("stage_name") != name:  # the workdir was trained with another stage list
        raise ValueError(f"self_enhance.from_stage={name!r}: checkpoint step {step} of {folder} is in stage "
                         f"{meta.get('stage_name')!r}; pass the config the workdir was trained with")
    return step


def _generate(config, se, root, folder, illume, stop_parts) -> dict:
    items = prompts(se)
    if not items:
        raise ValueError(f"self_enhance.num_scenes={se.num_scenes}: the first {se.num_scenes} level-{se.level} "
                         f"{se.split!r} scenes support no GenEval-style prompt; use more scenes")
    start = _parts_done(folder)
    for n, (p, chunk) in enumerate(_chunks(items, int(se.chunk), start)):
        if stop_parts is not None and n >= stop_parts:
            raise Stop(f"stopped in generate after {n} parts")
        images = illume().generate([it["prompt"] for it in chunk], seed=int(se.seed) + p * int(se.chunk))
        records = [dict(it, image_png=base64.b64encode(_png(img)).decode()) for it, img in zip(chunk, images)]
        _write_part(folder, p, records, lambda r: {k: v for k, v in r.items() if k != "image_png"})
    return dict(samples=len(items), prompts=len({(it["prompt"], it["scene"]["index"]) for it in items}))


def _judge(config, se, root, folder, illume, stop_parts) -> dict:
    from illume_jax.align import judges
    generated = read_records(os.path.join(root, "generate"))
    judge, exact = make_judge(se, illume), judges.ExactJudge(int(se.level))
    start = _parts_done(folder)
    for n, (p, chunk) in enumerate(_chunks(generated, int(se.chunk), start)):
        if stop_parts is not None and n >= stop_parts:
            raise Stop(f"stopped in judge after {n} parts")
        images = [_unpng(base64.b64decode(r["image_png"])) for r in chunk]
        texts, metas = [r["prompt"] for r in chunk], [r["metadata"] for r in chunk]
        verdicts = judge.judge_many(images, texts, metas)
        truth = verdicts if judge.name == "exact" else exact.judge_many(images, texts, metas)
        records = [dict(id=r["id"], prompt=r["prompt"], judge=judge.name, verdict=_verdict_json(v),
                        exact=_verdict_json(t)) for r, v, t in zip(chunk, verdicts, truth)]
        _write_part(folder, p, records, lambda r: r)
    recs = read_records(folder)
    ok = [r for r in recs if r["verdict"]["ok"]]
    out = dict(judge=judge.name, samples=len(recs), judged=len(ok), skipped=len(recs) - len(ok),
               consistent=sum(r["verdict"]["assessment"]["consistent"] for r in ok))
    if judge.name != "exact":
        agree = judges.agreement([_verdict(r["verdict"]) for r in recs], [_verdict(r["exact"]) for r in recs])
        out["agreement_with_exact"] = agree
    return out


def _verdict(d: dict):
    from illume_jax.align import judges
    a = assess_lib.Assessment.from_json(d["assessment"]) if d["assessment"] else None
    return judges.Verdict(assessment=a, error=d["error"], attempts=d["attempts"], raw=d["raw"])


def _dialogues(config, se, root, folder, illume, stop_parts) -> dict:
    from illume_jax.data import shapecomp
    from illume_jax.data.shapecomp.render import render
    generated = {r["id"]: r for r in read_records(os.path.join(root, "generate"))}
    judged = read_records(os.path.join(root, "judge"))
    images = os.path.join(folder, "images")
    os.makedirs(images, exist_ok=True)
    records, good, bad, skipped = [], 0, 0, 0
    for j in judged:
        if not j["verdict"]["ok"]:
            skipped += 1
            continue
        g = generated[j["id"]]
        a = assess_lib.Assessment.from_json(j["verdict"]["assessment"])
        name = f"gen_{g['id']:06d}.png"
        with open(os.path.join(images, name), "wb") as f:
            f.write(base64.b64decode(g["image_png"]))
        if a.consistent:
            rec = assess_lib.good_dialogue(g["prompt"], name, a)
            good += 1
        else:
            s = g["scene"]
            fixed = f"fix_{g['id']:06d}.png"
            with open(os.path.join(images, fixed), "wb") as f:
                f.write(_png(render(shapecomp.make_scene(s["level"], s["split"], s["index"]))))
            rec = assess_lib.bad_dialogue(g["prompt"], name, a, fixed)
            bad += 1
        records.append(dict(rec, id=g["id"]))
    _write_part(folder, 0, records, lambda r: r)
    with open(os.path.join(folder, "self_enhance.jsonl"), "w") as f:
        for r in records:
            f.write(json.dumps({"images": r["images"], "conversations": r["conversations"]}) + "\n")
    return dict(dialogues=len(records), good=good, bad=bad, skipped=skipped)


def training_config(config: Any, se: Any, dialogues_dir: str | None, base_weights: str, data_dir: str):
    """Stage 3 (the config's last stage) again, from `base_weights`, with the dialogues mixed in at
    `se.mix_weight` of the batch (None: without them — the ablation's control arm)."""
    import ml_collections as mlc
    c = mlc.ConfigDict(config.to_dict())
    with c.unlocked():
        sft = mlc.ConfigDict(dict(config.stages[-1]))
        sft.steps = int(se.train_steps)
        mixture = dict(sft.mixture)
        if dialogues_dir is not None and float(se.mix_weight) > 0:
            c.data.datasets["self_enhance"] = dict(kind="jsonl", path=os.path.join(dialogues_dir, "self_enhance.jsonl"),
                                                   image_dir=os.path.join(dialogues_dir, "images"))
            rest = sum(mixture.values())
            mixture = {k: v * (1.0 - float(se.mix_weight)) / rest for k, v in mixture.items()}
            mixture["self_enhance"] = float(se.mix_weight)
        sft.mixture = mixture
        c.stages = [sft]
        c.model_init = mlc.ConfigDict(dict(weights_from=base_weights))
        c.data.data_dir = data_dir
    return c


def snapshot_weights(workdir: str, dst: str, step: int | None = None) -> str:
    """The MLLM in `workdir` (checkpoint `step`, default the latest; or a converted folder) as a
    converted-weights folder, so stage 3 can start again from it (`model_init.weights_from`)."""
    from illume_jax.convert import official, weights
    if weights.is_converted(workdir):
        return workdir
    if weights.is_converted(dst):
        made_from = weights.info(dst).get("step")
        if step is not None and made_from is not None and int(made_from) != int(step):
            raise ValueError(f"{dst} holds the weights of checkpoint step {made_from}, not {step}: the round's "
                             f"starting point changed; start the round in a fresh workdir or delete {dst}")
    else:
        config, cfg, flat = official.load_ours("mllm", workdir, step=step)
        from flax import nnx

        from illume_jax.models.mllm import MLLM
        module = official._abstract(lambda: MLLM(cfg, rngs=nnx.Rngs(0)))
        weights.save(dst, kind="mllm", config=config, module=module, tensors=flat, dtype=None, source=workdir,
                     overwrite=True, extra_meta={} if step is None else dict(step=int(step)))
    return dst


def _train(config, se, root, folder, illume, stop_parts) -> dict:
    from illume_jax.train import loop
    workdir = os.path.dirname(root)
    base = snapshot_weights(workdir, os.path.join(root, "base"), start_step(config, workdir))
    c = training_config(config, se, os.path.join(root, "dialogues"), base, config.data.data_dir or
                        os.path.join(workdir, "data"))
    _share_text_tokenizer(workdir, folder)
    out = loop.train(c, folder, stop_after_steps=stop_parts)
    if out.get("preempted"):
        raise Stop("stopped in train")
    return {k: v for k, v in out.items() if isinstance(v, (int, float))}


def _share_text_tokenizer(src_workdir: str, dst_workdir: str) -> None:
    """A sentencepiece tokenizer trained in the source workdir must be the one training continues with."""
    src = os.path.join(src_workdir, "tokenizer")
    dst = os.path.join(dst_workdir, "tokenizer")
    if os.path.isdir(src) and not os.path.isdir(dst):
        shutil.copytree(src, dst)


def _eval(config, se, root, folder, illume, stop_parts) -> dict:
    from illume_jax.eval import mllm as eval_mllm
    from illume_jax.infer.illume import Illume
    model = Illume.load(os.path.join(root, "train"))
    e = se.eval
    res = eval_mllm.evaluate(model, level=int(se.level), gen_scenes=int(e.gen_scenes),
                             samples_per_prompt=1, pope_scenes=int(e.pope_scenes), edit_pairs=int(e.edit_pairs),
                             seed=int(se.seed), out_dir=folder)  # writes mllm.json + samples there
    return dict(geneval_overall=res["geneval"]["overall"], pope_accuracy=res["pope"]["mean"]["accuracy"],
                edit_success=res["edit"]["success"])
