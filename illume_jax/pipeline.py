"""Pipeline configs (`kind='pipeline'`): `python -m illume_jax pipeline --config=... --workdir=W`.

The main job, `bash launch/local.sh demo` (configs/demo.py), is the whole ILLUME pipeline at tiny
scale; the ablation configs (configs/ablation_tokenizer.py, configs/ablation_self_enhance.py) run a
subset of the same phases. One phase after the other, each in its own folder of the workdir and each
resumable, so an interrupted run continues from its last checkpoint when the same command runs again
(a finished phase is not redone). `config.phases` lists the phases to run, in this order:

  tokenizer     SigLIP pre-training of the ViT, then DualViTok          -> tokenizer/
  encode        pre-tokenization of training images (ArrayRecord)        -> tokenizer/codes/
  mllm          ILLUME stages 1-2 in a child process (the demo SIGTERMs
                it part-way, as a pod preemption would, and resumes it)  -> mllm/
  alignment     scores vs steps over the stage-2 checkpoints (held-out
                GenEval-style, short-answer VQA, POPE-style) and the
                stage's losses                                           -> alignment.json
  self_enhance  one round from the stage-2 model, whose stage 3 (SFT)
                trains with the assessment dialogues (none when
                self_enhance.mix_weight=0: the control arm)             -> mllm/self_enhance/
  decoder       the tiny diffusion decoder (VAE, UNet on the codes, 2x)  -> decoder/
  eval          held-out suites on the final model                       -> report.html, overview.png,
                                                                              metrics.json

Each phase prints one summary line (time, final loss, key metric); `phases/<name>.json` holds it, and
`summary.json` gathers them (what `launch/sweep.sh` tabulates across runs).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any, Callable

import numpy as np

PHASES = ("tokenizer", "encode", "mllm", "alignment", "self_enhance", "decoder", "eval")


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_json(path: str, obj: dict) -> None:
    """Written under a temporary name, then renamed: a kill never leaves half a file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1, default=float)
    os.replace(path + ".tmp", path)


def _phase(workdir: str, name: str, index: tuple[int, int], title: str, fn: Callable[[], dict],
           line: Callable[[dict], str]) -> dict:
    """Runs a phase unless its summary exists; prints its summary line either way."""
    path = os.path.join(workdir, "phases", f"{name}.json")
    n, total = index
    if os.path.exists(path):
        with open(path) as f:
            out = json.load(f)
        print(f"[{n}/{total}] {title}: done before ({line(out)})", flush=True)
        return out
    print(f"[{n}/{total}] {title} ...", flush=True)
    t0 = time.time()
    out = fn()
    out["seconds"] = round(time.time() - t0, 1)
    _write_json(path, out)
    print(f"      {title}: {line(out)}", flush=True)
    return out


def _secs(out: dict) -> str:
    return f"{out.get('seconds', 0):.0f}s"


# -- the phases -------------------------------------------------------------------------------

def _tokenizer(config, workdir: str) -> dict:
    from illume_jax.train import tokenizer as tokenizer_lib
    out = tokenizer_lib.train_tokenizer(config.tokenizer, os.path.join(workdir, "tokenizer"))
    if out["preempted"]:
        raise SystemExit("tokenizer training was stopped; run the demo again to continue")
    rows = _read_jsonl(os.path.join(tokenizer_lib.tokenizer_dir(os.path.join(workdir, "tokenizer")), "metrics.jsonl"))
    losses = [r["loss"] for r in rows if "loss" in r]
    return {k: v for k, v in out["tokenizer"].items() if isinstance(v, (int, float))} | dict(
        final_loss=losses[-1] if losses else None)


def _encode(config, workdir: str) -> dict:
    from illume_jax.data.encode import encode_dataset
    out = encode_dataset(config.tokenizer, os.path.join(workdir, "tokenizer"), split=config.encode.split,
                         limit=int(config.encode.num))
    return {k: v for k, v in out.items() if isinstance(v, (int, float, str))}


