"""Peak host memory (RSS) of `python -m illume_jax convert --from=official --kind=llm` on synthetic
full-size Qwen2.5 checkpoints (bf16 safetensors, sharded like the hub's), and the extrapolation to 7B.

    python bench/convert_memory.py --sizes=0.5b,1.5b [--dtype=bfloat16] [--out=bench/results/convert_memory.json]

Each size: a folder with config.json and `model-0000i-of-0000n.safetensors` shards of the real
tensor shapes (values are a cheap pattern: memory does not depend on them) is written, then the
converter runs in a child process and its peak RSS (`ru_maxrss`) and wall time are recorded with
the checkpoint's size. Peak RSS is fitted as a + b * checkpoint bytes and evaluated at the 7B
LLM (measured directly too with --sizes=...,7b: ~18 GiB of RAM) and the ILLUME+ 7B MLLM (its
vocabulary-extended LLM plus the 0.74B vision tower and projectors, which convert the same way).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Qwen2.5 shapes (hub config.json values).
SIZES = {
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),
    "3b": dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
               intermediate_size=11008, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
}
ILLUME_ADDED = 131_111  # rows the ILLUME+ vocabulary extension adds (spec §3.2)
# The MLLM file's vision tower and projectors at 7B (spec §6.1/6.2): Qwen2-VL ViT 675.76M, MoVQ
# encoder 27.16M, projector_1 2 x (3584x3584 + 3584), projector_2 (32x3584 + 3584) + (3584x3584 + 3584).
TOWER_7B = 675.76e6 + 27.16e6 + 2 * (3584 * 3584 + 3584) + (32 * 3584 + 3584) + (3584 * 3584 + 3584)


def tensor_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    D, F, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    H = D // c["num_attention_heads"]
    K = c["num_key_value_heads"] * H
    out = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not c["tie_word_embeddings"]:
        out["lm_head.weight"] = (V, D)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out |= {p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                p + "self_attn.q_proj.weight": (D, D), p + "self_attn.q_proj.bias": (D,),
                p + "self_attn.k_proj.weight": (K, D), p + "self_attn.k_proj.bias": (K,),
                p + "self_attn.v_proj.weight": (K, D), p + "self_attn.v_proj.bias": (K,),
                p + "self_attn.o_proj.weight": (D, D), p + "mlp.gate_proj.weight": (F, D),
                p + "mlp.up_proj.weight": (F, D), p + "mlp.down_proj.weight": (D, F)}
    return out


def checkpoint_bytes(c: dict, itemsize: int = 2) -> int:
    return sum(int(np.prod(s)) for s in tensor_shapes(c).values()) * itemsize


def write_synthetic(folder: str, c: dict) -> int:
    from illume_jax.convert import files
    shapes = tensor_shapes(c)

    def tensors():
        for i, (k, s) in enumerate(shapes.items()):
            yield k, np.full(s, 0.01 * (i % 7 + 1), ml_dtypes.bfloat16)

    files.write_safetensors(folder, tensors(), max_shard_bytes=2 * 2 ** 30)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dict(c, model_type="qwen2", rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768), f)
    return checkpoint_bytes(c)


def measure(src: str, dst: str, dtype: str | None) -> dict:
    cmd = [sys.executable, "-m", "illume_jax", "convert", "--from=official", "--kind=llm", f"--src={src}",
           f"--dst={dst}"] + ([f"--dtype={dtype}"] if dtype else [])
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"convert failed:\n{r.stderr[-3000:]}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak_kib <= before:
        raise SystemExit("ru_maxrss did not rise: measure one size per process")
    return dict(peak_rss_gib=peak_kib / 2 ** 20, wall_s=wall)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0.5b,1.5b")
    ap.add_argument("--dtype", default=None, choices=[None, "bfloat16", "float32"])
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "convert_memory.json"))
    ap.add_argument("--tmp", default=tempfile.gettempdir())
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:  # one size per child, so each ru_maxrss is that conversion's own peak
        work = tempfile.mkdtemp(dir=a.tmp)
        try:
            c = SIZES[a.child]
            nbytes = write_synthetic(os.path.join(work, "src"), c)
            row = measure(os.path.join(work, "src"), os.path.join(work, "dst"), a.dtype)
            print(json.dumps(dict(size=a.child, checkpoint_gib=nbytes / 2 ** 30, **row)))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    rows = []
    for size in a.sizes.split(","):
        r = subprocess.run([sys.executable, __file__, f"--child={size}", f"--tmp={a.tmp}"] +
                           ([f"--dtype={a.dtype}"] if a.dtype else []), capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(r.stderr[-3000:])
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(f"{size}: checkpoint {rows[-1]['checkpoint_gib']:.2f} GiB -> peak RSS "
              f"{rows[-1]['peak_rss_gib']:.2f} GiB, {rows[-1]['wall_s']:.0f} s", flush=True)
    x = np.array([r["checkpoint_gib"] for r in rows])
    y = np.array([r["peak_rss_gib"] for r in rows])
    b, a0 = np.polyfit(x, y, 1) if len(rows) > 1 else (y[0] / x[0], 0.0)
    seven = SIZES["7b"]
    mllm = checkpoint_bytes(dict(seven, vocab_size=seven["vocab_size"] + ILLUME_ADDED)) + 2 * TOWER_7B
    targets = {"qwen2.5-7b": checkpoint_bytes(seven) / 2 ** 30, "illume_plus-7b mllm (llm + tower)": mllm / 2 ** 30}
    fit = {k: dict(checkpoint_gib=v, peak_rss_gib_extrapolated=a0 + b * v) for k, v in targets.items()}
    for k, v in fit.items():
        print(f"{k}: checkpoint {v['checkpoint_gib']:.1f} GiB -> peak RSS ~{v['peak_rss_gib_extrapolated']:.1f} GiB "
              f"(extrapolated: {a0:.2f} + {b:.2f} x checkpoint)", flush=True)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(dict(command=" ".join(sys.argv), dtype=a.dtype or "as-is", measured=rows, fit=dict(a=a0, b=b),
                       extrapolated=fit), f, indent=1)


if __name__ == "__main__":
    main()
