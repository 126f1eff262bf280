"""Train-step throughput: our jitted JAX step vs the same model and optimizer in PyTorch,
next to the machine's practical FLOP/s ceiling (one large matmul), in one invocation.

  python bench/train_step.py                 # tiny + small (~67M params) configs, CPU
  python bench/train_step.py --sizes small --steps 5 --seq 256 --batch 8
  python bench/train_step.py --sizes small --batch 16 --seq 1024 --matmul 8192   # on a GPU: bf16 compute

For each size: tokens/s and achieved FLOP/s (6 * params * tokens + attention, the usual
model-FLOPs convention, remat not counted) of
  - jax:   illume_jax's train step (AdamW, global-norm clipping, fp32, remat off, XLA attention
           on CPU / cuDNN on GPU,
           scanned layers, NaN guard, per-modality metrics), one device;
  - torch: transformers Qwen2ForCausalLM + torch.optim.AdamW(fused where available), fp32;
  - matmul: a large fp32 matmul in each framework (the ceiling).
Compile / warm-up steps are excluded and reported separately. Writes bench/results/train_step_<backend>.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SIZES = {
    # d, layers, heads, kv heads, head dim, mlp, vocab
    "tiny": dict(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128, vocab_size=512),
    "small": dict(d_model=640, num_layers=10, num_heads=10, num_kv_heads=5, head_dim=64, mlp_dim=1792,
                  vocab_size=32000),
}


def model_flops_per_token(cfg) -> float:
    """6 * non-embedding-lookup params + causal attention (fwd+bwd), per token."""
    n = cfg.num_params() - cfg.vocab_size * cfg.d_model * (0 if cfg.tie_embeddings else 1)
    return 6 * n


def attention_flops_per_token(cfg, seq: int) -> float:
    # QK^T and AV: 2 matmuls * 2 flops * T * H * N per token, half of it causal, x3 for fwd+bwd.
    return 3 * 2 * 2 * seq * cfg.num_heads * cfg.head_dim * cfg.num_layers / 2


def bench_matmul_jax(n: int, iters: int, dtype: str = "float32") -> float:
    import jax
    import jax.numpy as jnp
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(iters):
        out = f(a)
    out.block_until_ready()
    return 2 * n ** 3 * iters / (time.perf_counter() - t)


def bench_matmul_torch(n: int, iters: int, device: str = "cpu", dtype: str = "float32") -> float:
    import torch
    torch.backends.cuda.matmul.allow_tf32 = True
    a = torch.ones((n, n), device=device, dtype=getattr(torch, dtype))
    a @ a
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(iters):
        a @ a
    sync()
    return 2 * n ** 3 * iters / (time.perf_counter() - t)


def bench_jax(cfg, batch: int, seq: int, steps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import ml_collections as mlc

    from configs import common
    from illume_jax import sharding
    from illume_jax.train import state as train_state_lib
    from illume_jax.train import step as train_step_lib

    config = mlc.ConfigDict(dict(
        seed=0, model=common.llm_config(**dataclasses.asdict(cfg)), mesh=common.mesh_config(),
        optim=common.optim_config(clip_norm=1.0),
        stages=[common.stage_config("bench", steps=steps, seq_len=seq, global_batch_size=batch, lr=1e-4,
                                    warmup_steps=0, schedule="constant", mixture={"x": 1.0})]))
    t0 = time.perf_counter()
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    _, _, state = train_state_lib.create_state(config, 0, mesh)
    train_step = train_step_lib.make_train_step(config, 0, mesh)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
    b = sharding.global_batch(mesh, dict(
        tokens=tokens[:, :-1], targets=tokens[:, 1:], loss_mask=np.ones((batch, seq), np.float32),
        segment_ids=np.ones((batch, seq), np.int32),
        positions=np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)), sources=np.ones((batch, seq), np.int32)))
    state, metrics = train_step(state, b)
    jax.block_until_ready(metrics["loss"])
    compile_s = time.perf_counter() - t0
    t = time.perf_counter()
    for _ in range(steps):
        state, metrics = train_step(state, b)
    jax.block_until_ready(metrics["loss"])
    dt = (time.perf_counter() - t) / steps
    return dict(step_s=dt, compile_s=compile_s, loss=float(metrics["loss"]))


def bench_torch(cfg, batch: int, seq: int, steps: int, device: str = "cpu") -> dict:
    import torch
    import transformers
    torch.manual_seed(0)
    # JAX's default fp32 matmul precision on GPUs is TF32; give PyTorch the same.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    hf_cfg = transformers.Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, tie_word_embeddings=cfg.tie_embeddings, max_position_embeddings=max(seq, 64),
        rope_theta=cfg.rope_theta, attn_implementation="sdpa")
    model = transformers.Qwen2ForCausalLM(hf_cfg).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    rng = np.random.default_rng(0)
    tokens = torch.as_tensor(rng.integers(0, cfg.vocab_size, (batch, seq + 1))).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    import contextlib
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else contextlib.nullcontext()

    def step():
        with autocast:
            logits = model(inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    t0 = time.perf_counter()
    step()
    sync()
    warm = time.perf_counter() - t0
    t = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    dt = (time.perf_counter() - t) / steps
    return dict(step_s=dt, compile_s=warm, loss=float(loss.detach()))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="tiny,small")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--matmul", type=int, default=2048)
    p.add_argument("--attention", default=None, help="our kernel: xla (CPU default) | cudnn (GPU default)")
    args = p.parse_args()

    import jax
    import torch

    from illume_jax.models.llm import LLMConfig

    backend = jax.default_backend()
    # On a GPU both frameworks run there (fp32 storage, TF32 matmuls as JAX does by default).
    device = "cuda" if backend == "gpu" and torch.cuda.is_available() else "cpu"
    mm_dtype = "bfloat16" if backend == "gpu" else "float32"
    ceiling = {"jax": bench_matmul_jax(args.matmul, 10, mm_dtype),
               "torch": bench_matmul_torch(args.matmul, 10, device, mm_dtype)}
    results = dict(backend=backend, device=jax.devices()[0].device_kind, cores=os.cpu_count(),
                   torch_threads=torch.get_num_threads(), batch=args.batch, seq=args.seq,
                   matmul_flops=ceiling, rows=[])
    ceil = max(ceiling.values())
    print(f"backend={backend} ({results['device']}), {os.cpu_count()} cores; batch {args.batch} x seq {args.seq}")
    print(f"matmul {args.matmul}^3 {mm_dtype}: jax {ceiling['jax'] / 1e9:.1f} GFLOP/s, "
          f"torch {ceiling['torch'] / 1e9:.1f} GFLOP/s (ceiling = the higher)")
    print(f"{'size':6s} {'params':>8s} {'framework':9s} {'step ms':>9s} {'tokens/s':>9s} {'GFLOP/s':>8s} "
          f"{'% ceiling':>9s} {'warm-up s':>9s}")
    for size in args.sizes.split(","):
        attention = args.attention or ("cudnn" if backend == "gpu" else "xla")
        # GPU: bf16 compute over fp32 master weights in both frameworks (cuDNN attention needs bf16).
        cfg = LLMConfig(**SIZES[size], tie_embeddings=True, remat="none", rope_theta=1e6, attention=attention,
                        dtype="bfloat16" if backend == "gpu" else "float32")
        tokens = args.batch * args.seq
        flops = tokens * (model_flops_per_token(cfg) + attention_flops_per_token(cfg, args.seq))
        for name, fn in (("jax", bench_jax), ("torch", lambda *a: bench_torch(*a, device=device))):
            r = fn(cfg, args.batch, args.seq, args.steps)
            row = dict(size=size, params=cfg.num_params(), framework=name, step_ms=r["step_s"] * 1e3,
                       tokens_per_s=tokens / r["step_s"], gflops=flops / r["step_s"] / 1e9,
                       pct_ceiling=100 * flops / r["step_s"] / ceil, warmup_s=r["compile_s"], loss=r["loss"])
            results["rows"].append(row)
            print(f"{size:6s} {cfg.num_params() / 1e6:7.1f}M {name:9s} {row['step_ms']:9.1f} {row['tokens_per_s']:9.0f} "
                  f"{row['gflops']:8.1f} {row['pct_ceiling']:8.1f}% {row['warmup_s']:9.1f}", flush=True)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"train_step_{backend}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