def _mllm(config, workdir: str, overrides: list[str]) -> dict:
    """Stages 1-2 in a child process (`train` with the config's `mllm_config`, so it is the command a
    user would type); with `preempt_at_step` > 0 it gets SIGTERM after that step, then the same
    command runs again and resumes."""
    from illume_jax.train import loop
    mllm_dir = os.path.join(workdir, "mllm")
    stop = config.mllm.stages[-2].name
    cmd = [sys.executable, "-m", "illume_jax", "train", f"--config={config.mllm_config}", f"--workdir={mllm_dir}",
           f"--stop_after_stage={stop}"] + [o.replace("--config.mllm.", "--config.", 1) for o in overrides
                                            if o.startswith("--config.mllm.")]
    metrics = os.path.join(mllm_dir, "metrics.jsonl")
    preempted_at = None
    if int(config.preempt_at_step) > 0 and not _read_jsonl(metrics):
        proc = subprocess.Popen(cmd)
        while proc.poll() is None:
            rows = _read_jsonl(metrics)
            if rows and rows[-1].get("step", 0) >= int(config.preempt_at_step):
                preempted_at = rows[-1]["step"]
                proc.send_signal(signal.SIGTERM)
                proc.wait()
                print(f"      SIGTERM after step {preempted_at}: the run saved a checkpoint and exited "
                      f"({proc.returncode}); starting the same command again", flush=True)
                break
            time.sleep(0.5)
        if preempted_at is None and proc.returncode:
            raise SystemExit(f"MLLM training failed with exit code {proc.returncode}: {' '.join(cmd)}")
    proc = subprocess.run(cmd)
    if proc.returncode:
        raise SystemExit(f"MLLM training failed with exit code {proc.returncode}: {' '.join(cmd)}")
    rows = _read_jsonl(metrics)
    stages: dict = {}
    for r in rows:
        st = stages.setdefault(r.get("stage", "?"), dict(first_loss=r["loss"]))
        st.update(last_loss=r["loss"], text_loss=r.get("text_loss"), image_loss=r.get("image_loss"), step=r["step"])
    return dict(stages=stages, preempted_at=preempted_at, resumed=preempted_at is not None,
                steps=loop.stage_end_step(config.mllm, stop), final_loss=rows[-1]["loss"] if rows else None)


def alignment_steps(config) -> list[int]:
    """The global steps the alignment phase evaluates: the start of the stage (the end of the one
    before) and every checkpoint inside it."""
    from illume_jax.train import loop
    name = config.alignment.stage
    names = [st.name for st in config.mllm.stages]
    if name not in names or names.index(name) == 0:
        raise ValueError(f"config.alignment.stage={name!r}: expected a stage after the first, one of {names[1:]}")
    start = loop.stage_end_step(config.mllm, names[names.index(name) - 1])
    end = loop.stage_end_step(config.mllm, name)
    every = int(config.mllm.checkpoint.every_steps)
    return [start] + [s for s in range(start + 1, end + 1) if s % every == 0 or s == end]


