"""ILLUME+ 7B (Qwen2.5-7B-Instruct LLM, 28 layers, d=3584, 283,175 vocabulary rows).

AOT check: python -m illume_jax aot --config=configs/illume_plus_7b.py --topology=v5p:4x4x4
Train:     python -m illume_jax convert --from=official --kind=llm --src=ckpt/Qwen2.5-7B-Instruct --dst=runs/qwen_7b
           python -m illume_jax train --config=configs/illume_plus_7b.py:tokenizer=runs/qwen_7b/tokenizer.json,\
             dualvitok=runs/official/dualvitok --config.model_init.weights_from=runs/qwen_7b \
             --config.data.datasets.pretrain.path=... --workdir=gs://...
           (the four stages of configs/illume_plus.py from Qwen2.5; to fine-tune the released ILLUME+ instead:
           --config=configs/converted.py:runs/official/illume_plus_7b)
Hardware:  a TPU v5p-128 slice (64 chips, FSDP 64); figures in the README.
"""
from configs import illume_plus


def get_config(arg=None):
    return illume_plus.get_config(arg, size="7b")
