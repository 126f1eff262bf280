"""The main job: the whole ILLUME pipeline on ShapeComp level 1 at tiny scale.

Launch:   bash launch/local.sh demo     (= python -m illume_jax pipeline --config=configs/demo.py:root=runs/demo
                                            --workdir=runs/demo)
Args:     scale=quick|full|smoke   quick: sized for <= 15 minutes on 2 CPU cores (every phase runs, the
                             models are barely trained); full: the sizes of the README's tiny figures
                             (hours); smoke: every phase's plumbing in a few minutes
          part=tokenizer|mllm|decoder   one phase's own config (the pipeline starts its MLLM training as
                             `python -m illume_jax train --config=configs/demo.py:part=mllm,root=DIR,...`)
          root=DIR           the pipeline's workdir, where the phases find each other's outputs
          The sweep axes (launch/sweep.sh --grid=...; the ablation configs fix two of them):
          tokenizer=semantic|pixel   semantic: DualViTok as the spec (level-0 codes from the text-aligned
                             ViT, feature reconstruction); pixel: the same tokenizer trained on pixel
                             reconstruction only (configs/dualvitok.py supervision=pixel)
          self_enhance=1|0   1: stage 3 trains with the round's assessment dialogues; 0: the control arm,
                             stage 3 again from the same stage-2 weights without them
          size=tiny|small    the LLM's shape (configs/illume_tiny.py LLM_SIZES)
Phases (illume_jax/pipeline.py; each resumable, a finished one is skipped on a re-run):
  1 tokenizer     SigLIP pre-training of the tiny ViT, then DualViTok (configs/dualvitok.py)
  2 encode        pre-tokenizes training images into codes (ArrayRecord), as the official pipeline does
  3 mllm          ILLUME stages 1-2 (base, embed_init, align; configs/self_enhance_tiny.py), preempted with
                  SIGTERM part-way and resumed by the same command
  4 self_enhance  one round from the stage-2 model: generate -> exact judge -> assessment dialogues ->
                  stage 3 (SFT) with them mixed in -> held-out scores
  5 decoder       the tiny diffusion decoder (VAE, then a UNet on the tokenizer's codes, 2x output)
  6 eval          held-out GenEval-, POPE- and editing-style suites on the final model ->
                  <workdir>/report.html and metrics.json
"""
import ml_collections as mlc

from configs import common, diffusion_decoder, dualvitok, self_enhance_tiny

SIZES = {
    # tokenizer: SigLIP steps, DualViTok steps, batch; mllm: stage-3 steps (the others scale), batch,
    # examples per task; self-enhancement: scenes, stage-3 steps; decoder: VAE / UNet steps, batch.
    # Compilation takes most of it (about 10 minutes of the smoke run on shared cores), so few steps.
    "quick": dict(pretrain=20, tok_steps=100, tok_batch=8, tok_eval=32, mllm_steps=30, mllm_batch=8, examples=256,
                  mllm_ckpt_every=10, mllm_log_every=5, se_scenes=4, se_steps=10, vae_steps=30, unet_steps=30,
                  dec_batch=8, dec_eval=16, encode=128,
                  eval=dict(gen_scenes=6, samples_per_prompt=1, pope_scenes=4, edit_pairs=4), preempt_at=15),
    # Every phase's plumbing in a few minutes (compilation dominates); nothing is learnt.
    "smoke": dict(pretrain=2, tok_steps=4, tok_batch=8, tok_eval=8, mllm_steps=4, mllm_batch=8, examples=16,
                  mllm_ckpt_every=2, mllm_log_every=1, se_scenes=2, se_steps=2, vae_steps=2, unet_steps=2,
                  dec_batch=8, dec_eval=8, encode=8,
                  eval=dict(gen_scenes=2, samples_per_prompt=1, pope_scenes=1, edit_pairs=2), preempt_at=3),
    "full": dict(pretrain=400, tok_steps=1200, tok_batch=16, tok_eval=256, mllm_steps=300, mllm_batch=16,
                 examples=2000, mllm_ckpt_every=50, mllm_log_every=20, se_scenes=32, se_steps=80, vae_steps=400,
                 unet_steps=1500, dec_batch=16, dec_eval=128, encode=0,
                 eval=dict(gen_scenes=32, samples_per_prompt=2, pope_scenes=50, edit_pairs=48), preempt_at=100),
}

