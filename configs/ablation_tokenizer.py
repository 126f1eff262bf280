"""Ablation: a semantic vs a pixel-reconstruction vision tokenizer, and how fast the MLLM aligns
(ILLUME §3.1 / Fig. 3's claim: semantic tokens make image-text alignment cheaper).

Launch:   bash launch/sweep.sh --config=configs/ablation_tokenizer.py --grid='tokenizer=semantic,pixel' \
              --command=pipeline --root=runs/ablation_tokenizer
          (one arm: python -m illume_jax pipeline --config=configs/ablation_tokenizer.py:tokenizer=pixel,root=W
           --workdir=W)
Args:     tokenizer=semantic|pixel, size=tiny|small, scale=measure|smoke, root=DIR (the run's workdir)
What:     per arm, the same phases with the same sizes and seeds; only the tokenizer's training differs:
            semantic  configs/dualvitok.py (SigLIP-pre-trained frozen ViT, level-0 codes trained to
                      reconstruct its features; level-1 pixel codes)
            pixel     configs/dualvitok.py:supervision=pixel (the same network and code grids, the ViT
                      trainable from random, every code trained by pixel reconstruction only)
          then pre-tokenization, MLLM stages base / embed_init / align, and the alignment phase: held-out
          GenEval-style, short-answer VQA and POPE-style scores at every stage-2 ('align') checkpoint,
          plus the stage's text and image losses (alignment.json). The MLLM's vision tower is the
          tokenizer's ViT in both arms, so understanding also sees pixel-trained features in the pixel arm.
Hardware: 2 CPU cores; measure: about 35 minutes per arm (README, "Ablations").
"""
from configs import common, demo

SIZES = {
    "measure": dict(pretrain=200, tok_steps=400, tok_batch=16, tok_eval=64, mllm_steps=120, mllm_batch=16,
                    examples=2000, mllm_ckpt_every=30, keep_checkpoints=100, mllm_log_every=10, se_scenes=4, se_steps=10, encode=512,
                    eval=dict(gen_scenes=8, samples_per_prompt=1, pope_scenes=8, edit_pairs=4),
                    alignment=dict(gen_scenes=8, vqa_scenes=16, pope_scenes=4)),
    "smoke": dict(pretrain=2, tok_steps=4, tok_batch=8, tok_eval=8, mllm_steps=4, mllm_batch=8, examples=16,
                  mllm_ckpt_every=2, keep_checkpoints=100, mllm_log_every=1, se_scenes=2, se_steps=2, encode=8,
                  eval=dict(gen_scenes=1, samples_per_prompt=1, pope_scenes=1, edit_pairs=1),
                  alignment=dict(gen_scenes=1, vqa_scenes=1, pope_scenes=1)),
}


def get_config(arg: str | None = None):
    a = common.parse_arg(arg, **dict(demo.ARGS, scale="measure", root="runs/ablation_tokenizer"))
    if a.scale not in SIZES:
        raise ValueError(f"config argument scale={a.scale!r}: expected one of {sorted(SIZES)}")
    s = SIZES[a.scale]
    c = demo.pipeline_config("configs/ablation_tokenizer.py", a, s,
                             phases=("tokenizer", "encode", "mllm", "alignment"),
                             title=f"illume_jax ablation: {a.tokenizer} tokenizer")
    if not a.part:
        c.alignment = dict(stage="align", level=1, seed=0, **s["alignment"])
    return c