def _alignment(config, workdir: str) -> dict:
    """How fast the stage aligns images and text: held-out scores at each of its checkpoints and its
    training losses. Resumable per point (a kill loses at most the step being evaluated)."""
    from illume_jax.eval import mllm as mllm_eval
    from illume_jax.infer.illume import Illume
    a = config.alignment
    mllm_dir = os.path.join(workdir, "mllm")
    path = os.path.join(workdir, "alignment.json")
    done = json.load(open(path)) if os.path.exists(path) else dict(points=[])
    have = {p["step"] for p in done["points"]}
    for step in alignment_steps(config):
        if step in have:
            continue
        model = Illume.load(mllm_dir, step=step)
        gen = mllm_eval.geneval_suite(model, level=int(a.level), scenes=int(a.gen_scenes), samples_per_prompt=1,
                                      seed=int(a.seed))[0]
        vqa = mllm_eval.vqa_accuracy(model, level=int(a.level), scenes=int(a.vqa_scenes))
        pope = mllm_eval.pope_suite(model, level=int(a.level), scenes=int(a.pope_scenes))[0]["mean"]
        done["points"].append(dict(step=step, geneval_overall=gen["overall"], vqa_accuracy=vqa["accuracy"],
                                   vqa_per_kind=vqa["per_kind"], pope_accuracy=pope["accuracy"],
                                   pope_yes_ratio=pope.get("yes_ratio")))
        done["points"].sort(key=lambda p: p["step"])
        print(f"      step {step}: GenEval-style {gen['overall']:.3f}, VQA {vqa['accuracy']:.3f}, "
              f"POPE-style {pope['accuracy']:.3f}", flush=True)
        _write_json(path, done)  # after each point, so a kill loses at most one
    rows = [r for r in _read_jsonl(os.path.join(mllm_dir, "metrics.jsonl")) if r.get("stage") == a.stage]
    done["losses"] = {k: [(r["step"], r[k]) for r in rows if r.get(k) is not None]
                      for k in ("loss", "text_loss", "image_loss")}
    _write_json(path, done)
    last = done["points"][-1]
    return dict(stage=a.stage, steps=[p["step"] for p in done["points"]],
                geneval_overall=last["geneval_overall"], vqa_accuracy=last["vqa_accuracy"],
                pope_accuracy=last["pope_accuracy"],
                # Area under each score's curve (mean over the evaluated steps): one number for "how fast".
                geneval_mean_over_steps=float(np.mean([p["geneval_overall"] for p in done["points"]])),
                vqa_mean_over_steps=float(np.mean([p["vqa_accuracy"] for p in done["points"]])),
                final_text_loss=rows[-1].get("text_loss") if rows else None,
                final_image_loss=rows[-1].get("image_loss") if rows else None, file=path)


def _self_enhance(config, workdir: str) -> dict:
    from illume_jax.align import round as round_lib
    summary = round_lib.run_round(config.mllm, os.path.join(workdir, "mllm"))
    rows = _read_jsonl(os.path.join(workdir, "mllm", "self_enhance", "train", "metrics.jsonl"))
    judged = summary["judge"]
    return dict(samples=summary["generate"].get("samples", 0), consistent=judged.get("consistent"),
                judged=judged.get("judged"), dialogues=summary["dialogues"].get("dialogues", 0),
                mix_weight=float(config.mllm.self_enhance.mix_weight),
                stage3_steps=summary["train"].get("step", len(rows)), final_loss=rows[-1]["loss"] if rows else None,
                geneval_overall=summary["eval"].get("geneval_overall"),
                pope_accuracy=summary["eval"].get("pope_accuracy"), edit_success=summary["eval"].get("edit_success"))


def _decoder(config, workdir: str) -> dict:
    from illume_jax.train.decoder import train_decoder
    out = train_decoder(config.decoder, os.path.join(workdir, "decoder"))
    unet = out.get("unet", {}) if isinstance(out.get("unet"), dict) else {}
    flat = {f"vae_{k}": v for k, v in (out.get("vae") or {}).items() if isinstance(v, (int, float))}
    flat |= {k: v for k, v in unet.items() if isinstance(v, (int, float))}
    return flat


def final_model_dir(config, workdir: str) -> str:
    """The last MLLM the pipeline trains: stage 3 of the round, else the stage-2 model."""
    if "self_enhance" in config.phases:
        return os.path.join(workdir, "mllm", "self_enhance", "train")
    return os.path.join(workdir, "mllm")


