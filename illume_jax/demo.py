"""The main job on the built-in default world (ShapeComp): `bash launch/local.sh demo`.

The whole ILLUME pipeline at tiny scale (configs/demo.py), one phase after the other, each in its
own folder of the workdir and each resumable, so an interrupted demo continues from its last
checkpoint when the same command runs again (a finished phase is not redone):

  1 tokenizer     SigLIP pre-training of the ViT, then DualViTok          -> tokenizer/
  2 encode        pre-tokenization of training images (ArrayRecord)        -> tokenizer/codes/
  3 mllm          ILLUME stages 1-2 in a child process, SIGTERM-preempted
                  part-way (as a pod would be) and resumed                 -> mllm/
  4 self_enhance  one round from the stage-2 model, whose stage 3 (SFT)
                  trains with the assessment dialogues                    -> mllm/self_enhance/
  5 decoder       the tiny diffusion decoder (VAE, UNet on the codes, 2x)  -> decoder/
  6 eval          held-out suites on the final model                       -> report.html, metrics.json

Each phase prints one summary line (time, final loss, key metric); `phases/<name>.json` holds it.
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

PHASES = ("tokenizer", "encode", "mllm", "self_enhance", "decoder", "eval")


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _phase(workdir: str, name: str, title: str, fn: Callable[[], dict], line: Callable[[dict], str]) -> dict:
    """Runs a phase unless its summary exists; prints its summary line either way."""
    path = os.path.join(workdir, "phases", f"{name}.json")
    n = PHASES.index(name) + 1
    if os.path.exists(path):
        with open(path) as f:
            out = json.load(f)
        print(f"[{n}/{len(PHASES)}] {title}: done before ({line(out)})", flush=True)
        return out
    print(f"[{n}/{len(PHASES)}] {title} ...", flush=True)
    t0 = time.time()
    out = fn()
    out["seconds"] = round(time.time() - t0, 1)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(out, f, indent=1, default=float)
    os.replace(path + ".tmp", path)
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
    """Stages 1-2 in a child process: SIGTERM after `preempt_at_step`, then the same command again."""
    from illume_jax.train import loop
    mllm_dir = os.path.join(workdir, "mllm")
    stop = config.mllm.stages[-2].name
    cmd = [sys.executable, "-m", "illume_jax", "train",
           f"--config=configs/demo.py:scale={config.scale},part=mllm,root={workdir}", f"--workdir={mllm_dir}",
           f"--stop_after_stage={stop}"] + [o.replace("--config.mllm.", "--config.", 1) for o in overrides
                                            if o.startswith("--config.mllm.")]
    metrics = os.path.join(mllm_dir, "metrics.jsonl")
    preempted_at = None
    if not _read_jsonl(metrics):
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


def _self_enhance(config, workdir: str) -> dict:
    from illume_jax.align import round as round_lib
    summary = round_lib.run_round(config.mllm, os.path.join(workdir, "mllm"))
    rows = _read_jsonl(os.path.join(workdir, "mllm", "self_enhance", "train", "metrics.jsonl"))
    judged = summary["judge"]
    return dict(samples=summary["generate"]["samples"], consistent=judged.get("consistent"),
                judged=judged.get("judged"), dialogues=summary["dialogues"].get("dialogues"),
                stage3_steps=summary["train"].get("step", len(rows)), final_loss=rows[-1]["loss"] if rows else None)


def _decoder(config, workdir: str) -> dict:
    from illume_jax.train.decoder import train_decoder
    out = train_decoder(config.decoder, os.path.join(workdir, "decoder"))
    unet = out.get("unet", {}) if isinstance(out.get("unet"), dict) else {}
    flat = {f"vae_{k}": v for k, v in (out.get("vae") or {}).items() if isinstance(v, (int, float))}
    flat |= {k: v for k, v in unet.items() if isinstance(v, (int, float))}
    return flat


def _eval(config, workdir: str, phases: dict) -> dict:
    from illume_jax.eval import mllm as mllm_eval
    from illume_jax.eval import report
    from illume_jax.infer.illume import Illume
    final = os.path.join(workdir, "mllm", "self_enhance", "train")
    model = Illume.load(final)
    e = config.eval
    extra = {
        "tokenizer ceiling (scorer agreement, original vs reconstruction)": phases["tokenizer"].get("tokenizer_ceiling"),
        "tokenizer pixel-codebook usage": phases["tokenizer"].get("pixel_usage"),
        "diffusion decoder agreement (2x, from ground-truth codes)": phases["decoder"].get("decoder_agreement"),
        "self-enhancement: consistent / judged": f"{phases['self_enhance'].get('consistent')} / "
                                                 f"{phases['self_enhance'].get('judged')}",
    }
    # Generation throughput of the jitted CFG loop (programs already compiled by a warm-up).
    prompts = ["a red circle", "a blue square left of a green triangle"] * 4
    model.generate(prompts, seed=1)
    t0 = time.perf_counter()
    model.generate(prompts, seed=2)
    extra["generation images/s (batch 8, CFG 2.0, 350-token blocks)"] = round(8 / (time.perf_counter() - t0), 2)
    curves = {}
    for name, path in (("tokenizer loss", ("tokenizer", "tokenizer", "metrics.jsonl")),
                       ("MLLM stages 1-2 loss", ("mllm", "metrics.jsonl")),
                       ("stage 3 (with self-enhancement data) loss", ("mllm", "self_enhance", "train", "metrics.jsonl")),
                       ("decoder UNet loss", ("decoder", "unet", "metrics.jsonl"))):
        pts = report.read_curves(os.path.join(workdir, *path), keys=("loss",)).get("loss")
        if pts:
            curves[name] = pts
    results = mllm_eval.evaluate_and_report(
        model, workdir, level=int(e.level), gen_scenes=int(e.gen_scenes), samples_per_prompt=int(e.samples_per_prompt),
        pope_scenes=int(e.pope_scenes), edit_pairs=int(e.edit_pairs), seed=int(e.seed), out_dir=workdir,
        extra_metrics=extra, curves=curves, reconstructions=_reconstructions(config, workdir),
        title="illume_jax demo: the ILLUME pipeline on ShapeComp (tiny)")
    with open(os.path.join(workdir, "metrics.json")) as f:
        full = json.load(f)
    full.update(phases=phases, extra=extra)
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
        json.dump(full, f, indent=1, default=float)
    return dict(geneval_overall=results["geneval"]["overall"], pope_accuracy=results["pope"]["mean"]["accuracy"],
                edit_success=results["edit"]["success"], report=os.path.join(workdir, "report.html"))


def _reconstructions(config, workdir: str, n: int = 6) -> list[tuple]:
    """(original, tokenizer reconstruction, diffusion decoder's 2x image from the same codes)."""
    from illume_jax.data import images as images_lib
    from illume_jax.data import shapecomp
    from illume_jax.train.decoder import load_decoder
    from illume_jax.train.tokenizer import load_tokenizer
    originals = [shapecomp.render(shapecomp.make_scene(1, "test", i)) for i in range(n)]
    x = np.stack([images_lib.to_model_range(o) for o in originals])
    _, trainer, state = load_tokenizer(config.tokenizer, os.path.join(workdir, "tokenizer"))
    recon, _ = trainer.reconstruct(state, x)
    dec_trainer, dec_state = load_decoder(os.path.join(workdir, "decoder"), trainer.mesh, with_tokenizer=True)
    pad = (-n) % int(config.decoder.eval.batch_size)
    x2 = np.concatenate([x, np.repeat(x[-1:], pad, 0)]) if pad else x
    decoded = dec_trainer.decode_images(dec_state, x2)[:n]
    return list(zip(originals, images_lib.to_uint8(np.asarray(recon)), decoded))


def run(config: Any, workdir: str, overrides: list[str]) -> dict:
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    if os.path.abspath(config.root) != workdir:  # the phases find each other's outputs through root
        raise SystemExit(f"--workdir={workdir} but the config's root is {config.root!r}: pass "
                         f"--config=configs/demo.py:root={workdir} (launch/local.sh demo does)")
    t0 = time.time()
    phases: dict = {}
    phases["tokenizer"] = _phase(workdir, "tokenizer", "tokenizer (SigLIP ViT + DualViTok)",
                                 lambda: _tokenizer(config, workdir),
                                 lambda o: f"{_secs(o)}, loss {o.get('final_loss') or 0:.4f}, ceiling "
                                           f"{o.get('tokenizer_ceiling', 0):.2f}, pixel usage {o.get('pixel_usage', 0):.0%}")
    phases["encode"] = _phase(workdir, "encode", "pre-tokenization (encode-dataset)",
                              lambda: _encode(config, workdir),
                              lambda o: f"{_secs(o)}, {o.get('records', 0)} images encoded, {o.get('skipped', 0)} skipped")
    phases["mllm"] = _phase(workdir, "mllm", "MLLM stages 1-2 (base, embed_init, align)",
                            lambda: _mllm(config, workdir, overrides),
                            lambda o: f"{_secs(o)}, {o['steps']} steps, loss {o.get('final_loss') or 0:.3f}"
                                      f"{', resumed after SIGTERM at step %d' % o['preempted_at'] if o.get('resumed') else ''}")
    phases["self_enhance"] = _phase(workdir, "self_enhance", "self-enhancement round + stage 3 (SFT)",
                                    lambda: _self_enhance(config, workdir),
                                    lambda o: f"{_secs(o)}, {o.get('consistent')}/{o.get('judged')} images consistent, "
                                              f"{o.get('dialogues')} dialogues, stage-3 loss {o.get('final_loss') or 0:.3f}")
    phases["decoder"] = _phase(workdir, "decoder", "diffusion decoder (VAE + UNet, 2x)",
                               lambda: _decoder(config, workdir),
                               lambda o: f"{_secs(o)}, loss {o.get('loss', 0):.4f}, agreement "
                                         f"{o.get('decoder_agreement', 0):.2f}, PSNR {o.get('val_psnr', 0):.1f} dB")
    phases["eval"] = _phase(workdir, "eval", "evaluation + report",
                            lambda: _eval(config, workdir, phases),
                            lambda o: f"{_secs(o)}, GenEval-style {o['geneval_overall']:.2f}, POPE-style "
                                      f"{o['pope_accuracy']:.2f}, editing {o['edit_success']:.2f}")
    total = time.time() - t0
    print(f"demo done in {total / 60:.1f} min (this run): report {os.path.join(workdir, 'report.html')}, "
          f"metrics {os.path.join(workdir, 'metrics.json')}", flush=True)
    return dict(phases=phases, seconds=round(total, 1))
