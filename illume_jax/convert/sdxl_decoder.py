"""The released ILLUME+ SDXL decoder folder (diffusers layout, spec §2 / §6.4) <-> our `DiffusionDecoder`.

Folder: `model_index.json`, `unet/` (UNet2DConditionModel, SDXL layout; conv_in takes 4 latent +
64 code-map channels), `vae/` (AutoencoderKL), `scheduler/scheduler_config.json`. No text
encoders: the decoder feeds zero text / pooled embeddings (`models/diffusion_decoder.py`).

Our parameters are the flat '/'-joined paths of `nnx.state(DiffusionDecoder(cfg), nnx.Param)`:
`unet/<UNet path>` and `vae/<AutoencoderKL path>`. Names and layouts stay the data of the two
existing converters (`convert/unet._TABLE`, `convert/vae._TABLE` / `_INVERSE_TABLE`); this module
only routes the two state dicts through them under those prefixes, derives the `config.model`
block from the two diffusers configs (code_channels = UNet in_channels - VAE latent_channels,
pooled_dim = projection_class_embeddings_input_dim - 6 * addition_time_embed_dim), and reads /
writes the folder (weight files are read and written by `convert/files.py`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Mapping

import ml_collections as mlc
import numpy as np
from flax import nnx

from illume_jax.convert import unet as conv_unet
from illume_jax.convert import vae as conv_vae
from illume_jax.convert.movq import _one_device_mesh, check_fit
from illume_jax.models.diffusion_decoder import OFFICIAL_RESOLUTIONS, DecoderConfig, DiffusionDecoder
from illume_jax.models.unet import UNetConfig
from illume_jax.models.vae import VAEConfig

_CONFIG_FILES = {"unet": "unet/config.json", "vae": "vae/config.json", "scheduler": "scheduler/scheduler_config.json"}
_WEIGHTS = "diffusion_pytorch_model"
_CONTEXT_LEN = 77  # zero text embeddings [B, 77, cross_attention_dim] (spec §2)
# Our own (non-diffusers) config fields, carried over when checking a diffusers config against `cfg`.
_OWN_UNET, _OWN_VAE = ("dtype", "param_dtype", "attention", "remat"), ("dtype", "param_dtype", "remat")


def read_folder_configs(folder: str) -> dict:
    """{'unet', 'vae', 'scheduler'}: the folder's three diffusers JSON configs as dicts."""
    out = {}
    for name, rel in _CONFIG_FILES.items():
        path = os.path.join(folder, rel)
        if not os.path.isfile(path):
            raise ValueError(f"SDXL decoder folder {folder!r}: missing {rel} (the {name} config)")
        with open(path) as f:
            out[name] = json.load(f)
    return out


def model_config_from_diffusers(unet_cfg: dict, vae_cfg: dict) -> mlc.ConfigDict:
    """The `config.model` block (`DecoderConfig.from_config`) of an ILLUME+ decoder with these
    diffusers UNet / VAE configs; a ValueError names any field whose layout we cannot represent."""
    unet = {k: v for k, v in unet_cfg.items() if not k.startswith("_")}
    vae = {k: v for k, v in vae_cfg.items() if not k.startswith("_")}
    u, v = UNetConfig.from_diffusers(unet), VAEConfig.from_diffusers(vae)  # name unsupported fields
    latent = v.latent_channels
    if u.addition_embed_type != "text_time":
        raise ValueError(f"diffusers UNet config: addition_embed_type={u.addition_embed_type!r}; the ILLUME+ "
                         "decoder is an SDXL UNet ('text_time': zero pooled embeddings + time ids)")
    if u.in_channels <= latent:
        raise ValueError(f"diffusers UNet config: in_channels={u.in_channels} leaves no code-map channels "
                         f"beyond the VAE's latent_channels={latent}")
    if u.out_channels != latent:
        raise ValueError(f"diffusers UNet config: out_channels={u.out_channels}, expected the VAE's "
                         f"latent_channels={latent}")
    if len(set(u.cross_dims)) != 1:
        raise ValueError(f"diffusers UNet config: cross_attention_dim={u.cross_attention_dim!r} differs per level "
                         "(one zero text context cannot feed them)")
    pooled = u.projection_class_embeddings_input_dim - 6 * u.addition_time_embed_dim
    if pooled <= 0:
        raise ValueError(f"diffusers UNet config: projection_class_embeddings_input_dim="
                         f"{u.projection_class_embeddings_input_dim} leaves no pooled width after 6 time ids x "
                         f"addition_time_embed_dim={u.addition_time_embed_dim}")
    return mlc.ConfigDict(dict(
        kind="diffusion_decoder", conditioning="illume_plus", unet=unet, vae=vae, code_channels=u.in_channels - latent,
        context_len=_CONTEXT_LEN, pooled_dim=pooled, scale=2, resolution_group=OFFICIAL_RESOLUTIONS))


