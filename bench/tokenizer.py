"""Vision-tokenizer throughput: encode and decode images/s per resolution, random weights.

  python bench/tokenizer.py                                  # tiny shapes, CPU (about a minute)
  python bench/tokenizer.py --sizes tiny,official --resolutions 256 --batch 1 --iters 2
  python bench/tokenizer.py --sizes official --resolutions 256,512 --batch 8     # on a GPU/TPU
  python bench/tokenizer.py --parts dualvitok,qwen2_vit --attention cpu --out bench/results/tokenizer_cpu_vit_cpu.json
  python bench/tokenizer.py --parts dualvitok,qwen2_vit --attention xla --out bench/results/tokenizer_cpu_vit_xla.json

Rows, for each size and square resolution:
  - dualvitok encode / decode (JAX): the whole DualViTok, images -> (semantic, pixel) codes and
    codes -> images, one jitted call each. No PyTorch counterpart runs here: the official
    tokenizer is not installable offline, so its parts are compared instead:
  - qwen2_vit (jax vs torch): the semantic encoder's ViT (patch embed, blocks, merger) against
    transformers' Qwen2VisionTransformerPretrainedModel with the same weights;
  - movq_encoder / movq_decoder (jax vs torch): the pixel branch against the PyTorch reference
    of tests/parity/test_movq_parity.py (written from the spec with the official key names),
    same weights (converted by our converter).
Warm-up (compile) calls are excluded; each figure is the median over --iters timed calls.
Writes bench/results/tokenizer_<backend>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _median_s(fn, iters: int) -> float:
    fn()  # compile / warm-up
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _config(size: str, attention: str = ""):
    """The size's DualViTok config; `attention` overrides its ViT kernel ('' = the config's)."""
    from configs import dualvitok as dualvitok_config
    from illume_jax.models.dualvitok import DualViTokConfig
    c = dualvitok_config.get_config(f"size={size}").model
    if attention:
        c.vit.attention = attention
    return DualViTokConfig.from_config(c)


def bench_dualvitok(size: str, resolution: int, batch: int, iters: int, attention: str = "") -> list[dict]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from illume_jax import sharding
    from illume_jax.models.dualvitok import DualViTok
    cfg = _config(size, attention)
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    with sharding.use_mesh(mesh):
        model = nnx.jit(lambda: DualViTok(cfg, rngs=nnx.Rngs(0)))()
    graphdef, state = nnx.split(model)
    encode = jax.jit(lambda st, x: nnx.merge(graphdef, st).encode(x))
    decode = jax.jit(lambda st, s, p: nnx.merge(graphdef, st).decode(s, p))
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (batch, resolution, resolution, 3)), jnp.float32)
    with sharding.use_mesh(mesh):
        sem, pix = encode(state, x)
        t_enc = _median_s(lambda: jax.block_until_ready(encode(state, x)), iters)
        t_dec = _median_s(lambda: jax.block_until_ready(decode(state, sem, pix)), iters)
    grids = f"{tuple(sem.shape[1:])}+{tuple(pix.shape[1:])}"
    return [dict(size=size, part="dualvitok_encode", resolution=resolution, batch=batch, codes=grids,
                 jax_images_per_s=batch / t_enc),
            dict(size=size, part="dualvitok_decode", resolution=resolution, batch=batch, codes=grids,
                 jax_images_per_s=batch / t_dec)]


def bench_qwen2_vit(size: str, resolution: int, batch: int, iters: int, device: str, attention: str = "") -> dict:
    import jax
    import jax.numpy as jnp
    import torch
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    from illume_jax.convert import hf_vit
    from illume_jax.models import vit
    from illume_jax.models.dualvitok import semantic_input_size
    c = _config(size, attention).vit
    hf_cfg = Qwen2VLVisionConfig(depth=c.depth, embed_dim=c.embed_dim, num_heads=c.num_heads, hidden_size=c.hidden_size,
                                 mlp_ratio=int(c.mlp_ratio), patch_size=c.patch_size, in_channels=c.in_channels,
                                 temporal_patch_size=c.temporal_patch_size, spatial_merge_size=c.spatial_merge_size)
    torch.manual_seed(0)
    hf = Qwen2VisionTransformerPretrainedModel(hf_cfg).float().eval().to(device)
    cfg = hf_vit.qwen2vit_config_from_hf(hf.config, remat="none", attention=c.attention)
    ours = vit.create_qwen2_vit(cfg)
    hf_vit.load_params(ours, hf_vit.qwen2vit_from_torch({k: v.cpu() for k, v in hf.state_dict().items()}, cfg))
    factor = c.patch_size * c.spatial_merge_size
    h, w = semantic_input_size(resolution, resolution, factor)
    images = jnp.asarray(np.random.default_rng(0).normal(size=(batch, h, w, 3)), jnp.float32)
    patches, positions, grid = vit.patchify_qwen2(images, c.patch_size, c.temporal_patch_size, c.spatial_merge_size)
    from flax import nnx
    graphdef, state = nnx.split(ours)
    fwd = jax.jit(lambda st, p, pos: nnx.merge(graphdef, st)(p, pos)[0])
    t_jax = _median_s(lambda: jax.block_until_ready(fwd(state, patches, positions)), iters)
    flat = torch.from_numpy(np.array(patches).reshape(-1, patches.shape[-1])).to(device)
    grid_thw = torch.as_tensor([[1, *grid]] * batch).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run_torch():
        with torch.no_grad():
            hf(flat, grid_thw=grid_thw)
        sync()
    t_torch = _median_s(run_torch, iters)
    return dict(size=size, part="qwen2_vit", resolution=resolution, batch=batch, vit_input=f"{h}x{w}",
                jax_images_per_s=batch / t_jax, torch_images_per_s=batch / t_torch)


def bench_movq(size: str, resolution: int, batch: int, iters: int, device: str) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import torch

    from illume_jax.convert import movq as conv_movq
    from illume_jax.models import movq
    from illume_jax.models.dualvitok import token_grids
    from tests.parity import test_movq_parity as ref
    cfg = _config(size)
    enc_cfg, dec_cfg = cfg.pixel_encoder, cfg.pixel_decoder
    (_, _), (ph, pw) = token_grids(resolution, resolution, cfg)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    rng = np.random.default_rng(0)
    for part, t_cls, j_cls, prefix, c in (("movq_encoder", ref.TEncoder, movq.MoVQEncoder, "pixel_encoder.", enc_cfg),
                                          ("movq_decoder", ref.TDecoder, movq.MoVQDecoder, "pixel_decoder.", dec_cfg)):
        t_model = ref._randomize(t_cls(c)).to(device)
        ours = conv_movq.create_from_torch(j_cls, c, {prefix + k: v.cpu() for k, v in t_model.state_dict().items()},
                                           prefix)
        from flax import nnx
        graphdef, state = nnx.split(ours)
        if part == "movq_encoder":
            args = (rng.uniform(-1, 1, (batch, resolution, resolution, 3)).astype(np.float32),)
        else:
            args = (rng.standard_normal((batch, ph, pw, c.z_channels)).astype(np.float32),
                    rng.standard_normal((batch, ph, pw, c.zq_channels)).astype(np.float32))
        fwd = jax.jit(lambda st, *a: nnx.merge(graphdef, st)(*a))
        j_args = [jnp.asarray(a) for a in args]
        t_jax = _median_s(lambda: jax.block_until_ready(fwd(state, *j_args)), iters)
        t_args = [torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))).to(device) for a in args]

        def run_torch():
            with torch.no_grad():
                t_model(*t_args)
            sync()
        t_torch = _median_s(run_torch, iters)
        rows.append(dict(size=size, part=part, resolution=resolution, batch=batch,
                         jax_images_per_s=batch / t_jax, torch_images_per_s=batch / t_torch))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny")
    ap.add_argument("--resolutions", default="", help="comma-separated; default 64,128,256 (tiny), 256 (official)")
    ap.add_argument("--batch", type=int, default=0, help="default 16 (tiny), 1 (official)")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--parts", default="dualvitok,qwen2_vit,movq")
    ap.add_argument("--out", default="")
    ap.add_argument("--attention", default="", help="ViT attention kernel (xla | cpu | cudnn); default: the config's")
    args = ap.parse_args()
    import jax
    import torch
    backend = jax.default_backend()
    device = "cuda" if backend == "gpu" and torch.cuda.is_available() else "cpu"
    parts = args.parts.split(",")
    rows = []
    for size in args.sizes.split(","):
        default_res = "64,128,256" if size == "tiny" else "256"
        batch = args.batch or (16 if size == "tiny" else 1)
        for res in map(int, (args.resolutions or default_res).split(",")):
            start = len(rows)
            if "dualvitok" in parts:
                rows += bench_dualvitok(size, res, batch, args.iters, args.attention)
            if "qwen2_vit" in parts:
                rows.append(bench_qwen2_vit(size, res, batch, args.iters, device, args.attention))
            if "movq" in parts:
                rows += bench_movq(size, res, batch, args.iters, device)
            for r in rows[start:]:
                print(json.dumps(r), flush=True)
    print(f"\n{'size':8} {'part':17} {'res':>5} {'batch':>5} {'jax img/s':>10} {'torch img/s':>12} {'jax/torch':>9}")
    for r in rows:
        j, t = r["jax_images_per_s"], r.get("torch_images_per_s")
        torch_col, ratio = (f"{t:.2f}", f"{j / t:.2f}x") if t else ("-", "-")
        print(f"{r['size']:8} {r['part']:17} {r['resolution']:>5} {r['batch']:>5} {j:>10.2f} {torch_col:>12} {ratio:>9}")
    out = args.out or os.path.join(ROOT, "bench", "results", f"tokenizer_{backend}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    meta = dict(backend=backend, devices=[str(d) for d in jax.devices()], torch_device=device,
                torch_threads=torch.get_num_threads(), jax_version=jax.__version__, torch_version=torch.__version__)
    with open(out, "w") as f:
        json.dump(dict(meta=meta, attention=args.attention or "config's", rows=rows), f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