ARGS = dict(scale="quick", part="", root="runs/demo", tokenizer="semantic", self_enhance=1, size="tiny")


def tokenizer_config(s: dict, supervision: str) -> mlc.ConfigDict:
    c = dualvitok.get_config(f"size=tiny,steps={s['tok_steps']},batch={s['tok_batch']},pretrain_steps={s['pretrain']},"
                             f"supervision={supervision}")
    c.train.eval_every = 0                        # one evaluation, at the end
    c.train.eval_images = s["tok_eval"]
    c.checkpoint.every_steps = 50
    return c


def mllm_config(s: dict, tokenizer_dir: str, size: str, self_enhance: int) -> mlc.ConfigDict:
    c = self_enhance_tiny.get_config(f"steps={s['mllm_steps']},batch={s['mllm_batch']},se_steps={s['se_steps']},"
                                     f"tokenizer={tokenizer_dir},size={size}")
    for d in c.data.datasets.values():
        d.num_examples = s["examples"]
    c.self_enhance.num_scenes = s["se_scenes"]
    if not self_enhance:
        c.self_enhance.mix_weight = 0.0           # the control arm: stage 3 without the dialogues
    c.self_enhance.eval = dict(gen_scenes=2, pope_scenes=2, edit_pairs=2)  # the pipeline's own eval phase reports
    c.checkpoint.every_steps = s["mllm_ckpt_every"]
    c.checkpoint.max_to_keep = s.get("keep_checkpoints", 3)   # the alignment phase scores every one
    c.log_every = s["mllm_log_every"]
    return c


def decoder_config(s: dict, tokenizer_dir: str) -> mlc.ConfigDict:
    c = diffusion_decoder.get_config(f"size=tiny,steps={s['unet_steps']},vae_steps={s['vae_steps']},"
                                     f"batch={s['dec_batch']},tokenizer_workdir={tokenizer_dir}")
    c.vae_train.update(batch_size=s["dec_batch"], eval_every=0)
    c.train.eval_every = 0
    c.eval.num_images = s["dec_eval"]
    c.eval.batch_size = 16
    return c


def pipeline_config(file: str, a: mlc.ConfigDict, s: dict, *, phases: tuple[str, ...], title: str
                    ) -> mlc.ConfigDict:
    """The pipeline config of `file` (this one or an ablation config) for its parsed arguments `a`,
    or, with `a.part`, that phase's own config."""
    for key, allowed in (("tokenizer", ("semantic", "pixel")), ("self_enhance", (0, 1)), ("size", ("tiny", "small"))):
        if a[key] not in allowed:
            raise ValueError(f"config argument {key}={a[key]!r}: expected one of {list(allowed)}")
    tokenizer_dir = f"{a.root.rstrip('/')}/tokenizer"
    parts = {"tokenizer": lambda: tokenizer_config(s, a.tokenizer),
             "mllm": lambda: mllm_config(s, tokenizer_dir, a.size, a.self_enhance)}
    if "decoder" in phases:
        parts["decoder"] = lambda: decoder_config(s, tokenizer_dir)
    if a.part:
        if a.part not in parts:
            raise ValueError(f"config argument part={a.part!r}: expected one of {sorted(parts)}")
        return parts[a.part]()
    c = mlc.ConfigDict()
    c.kind = "pipeline"
    c.phases = tuple(phases)
    c.title = title
    c.scale, c.root = a.scale, a.root
    args = ",".join(f"{k}={a[k]}" for k in sorted(a) if k != "part")
    c.config_arg = f"{file}:{args}"
    c.mllm_config = f"{file}:{args},part=mllm"   # the child `train` of the mllm phase
    for name, make in parts.items():
        c[name] = make()
    c.encode = mlc.ConfigDict(dict(split="train", num=s["encode"]))
    c.eval = mlc.ConfigDict(dict(level=1, seed=0, **s["eval"]))
    c.preempt_at_step = s.get("preempt_at", 0)
    return c


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    a = common.parse_arg(arg, **ARGS)
    if a.scale not in SIZES:
        raise ValueError(f"config argument scale={a.scale!r}: expected one of {sorted(SIZES)}")
    return pipeline_config("configs/demo.py", a, SIZES[a.scale],
                           phases=("tokenizer", "encode", "mllm", "self_enhance", "decoder", "eval"),
                           title="illume_jax demo: the ILLUME pipeline on ShapeComp (tiny)")