def _eval(config, workdir: str, phases: dict) -> dict:
    from illume_jax.eval import mllm as mllm_eval
    from illume_jax.eval import report
    from illume_jax.infer.illume import Illume
    model = Illume.load(final_model_dir(config, workdir))
    e = config.eval
    tok, dec, se = phases.get("tokenizer", {}), phases.get("decoder"), phases.get("self_enhance")
    extra = {
        "tokenizer ceiling (scorer agreement, original vs reconstruction)": tok.get("tokenizer_ceiling"),
        "tokenizer pixel-codebook usage": tok.get("pixel_usage"),
    }
    if dec is not None:
        extra["diffusion decoder agreement (2x, from ground-truth codes)"] = dec.get("decoder_agreement")
    if se is not None:
        extra["self-enhancement: consistent / judged"] = f"{se.get('consistent')} / {se.get('judged')}"
    # Generation throughput of the jitted CFG loop (programs already compiled by a warm-up).
    prompts = ["a red circle", "a blue square left of a green triangle"] * 4
    model.generate(prompts, seed=1)
    t0 = time.perf_counter()
    model.generate(prompts, seed=2)
    extra["generation images/s (batch 8, CFG 2.0, 350-token blocks)"] = round(8 / (time.perf_counter() - t0), 2)
    curves = {}
    for name, path in (("tokenizer loss", ("tokenizer", "tokenizer", "metrics.jsonl")),
                       ("MLLM stages 1-2 loss", ("mllm", "metrics.jsonl")),
                       ("stage 3 loss", ("mllm", "self_enhance", "train", "metrics.jsonl")),
                       ("decoder UNet loss", ("decoder", "unet", "metrics.jsonl"))):
        pts = report.read_curves(os.path.join(workdir, *path), keys=("loss",)).get("loss")
        if pts:
            curves[name] = pts
    if "alignment" in phases:
        points = json.load(open(os.path.join(workdir, "alignment.json")))["points"]
        for key, name in (("geneval_overall", "GenEval-style vs stage-2 step"),
                          ("vqa_accuracy", "short-answer VQA vs stage-2 step")):
            curves[name] = [(p["step"], p[key]) for p in points]
    results = mllm_eval.evaluate_and_report(
        model, workdir, level=int(e.level), gen_scenes=int(e.gen_scenes), samples_per_prompt=int(e.samples_per_prompt),
        pope_scenes=int(e.pope_scenes), edit_pairs=int(e.edit_pairs), seed=int(e.seed), out_dir=workdir,
        extra_metrics=extra, curves=curves, reconstructions=_reconstructions(config, workdir, with_decoder=dec is not None),
        title=config.title)
    with open(os.path.join(workdir, "metrics.json")) as f:
        full = json.load(f)
    full.update(phases=phases, extra=extra)
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
        json.dump(full, f, indent=1, default=float)
    return dict(geneval_overall=results["geneval"]["overall"], pope_accuracy=results["pope"]["mean"]["accuracy"],
                edit_success=results["edit"]["success"], report=results["files"]["report"],
                overview=results["files"]["overview"])


def _reconstructions(config, workdir: str, n: int = 6, with_decoder: bool = True) -> list[tuple]:
    """(original, tokenizer reconstruction[, diffusion decoder's 2x image from the same codes])."""
    from illume_jax.data import images as images_lib
    from illume_jax.data import shapecomp
    from illume_jax.train.tokenizer import load_tokenizer
    originals = [shapecomp.render(shapecomp.make_scene(1, "test", i)) for i in range(n)]
    x = np.stack([images_lib.to_model_range(o) for o in originals])
    _, trainer, state = load_tokenizer(config.tokenizer, os.path.join(workdir, "tokenizer"))
    recon, _ = trainer.reconstruct(state, x)
    recon = images_lib.to_uint8(np.asarray(recon))
    if not with_decoder:
        return list(zip(originals, recon))
    from illume_jax.train.decoder import load_decoder
    dec_trainer, dec_state = load_decoder(os.path.join(workdir, "decoder"), trainer.mesh, with_tokenizer=True)
    pad = (-n) % int(config.decoder.eval.batch_size)
    x2 = np.concatenate([x, np.repeat(x[-1:], pad, 0)]) if pad else x
    decoded = dec_trainer.decode_images(dec_state, x2)[:n]
    return list(zip(originals, recon, decoded))


