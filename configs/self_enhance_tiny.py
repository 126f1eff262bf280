"""The self-enhancement experiment at ShapeComp scale (ILLUME Table 7): configs/illume_tiny.py plus
the round and ablation sizes the README's figures were measured with. One config for the whole
experiment, so the stage list the round reads is the one the model was trained with.

Launch:
  python -m illume_jax train --config=configs/self_enhance_tiny.py --workdir=runs/se_tiny --stop_after_stage=align
  python -m illume_jax self-enhance --config=configs/self_enhance_tiny.py --workdir=runs/se_tiny
  python -m illume_jax self-enhance --config=configs/self_enhance_tiny.py --workdir=runs/se_tiny --ablation --seeds=0,1,2
Args:     any of configs/illume_tiny.py's (steps=300: base 150, embed_init 75, align 300), judge=exact|model|http,
          se_steps (the stage-3 budget of the round and of every ablation run), mix (the dialogues' batch share).
What:     ILLUME's protocol: the stage-2 ('align') model draws 72 images (every GenEval-style tag of 32
          level-1 training scenes) -> judged -> assessment dialogues; stage 3 ('sft') is trained from
          the stage-2 weights for se_steps steps with `mix` of each batch from the dialogues ('with')
          or none ('without'), per seed; held-out evaluation on 32 GenEval-style scenes, 50 POPE scenes
          per split and 48 edit pairs (eval's sizes), and the model judging its own images.
Hardware: 2 CPU cores, measured 2026-12-02: train 52 min (sharing the cores), round 6 min, ablation 27 min
          (5 runs of 50 stage-3 steps + evaluation; the round's own stage 3 is the with-arm of seed 0).
"""
from configs import common, illume_tiny


def get_config(arg: str | None = None):
    a = common.parse_arg(arg, steps=300, batch=16, tokenizer="runs/dualvitok_tiny", levels="1", workers=0,
                         vocab=512, judge="exact", se_steps=50, mix=0.2, size="tiny")
    c = illume_tiny.get_config(f"steps={a.steps},batch={a.batch},tokenizer={a.tokenizer},levels={a.levels},"
                               f"workers={a.workers},vocab={a.vocab},size={a.size}")
    c.self_enhance.update(num_scenes=32, train_steps=a.se_steps, mix_weight=a.mix, judge=a.judge,
                          eval=dict(gen_scenes=32, pope_scenes=50, edit_pairs=48))
    return c
