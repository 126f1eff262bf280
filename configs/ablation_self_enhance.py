"""Ablation: with vs without self-enhancement (ILLUME §3.3 / Table 7's claim: the model judging its
own images and learning from the assessments improves both understanding and generation).

Launch:   bash launch/sweep.sh --config=configs/ablation_self_enhance.py --grid='self_enhance=1,0' \
              --command=pipeline --root=runs/ablation_self_enhance
          (one arm: python -m illume_jax pipeline --config=configs/ablation_self_enhance.py:self_enhance=0,root=W
           --workdir=W)
Args:     self_enhance=1|0, size=tiny|small, tokenizer=semantic|pixel, scale=measure|smoke, root=DIR
What:     ILLUME's protocol, per arm: tokenizer -> pre-tokenization -> MLLM stages 1-2 -> the stage-2
          model draws 72 images (every GenEval-style tag of 32 training scenes) -> exact judge ->
          assessment dialogues -> stage 3 (SFT) for 50 steps from the stage-2 weights with 20% of each
          batch from the dialogues (1) or none, with no drawing or judging (0) -> held-out GenEval-style
          (32 scenes x 2 samples), POPE-style (50 scenes per split) and editing (48 pairs) scores.
          measure uses the sizes of configs/self_enhance_tiny.py and the README's tiny tokenizer, i.e. the
          protocol of the README's self-enhancement figures, whose 3-seed version is
          `self-enhance --ablation --seeds=0,1,2` on one trained model (both arms share stages 1-2 there).
Hardware: 2 CPU cores; measure: about 1.5 hours per arm (tokenizer 30 min, stages 1-2 30-50 min).
"""
from configs import common, demo

SIZES = {
    "measure": dict(pretrain=400, tok_steps=1200, tok_batch=16, tok_eval=256, mllm_steps=300, mllm_batch=16,
                    examples=2000, mllm_ckpt_every=50, mllm_log_every=10, se_scenes=32, se_steps=50, encode=0,
                    eval=dict(gen_scenes=32, samples_per_prompt=2, pope_scenes=50, edit_pairs=48)),
    "smoke": dict(pretrain=2, tok_steps=4, tok_batch=8, tok_eval=8, mllm_steps=4, mllm_batch=8, examples=16,
                  mllm_ckpt_every=2, mllm_log_every=1, se_scenes=2, se_steps=2, encode=8,
                  eval=dict(gen_scenes=1, samples_per_prompt=1, pope_scenes=1, edit_pairs=1)),
}


def get_config(arg: str | None = None):
    a = common.parse_arg(arg, **dict(demo.ARGS, scale="measure", root="runs/ablation_self_enhance"))
    if a.scale not in SIZES:
        raise ValueError(f"config argument scale={a.scale!r}: expected one of {sorted(SIZES)}")
    return demo.pipeline_config("configs/ablation_self_enhance.py", a, SIZES[a.scale],
                                phases=("tokenizer", "encode", "mllm", "self_enhance", "eval"),
                                title=f"illume_jax ablation: self_enhance={a.self_enhance}")
