"""Attention kernels side by side on the current backend: numerics against the XLA path
(fp32 reference: outputs, and q/k/v gradients with whether they are all finite) and
forward+backward time, for causal, packed (segment ids, causal, padding at the end) and
bidirectional (vision encoders: no mask) rows.

  python bench/attention.py                      # CPU: xla vs the per-example 'cpu' kernel
  python bench/attention.py --batch 16 --seq 1024 --heads 4 --kv_heads 4 --head_dim 16 --tag tiny_vit
  python bench/attention.py --batch 4 --seq 4096 # GPU: xla vs cudnn (bf16)
Prints a table and writes bench/results/attention_<backend>[_<tag>].json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from illume_jax.modules.attention import attend  # noqa: E402


def timeit(fn, *args, iters=10):
    out = fn(*args)
    jax.block_until_ready(out)
    t = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / iters


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--heads", type=int, default=28)
    p.add_argument("--kv_heads", type=int, default=4)
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--dtype", default=None)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--tag", default="", help="suffix of the results file (several shapes per backend)")
    args = p.parse_args()
    backend = jax.default_backend()
    dtype = jnp.dtype(args.dtype or ("bfloat16" if backend == "gpu" else "float32"))
    B, T, N, K, H = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(B, T, N, H)), dtype)
    k = jnp.asarray(rng.normal(size=(B, T, K, H)), dtype)
    v = jnp.asarray(rng.normal(size=(B, T, K, H)), dtype)
    # Packed rows: three segments then padding.
    cut = [T // 2, T // 2 + T // 4, T - T // 16]
    seg_row = np.zeros(T, np.int32)
    seg_row[:cut[0]], seg_row[cut[0]:cut[1]], seg_row[cut[1]:cut[2]] = 1, 2, 3
    seg = jnp.asarray(np.tile(seg_row, (B, 1)))
    valid = np.asarray(seg_row > 0)

    impls = (["xla"] + (["cpu"] if backend == "cpu" else []) + (["cudnn"] if backend == "gpu" else [])
             + (["splash"] if backend == "tpu" else []))
    masks = (("causal", None, True), ("packed", seg, True), ("bidir", None, False))
    rows = []
    print(f"backend={backend} dtype={dtype.name} B={B} T={T} N={N} K={K} H={H}")
    print(f"{'impl':8s} {'mask':7s} {'max|err|':>9s} {'grad err':>9s} {'finite':>6s} {'fwd ms':>8s} {'fwd+bwd ms':>11s} "
          f"{'fwd TFLOP/s':>11s}")
    ref32 = {name: attend(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                          q_segment_ids=s, kv_segment_ids=s, implementation="xla", causal=causal)
             for name, s, causal in masks}

    def grads(impl, s, causal, dtype_):
        # The loss reads real tokens only (as a masked LM loss does): padding's gradients must be
        # zero, not garbage. cuDNN once left them unwritten and NaN reached the weights.
        keep = jnp.asarray(valid if s is not None else np.ones(T, bool))[None, :, None, None]
        f = lambda q, k, v: jnp.sum(jnp.where(keep, attend(q, k, v, q_segment_ids=s, kv_segment_ids=s,  # noqa: E731
                                                           implementation=impl, causal=causal), 0
                                              ).astype(jnp.float32) ** 2)
        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(*(x.astype(dtype_) for x in (q, k, v)))

    gref32 = {name: grads("xla", s, causal, jnp.float32) for name, s, causal in masks}
    for impl in impls:
        for name, s, causal in masks:
            kw = dict(q_segment_ids=s, kv_segment_ids=s, implementation=impl, causal=causal)
            fwd = jax.jit(lambda q, k, v, kw=kw: attend(q, k, v, **kw))
            loss = jax.jit(jax.grad(lambda q, k, v, kw=kw: jnp.sum(attend(q, k, v, **kw).astype(jnp.float32) ** 2),
                                    argnums=(0, 1, 2)))
            try:
                out = fwd(q, k, v)
                err = np.asarray(jnp.abs(out.astype(jnp.float32) - ref32[name]))
                err = float(err[:, valid].max() if name == "packed" else err.max())
                g = grads(impl, s, causal, dtype)
                finite = all(bool(jnp.isfinite(x.astype(jnp.float32)).all()) for x in g)
                rows_ = valid if name == "packed" else slice(None)
                grad_err = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)[:, rows_])) for a, b in zip(g, gref32[name]))
                t_fwd, t_bwd = timeit(fwd, q, k, v, iters=args.iters), timeit(loss, q, k, v, iters=args.iters)
            except Exception as e:  # e.g. out of memory: report it as a row, keep going
                rows.append(dict(impl=impl, mask=name, error=str(e).splitlines()[0][:120]))
                print(f"{impl:8s} {name:7s} failed: {rows[-1]['error']}", flush=True)
                continue
            # useful FLOPs: causal counts half the square, packed ~0.6 of that (three segments + padding)
            flops = 4 * B * N * T * T * H * {"causal": 0.5, "packed": 0.3, "bidir": 1.0}[name]
            rows.append(dict(impl=impl, mask=name, max_abs_err=err, grad_max_abs_err=grad_err, grads_finite=finite,
                             fwd_ms=t_fwd * 1e3, fwd_bwd_ms=t_bwd * 1e3, fwd_tflops=flops / t_fwd / 1e12))
            r = rows[-1]
            print(f"{r['impl']:8s} {r['mask']:7s} {r['max_abs_err']:9.2e} {grad_err:9.2e} {str(finite):>6s} {r['fwd_ms']:8.2f} "
                  f"{r['fwd_bwd_ms']:11.2f} {r['fwd_tflops']:11.3f}", flush=True)
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    with open(os.path.join(os.path.dirname(__file__), "results", f"attention_{backend}{'_' + args.tag if args.tag else ''}.json"), "w") as f:
        json.dump(dict(backend=backend, device=str(jax.devices()[0].device_kind), dtype=dtype.name,
                       shape=dict(B=B, T=T, N=N, K=K, H=H), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