def run(config: Any, workdir: str, overrides: list[str]) -> dict:
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    if os.path.abspath(config.root) != workdir:  # the phases find each other's outputs through root
        raise SystemExit(f"--workdir={workdir} but the config's root is {config.root!r}: pass root={workdir} "
                         "among the config's arguments (launch/local.sh demo and launch/sweep.sh do)")
    unknown = [p for p in config.phases if p not in PHASES]
    if unknown or list(config.phases) != sorted(config.phases, key=PHASES.index):
        raise SystemExit(f"config.phases={tuple(config.phases)}: expected phases from {PHASES}, in that order")
    table = {
        "tokenizer": ("tokenizer (SigLIP ViT + DualViTok)" if config.tokenizer.vit_pretrain.steps > 0 else
                      "tokenizer (DualViTok, pixel supervision only)", lambda: _tokenizer(config, workdir),
                      lambda o: f"{_secs(o)}, loss {o.get('final_loss') or 0:.4f}, ceiling "
                                f"{o.get('tokenizer_ceiling', 0):.2f}, pixel usage {o.get('pixel_usage', 0):.0%}"),
        "encode": ("pre-tokenization (encode-dataset)", lambda: _encode(config, workdir),
                   lambda o: f"{_secs(o)}, {o.get('records', 0)} images encoded, {o.get('skipped', 0)} skipped"),
        "mllm": ("MLLM stages 1-2 (base, embed_init, align)", lambda: _mllm(config, workdir, overrides),
                 lambda o: f"{_secs(o)}, {o['steps']} steps, loss {o.get('final_loss') or 0:.3f}"
                           f"{', resumed after SIGTERM at step %d' % o['preempted_at'] if o.get('resumed') else ''}"),
        "alignment": ("alignment speed (scores at every stage-2 checkpoint)", lambda: _alignment(config, workdir),
                      lambda o: f"{_secs(o)}, steps {o['steps']}, final GenEval-style {o['geneval_overall']:.2f}, "
                                f"VQA {o['vqa_accuracy']:.2f} (means over steps {o['geneval_mean_over_steps']:.3f} / "
                                f"{o['vqa_mean_over_steps']:.3f})"),
        "self_enhance": ("self-enhancement round + stage 3 (SFT)", lambda: _self_enhance(config, workdir),
                         lambda o: f"{_secs(o)}, "
                                   + (f"{o.get('consistent')}/{o.get('judged')} images consistent, {o.get('dialogues')} "
                                      f"dialogues at {o.get('mix_weight'):.0%} of the batch" if o.get("mix_weight")
                                      else "control arm (no drawing, judging or dialogues)")
                                   + f", stage-3 loss {o.get('final_loss') or 0:.3f}"),
        "decoder": ("diffusion decoder (VAE + UNet, 2x)", lambda: _decoder(config, workdir),
                    lambda o: f"{_secs(o)}, loss {o.get('loss', 0):.4f}, agreement "
                              f"{o.get('decoder_agreement', 0):.2f}, PSNR {o.get('val_psnr', 0):.1f} dB"),
    }
    t0 = time.time()
    phases: dict = {}
    names = list(config.phases)
    for i, name in enumerate(names):
        index = (i + 1, len(names))
        if name == "eval":
            phases["eval"] = _phase(workdir, "eval", index, "evaluation + report", lambda: _eval(config, workdir, phases),
                                    lambda o: f"{_secs(o)}, GenEval-style {o['geneval_overall']:.2f}, POPE-style "
                                              f"{o['pope_accuracy']:.2f}, editing {o['edit_success']:.2f}")
        else:
            title, fn, line = table[name]
            phases[name] = _phase(workdir, name, index, title, fn, line)
    total = time.time() - t0
    summary = dict(config=config.config_arg, phases=phases, seconds=round(total, 1))
    _write_json(os.path.join(workdir, "summary.json"), summary)
    outputs = [os.path.join(workdir, "report.html"), os.path.join(workdir, "metrics.json")] if "eval" in names else []
    print(f"done in {total / 60:.1f} min (this run): {', '.join(outputs + [os.path.join(workdir, 'summary.json')])}",
          flush=True)
    return summary
