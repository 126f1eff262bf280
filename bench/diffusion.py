"""Diffusion-decoder sampling throughput: our jitted sampler vs diffusers' PyTorch loop, same weights.

  python bench/diffusion.py                                   # tiny decoder, steps 20/50, batch 1/4 (CPU, minutes)
  python bench/diffusion.py --size sdxl --steps 2 --batch 1   # SDXL shapes (needs ~40 GB host RAM; GPU/TPU)

For each (steps, batch): images/s of the whole decode from a code map — the sampling loop with
CFG as 2x rows (guidance 1.5) and the final VAE decode.
  - jax:   `infer.diffusion.sample` (Euler, one jit, `lax.fori_loop`) + the VAE decode in one jitted call;
  - torch: the loop of diffusers' SDXL pipelines (as ILLUME+'s `StableDiffusionXLDecoderPipeline` runs
           it): scale_model_input, one UNet call on [uncond; cond], CFG, `EulerDiscreteScheduler.step`,
           then `AutoencoderKL.decode`, under `torch.inference_mode()`.
Both run the same random-init diffusers UNet2DConditionModel / AutoencoderKL (ours converted by our
converter) with the ILLUME+ conditioning (code map nearest-upsampled and concatenated, zero text).
Warm-up (compile) calls are excluded and reported apart; figures are medians over --iters calls.
Writes bench/results/diffusion_<backend>_<size>.json.
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


def _median_s(fn, iters: int) -> tuple[float, float]:
    t = time.perf_counter()
    fn()  # compile / warm-up
    first = time.perf_counter() - t
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), first


def _model_config(size: str):
    """(our DecoderConfig, the config's diffusers-style unet and vae dicts)."""
    from configs import diffusion_decoder as decoder_config
    from illume_jax.models.diffusion_decoder import DecoderConfig
    c = decoder_config.get_config("size=tiny" if size == "tiny" else "size=official")
    return DecoderConfig.from_config(c.model), c.model.unet.to_dict(), c.model.vae.to_dict()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="tiny", choices=("tiny", "sdxl"))
    ap.add_argument("--steps", default="20,50")
    ap.add_argument("--batch", default="1,4")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--guidance", type=float, default=1.5)
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import torch
    from diffusers import AutoencoderKL as TorchVAE
    from diffusers import UNet2DConditionModel
    from flax import nnx

    from configs.diffusion_decoder import SDXL_SCHEDULER
    from illume_jax import sharding
    from illume_jax.convert import unet as conv_unet
    from illume_jax.convert import vae as conv_vae
    from illume_jax.infer import diffusion
    from illume_jax.models import diffusion_decoder as dd

    torch.manual_seed(0)
    cfg, unet_dict, vae_dict = _model_config(args.size)
    out_res = 128 if args.size == "tiny" else 1024
    code_res = out_res // 2 // (4 if args.size == "tiny" else 16)  # tiny: 64^2 tokens /4; official /16
    t_unet = UNet2DConditionModel(**_diffusers_kwargs(UNet2DConditionModel, unet_dict)).eval()
    t_vae = TorchVAE(**_diffusers_kwargs(TorchVAE, vae_dict)).eval()
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    with sharding.use_mesh(mesh):
        model = nnx.eval_shape(lambda: dd.DiffusionDecoder(cfg, rngs=nnx.Rngs(0)))
    conv_unet.load_diffusers_state(model.unet, t_unet.state_dict(), mesh=mesh)
    conv_vae.load_diffusers_state(model.vae, t_vae.state_dict(), mesh=mesh)
    graphdef, params = nnx.split(model)

    sched_cfg = diffusion.SchedulerConfig.from_diffusers(dict(SDXL_SCHEDULER))
    rows = []
    rng = np.random.default_rng(0)
    for steps in [int(s) for s in args.steps.split(",")]:
        schedule = diffusion.make_schedule(sched_cfg, steps)
        for batch in [int(b) for b in args.batch.split(",")]:
            code = rng.standard_normal((batch, code_res, code_res, cfg.code_channels)).astype(np.float32)
            latent_shape = cfg.latent_shape(batch, (out_res, out_res))
            noise = rng.standard_normal(latent_shape).astype(np.float32)

            def run(params, code, noise, schedule=schedule):
                m = nnx.merge(graphdef, params)
                cond = m.condition(code, (out_res, out_res))
                lat = diffusion.sample(m.denoise, noise, schedule, sched_cfg,
                                       guidance_scale=args.guidance, cond=cond, uncond=m.null_condition(cond))
                return m.vae.images_from_latents(lat)

            jitted = jax.jit(run)
            code_j, noise_j = jnp.asarray(code), jnp.asarray(noise)
            with sharding.use_mesh(mesh):
                t_jax, first = _median_s(lambda: jax.block_until_ready(jitted(params, code_j, noise_j)), args.iters)
            row = dict(size=args.size, steps=steps, batch=batch, out=out_res, guidance=args.guidance,
                       jax_images_per_s=batch / t_jax, jax_s=t_jax, jax_compile_s=first - t_jax)
            if not args.no_torch:
                t_torch, _ = _median_s(lambda: _torch_decode(t_unet, t_vae, cfg, code, noise, steps, args.guidance),
                                       max(1, args.iters - 1))
                row.update(torch_images_per_s=batch / t_torch, torch_s=t_torch, speedup=t_torch / t_jax)
            print(json.dumps(row), flush=True)
            rows.append(row)
    os.makedirs(os.path.join(ROOT, "bench", "results"), exist_ok=True)
    path = os.path.join(ROOT, "bench", "results", f"diffusion_{jax.default_backend()}_{args.size}.json")
    with open(path, "w") as f:
        json.dump(dict(device=str(jax.devices()[0]), torch_threads=torch.get_num_threads(), rows=rows), f, indent=1)
    print("wrote", path)


def _diffusers_kwargs(cls, config: dict) -> dict:
    """A diffusers-style config dict -> the constructor arguments `cls` accepts."""
    import inspect
    accepted = set(inspect.signature(cls.__init__).parameters)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items() if k in accepted}


def _torch_decode(unet, vae, cfg, code: np.ndarray, noise: np.ndarray, steps: int, guidance: float):
    """diffusers' SDXL pipeline loop with ILLUME+'s conditioning (zero text, code map concatenated)."""
    import torch
    import torch.nn.functional as F
    from diffusers import EulerDiscreteScheduler

    from configs.diffusion_decoder import SDXL_SCHEDULER
    sched = EulerDiscreteScheduler.from_config({k: v for k, v in SDXL_SCHEDULER.items() if k != "_class_name"})
    sched.set_timesteps(steps)
    with torch.inference_mode():
        B = code.shape[0]
        lat = torch.from_numpy(noise).permute(0, 3, 1, 2) * sched.init_noise_sigma
        code_t = torch.from_numpy(code).permute(0, 3, 1, 2)
        code_t = F.interpolate(code_t, size=lat.shape[-2:])
        cond = torch.cat([torch.zeros_like(code_t), code_t])
        ctx = torch.zeros(2 * B, cfg.context_len, cfg.unet.cross_attention_dim)
        added = {"text_embeds": torch.zeros(2 * B, cfg.pooled_dim),
                 "time_ids": torch.zeros(2 * B, 6)}
        for t in sched.timesteps:
            x = sched.scale_model_input(torch.cat([lat, lat]), t)
            out = unet(torch.cat([x, cond], 1), t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
            u, c = out.chunk(2)
            lat = sched.step(u + guidance * (c - u), t, lat).prev_sample
        return vae.decode(lat / vae.config.scaling_factor).sample


if __name__ == "__main__":
    main()
