"""ILLUME+ 7B (Qwen2.5-7B-Instruct LLM, 28 layers, d=3584, 283,175 vocabulary rows).

AOT check: python -m illume_jax aot --config=configs/illume_plus_7b.py --topology=v5p:4x4x4
Train:     configs/illume_plus.py's docstring (this file is its size=7b).
Hardware:  a TPU v5p-128 slice (64 chips, FSDP 64); figures in the README.
"""
from configs import illume_plus


def get_config(arg=None):
    return illume_plus.get_config(arg, size="7b")
