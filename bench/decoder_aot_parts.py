"""Where the TPU compile time of the SDXL-size decoder step goes: compiles its parts separately.

  python bench/decoder_aot_parts.py                                   # all parts, SDXL depths, 512² outputs
  python bench/decoder_aot_parts.py --parts vae_encode,unet_forward --depths 1,1,1 --topology v5p:2x2x1

`aot --config=configs/diffusion_decoder.py:size=official` compiles the whole UNet train step
(VAE encode of the 2x target + UNet forward and backward + Adam + EMA) and did not finish on a
24 GiB, 2-core host. This script lowers and compiles, for a TPU topology (libtpu, no TPU needed),
each part on its own with the official shapes (random-init abstract weights, replicated; batch
sharded over all chips):
  - vae_encode:   the SDXL VAE encoder on the 2x-resolution targets (stop-gradient in the step);
  - unet_forward: the ILLUME+ UNet prediction (68 input channels, zero text context, time ids);
  - unet_grad:    value and gradient of an MSE through the UNet w.r.t. its parameters.
`--depths` replaces SDXL's transformer depths per level (1,2,10) to separate the transformer
blocks' share from the convolutions'. Prints lowering / compile seconds, the number of
convolutions in the lowered program and XLA's temporary memory per chip.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PARTS = ("vae_encode", "unet_forward", "unet_grad")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {PARTS}")
    ap.add_argument("--depths", default="1,2,10", help="transformer layers per UNet level (SDXL: 1,2,10)")
    ap.add_argument("--resolution", type=int, default=512, help="output (2x) image side")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--topology", default="v5p:2x2x1")
    args = ap.parse_args(argv)
    parts = args.parts.split(",")
    for p in parts:
        if p not in PARTS:
            raise SystemExit(f"--parts: {p!r} is not one of {PARTS}")

    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from configs import diffusion_decoder as decoder_config
    from illume_jax import aot, sharding
    from illume_jax.models import diffusion_decoder as dd

    config = decoder_config.get_config("size=official")
    config.model.unet.transformer_layers_per_block = tuple(int(d) for d in args.depths.split(","))
    cfg = dd.DecoderConfig.from_config(config.model)
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices=aot.topology_devices(args.topology))
    with sharding.use_mesh(mesh):
        graphdef, params = nnx.split(nnx.eval_shape(lambda: dd.DiffusionDecoder(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    replicated = NamedSharding(mesh, P())
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), params)

    def batch_struct(shape, dtype=jnp.float32):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P("data", *([None] * (len(shape) - 1)))))

    res, B = args.resolution, args.batch
    latent = cfg.latent_shape(B, (res, res))
    images = batch_struct((B, res, res, 3))
    x_t, t = batch_struct(latent), batch_struct((B,), jnp.int32)
    code_map = batch_struct((B, latent[1] // 2, latent[2] // 2, cfg.code_channels))

    def vae_encode(p, x):
        return nnx.merge(graphdef, p).vae.encode(x)[0]

    def unet_forward(p, x, t, code):
        m = nnx.merge(graphdef, p)
        return m.denoise(x, t, m.condition(code, (res, res)))

    def unet_grad(p, x, t, code):
        def loss(unet_params):
            return jnp.mean(unet_forward(dict(p, unet=unet_params), x, t, code) ** 2)
        return jax.value_and_grad(loss)(p["unet"])

    calls = dict(vae_encode=(vae_encode, (params, images)), unet_forward=(unet_forward, (params, x_t, t, code_map)),
                 unet_grad=(unet_grad, (params, x_t, t, code_map)))
    print(f"{args.topology}: batch {B} x {res}^2 outputs, latents {latent}, transformer depths {args.depths}, "
          f"{len(jax.tree.leaves(params))} parameter arrays", flush=True)
    for name in parts:
        fn, fn_args = calls[name]
        t0 = time.time()
        lowered = jax.jit(fn).lower(*fn_args)
        t1 = time.time()
        convs = lowered.as_text().count("stablehlo.convolution")
        print(f"{name}: lowered in {t1 - t0:.1f} s ({convs} convolutions)", flush=True)
        compiled = lowered.compile()
        temp = compiled.memory_analysis().temp_size_in_bytes / 2 ** 30
        print(f"{name}: compiled in {time.time() - t1:.1f} s, temporaries {temp:.2f} GiB per chip", flush=True)


if __name__ == "__main__":
    main()