@functools.lru_cache(maxsize=4)
def _expected(cfg: DecoderConfig) -> dict[str, dict]:
    """{'unet': {path: shape}, 'vae': {...}}: our parameters (abstract, nothing allocated), by submodule."""
    from illume_jax.sharding import use_mesh
    with use_mesh(_one_device_mesh()):
        model = nnx.eval_shape(lambda: DiffusionDecoder(cfg, rngs=nnx.Rngs(0)))
    out: dict[str, dict] = {"unet": {}, "vae": {}}
    for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if p[0] not in out:
            raise ValueError(f"DiffusionDecoder parameter {'/'.join(map(str, p))} is outside unet/ and vae/")
        out[p[0]][tuple(p[1:])] = tuple(var.get_value().shape)
    return out


def _key(sub: str, path) -> str:
    return "/".join([sub, *(str(p) for p in path)])


def from_diffusers(unet_sd: Mapping[str, Any], vae_sd: Mapping[str, Any], cfg: DecoderConfig) -> dict[str, np.ndarray]:
    """diffusers UNet / VAE state dicts (torch tensors or numpy; read one key at a time) -> the flat
    {'unet/...' | 'vae/...': array} parameters of `DiffusionDecoder(cfg)`. Every tensor must find a
    parameter and every parameter a tensor of the right shape; errors name the diffusers keys."""
    exp = _expected(cfg)
    flat = {_key("unet", p): w for p, w in conv_unet.params_from_torch(unet_sd, exp["unet"]).items()}
    flat.update({_key("vae", p): w for p, w in conv_vae.params_from_torch(vae_sd, exp["vae"]).items()})
    return flat


def to_diffusers(flat: Mapping[str, np.ndarray], cfg: DecoderConfig) -> tuple[dict, dict]:
    """Inverse of `from_diffusers`: (UNet state dict, VAE state dict), numpy, diffusers names/layouts."""
    exp = _expected(cfg)
    unet_sd, vae_sd = {}, {}
    missing, mismatched = [], []
    for sub, sd in (("unet", unet_sd), ("vae", vae_sd)):
        for path, shape in exp[sub].items():
            key = _key(sub, path)
            if key not in flat:
                missing.append(key)
                continue
            w = np.asarray(flat[key])
            if tuple(w.shape) != shape:
                mismatched.append(f"{key}: expected {shape}, found {tuple(w.shape)}")
                continue
            if sub == "unet":
                sd[conv_unet._torch_key(path)] = np.ascontiguousarray(conv_unet._to_torch(w, path))
            else:
                name, layout = conv_vae.torch_key(path)
                sd[name] = np.ascontiguousarray(conv_vae._INVERSE[layout](w))
    known = {_key(s, p) for s in exp for p in exp[s]}
    check_fit("DiffusionDecoder", "", missing, [k for k in flat if k not in known], mismatched)
    return unet_sd, vae_sd


def _check_matches(name: str, ours, theirs) -> None:
    if ours != theirs:
        diff = [f.name for f in dataclasses.fields(ours) if getattr(ours, f.name) != getattr(theirs, f.name)]
        raise ValueError(f"write_folder: the {name} config does not describe the decoder's {name} (differs in {diff})")


def write_folder(folder: str, flat: Mapping[str, np.ndarray], cfg: DecoderConfig, unet_cfg: dict, vae_cfg: dict,
                 scheduler_cfg: dict) -> None:
    """Writes a diffusers folder (model_index.json, unet/, vae/, scheduler/) that diffusers'
    `from_pretrained(folder, subfolder=...)` loads; the configs must describe `cfg`'s UNet / VAE."""
    from illume_jax.convert import files as files_lib
    try:
        import diffusers
        version = diffusers.__version__
    except ImportError:  # diffusers is only needed to *load* the folder
        version = "0.35.0"
    own = lambda c, keys: {k: getattr(c, k) for k in keys}  # noqa: E731
    _check_matches("unet", UNetConfig.from_diffusers(unet_cfg, **own(cfg.unet, _OWN_UNET)), cfg.unet)
    _check_matches("vae", VAEConfig.from_diffusers(vae_cfg, **own(cfg.vae, _OWN_VAE)), cfg.vae)
    unet_sd, vae_sd = to_diffusers(flat, cfg)
    sched_class = scheduler_cfg.get("_class_name", "EulerDiscreteScheduler")
    files = {
        "model_index.json": {"_class_name": "StableDiffusionXLDecoderPipeline", "_diffusers_version": version,
                             "scheduler": ["diffusers", sched_class], "unet": ["diffusers", "UNet2DConditionModel"],
                             "vae": ["diffusers", "AutoencoderKL"]},
        "unet/config.json": {"_class_name": "UNet2DConditionModel", "_diffusers_version": version, **unet_cfg},
        "vae/config.json": {"_class_name": "AutoencoderKL", "_diffusers_version": version, **vae_cfg},
        "scheduler/scheduler_config.json": {"_class_name": sched_class, "_diffusers_version": version,
                                            **scheduler_cfg},
    }
    for rel, content in files.items():
        os.makedirs(os.path.dirname(os.path.join(folder, rel)) or folder, exist_ok=True)
        with open(os.path.join(folder, rel), "w") as f:
            json.dump(content, f, indent=2, sort_keys=True)
    for sub, sd in (("unet", unet_sd), ("vae", vae_sd)):
        files_lib.write_safetensors(os.path.join(folder, sub), sd, name=_WEIGHTS)
