"""The self-enhancement experiment at ShapeComp scale (ILLUME Table 7): configs/illume_tiny.py plus
the round and ablation sizes the README's figures were measured with.

Launch (after training configs/illume_tiny.py into the workdir):
  python -m illume_jax self-enhance --config=configs/self_enhance_tiny.py:tokenizer=runs/exp1 --workdir=runs/illume_tiny
  python -m illume_jax self-enhance --config=configs/self_enhance_tiny.py:tokenizer=runs/exp1 --workdir=runs/illume_tiny \
      --ablation --seeds=0,1,2
Args:     any of configs/illume_tiny.py's (the trained model's), and judge=exact|model|http.
What:     72 prompts (every GenEval-style tag of 32 level-1 training scenes) -> images -> judged ->
          assessment dialogues; stage 3 continues 30 steps from the trained model with 20% of each
          batch from the dialogues ('with') or none ('without'), per seed; held-out evaluation on
          32 GenEval-style scenes, 50 POPE scenes per split and 48 edit pairs (eval-mllm's sizes).
"""
from configs import common, illume_tiny


def get_config(arg: str | None = None):
    a = common.parse_arg(arg, steps=400, batch=16, tokenizer="runs/dualvitok_tiny", levels="1", workers=0,
                         vocab=512, judge="exact")
    c = illume_tiny.get_config(f"steps={a.steps},batch={a.batch},tokenizer={a.tokenizer},levels={a.levels},"
                               f"workers={a.workers},vocab={a.vocab}")
    c.self_enhance.update(num_scenes=32, train_steps=30, mix_weight=0.2, judge=a.judge,
                          eval=dict(gen_scenes=32, pope_scenes=50, edit_pairs=48))
    return c
