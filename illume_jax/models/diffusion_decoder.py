"""Diffusion decoders: tokenizer codes -> high-resolution images (a VAE + a conditioned UNet).

Two conditioning schemes, one module:

'illume_plus' (the released SDXL decoder, spec §2): the tokenizer's merged code map (semantic
  vectors bicubic-upsampled to the pixel grid ++ pixel vectors; 64 channels at official size)
  is nearest-resized to the latent grid and concatenated to the noisy latent (4 + 64 = 68 UNet
  input channels). The text path of SDXL is neutralised: zero `encoder_hidden_states`
  [B, 77, 2048] and zero pooled embeddings [B, 1280]; `time_ids = [0,0,0,0,0, i]` where i is the
  index of the OUTPUT size (width, height) in the official resolution list. The decoder always
  super-resolves 2x (512^2 tokens -> 1024^2 images). CFG's unconditional branch is an all-zero code
  map with the same time ids.

'illume' (ILLUME's SD decoder; no public code, so this is our reading of the paper): the semantic
  VQ's codes are turned back into ViT-like features by the tokenizer's feature decoder
  (`SemanticVQ.reconstruct_features`, [B, h*w, D]) and injected where SD injects text: as the
  cross-attention context of every transformer block (`cross_attention_dim = D`). The paper
  describes the decoder as reconstructing images from the semantic features; cross-attention keeps
  the SD layout (and so SD weights) unchanged, while concatenation would need a spatial map the
  semantic features only coarsely give. The unconditional branch (CFG, condition dropout) is an
  all-zero context.

Both take model-space latents (VAE latents scaled as diffusers pipelines do, see
`models/vae.py`) and are sampled by `infer/diffusion.py`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from illume_jax.models.unet import UNet, UNetConfig
from illume_jax.models.vae import AutoencoderKL, VAEConfig
from illume_jax.modules.resample import resize_nearest

KINDS = ("illume_plus", "illume")

# (width, height) of the output sizes the released SDXL decoder was trained on; the time-id
# index is the position in this list (the official code looks up the string "(w, h)").
OFFICIAL_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (1024, 1024), (768, 1024), (1024, 768), (512, 2048), (2048, 512), (640, 1920), (1920, 640),
    (768, 1536), (1536, 768), (768, 1152), (1152, 768), (512, 512))


def resolution_index(width: int, height: int, group: tuple[tuple[int, int], ...] = OFFICIAL_RESOLUTIONS) -> int:
    """Index of the output size (width, height) in `group`; a clear error for any other size."""
    try:
        return [tuple(g) for g in group].index((int(width), int(height)))
    except ValueError:
        sizes = ", ".join(f"{w}x{h}" for w, h in group)
        raise ValueError(f"output size {width}x{height} (width x height) is not one the decoder supports: "
                         f"{sizes}") from None


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    kind: str                      # 'illume_plus' | 'illume'
    unet: UNetConfig
    vae: VAEConfig
    code_channels: int = 64        # illume_plus: channels of the merged code map
    context_len: int = 77          # illume_plus: length of the zero text embeddings
    pooled_dim: int = 1280         # illume_plus: width of the zero pooled text embedding
    scale: int = 2                 # output resolution / token-image resolution
    resolution_group: tuple[tuple[int, int], ...] = OFFICIAL_RESOLUTIONS

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"decoder kind={self.kind!r}: expected one of {KINDS}")
        latent = self.vae.latent_channels
        if self.kind == "illume_plus":
            if self.unet.in_channels != latent + self.code_channels:
                raise ValueError(f"illume_plus decoder: unet.in_channels={self.unet.in_channels}, expected latent "
                                 f"channels + code channels = {latent} + {self.code_channels}")
            if self.unet.addition_embed_type == "text_time" and \
                    self.unet.projection_class_embeddings_input_dim != 6 * self.unet.addition_time_embed_dim \
                    + self.pooled_dim:
                raise ValueError("illume_plus decoder: unet.projection_class_embeddings_input_dim must be "
                                 f"6 * addition_time_embed_dim + pooled_dim = "
                                 f"{6 * self.unet.addition_time_embed_dim + self.pooled_dim}")
        elif self.unet.in_channels != latent:
            raise ValueError(f"illume decoder: unet.in_channels={self.unet.in_channels}, expected the "
                             f"{latent} latent channels")

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.vae.block_out_channels) - 1)

    def latent_shape(self, batch: int, out_hw: tuple[int, int]) -> tuple[int, int, int, int]:
        f = self.latent_factor
        if out_hw[0] % f or out_hw[1] % f:
            raise ValueError(f"output size {out_hw}: must be a multiple of the VAE factor {f}")
        return (batch, out_hw[0] // f, out_hw[1] // f, self.vae.latent_channels)

    @classmethod
    def from_config(cls, c: Any) -> "DecoderConfig":
        """From an ml_collections `model` block: unet/vae hold diffusers-style config dicts."""
        group = tuple(tuple(int(v) for v in g) for g in c.get("resolution_group", OFFICIAL_RESOLUTIONS))
        return cls(kind=c.conditioning, unet=UNetConfig.from_diffusers(dict(c.unet)), vae=VAEConfig.from_diffusers(dict(c.vae)),
                   code_channels=int(c.get("code_channels", 64)), context_len=int(c.get("context_len", 77)),
                   pooled_dim=int(c.get("pooled_dim", 1280)), scale=int(c.get("scale", 2)), resolution_group=group)


class DiffusionDecoder(nnx.Module):
    """A VAE and a UNet with the conditioning of `cfg.kind`. `denoise(x_t, t, cond)` is the
    function the samplers and the trainer call; `cond` is a dict of arrays (see `condition`)."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.unet = UNet(cfg.unet, rngs=rngs)
        self.vae = AutoencoderKL(cfg.vae, rngs=rngs)

    # -- conditions ------------------------------------------------------------------------------
    def time_ids(self, batch: int, width: int, height: int) -> jax.Array:
        idx = resolution_index(width, height, self.cfg.resolution_group)
        return jnp.tile(jnp.asarray([[0, 0, 0, 0, 0, idx]], jnp.float32), (batch, 1))

    def condition(self, features: jax.Array, out_hw: tuple[int, int]) -> dict:
        """The condition dict for a batch: `features` is the code map [B,h,w,C] (illume_plus) or
        the reconstructed semantic features [B,L,D] (illume); out_hw the output image size."""
        cfg = self.cfg
        if cfg.kind == "illume_plus":
            if features.ndim != 4 or features.shape[-1] != cfg.code_channels:
                raise ValueError(f"code map: expected [B, h, w, {cfg.code_channels}], got {features.shape}")
            return {"code_map": features, "time_ids": self.time_ids(features.shape[0], out_hw[1], out_hw[0])}
        if features.ndim != 3 or features.shape[-1] != cfg.unet.cross_attention_dim:
            raise ValueError(f"semantic features: expected [B, L, {cfg.unet.cross_attention_dim}], got "
                             f"{features.shape}")
        return {"context": features}

    @staticmethod
    def null_condition(cond: dict) -> dict:
        """The unconditional branch: zero code map / zero context; time ids kept (spec §2)."""
        return {k: (v if k == "time_ids" else jnp.zeros_like(v)) for k, v in cond.items()}

    # -- the denoiser ----------------------------------------------------------------------------
    def denoise(self, x_t: jax.Array, t: jax.Array, cond: dict) -> jax.Array:
        """UNet prediction (epsilon / v / sample, as trained) for noisy latents x_t [B,h,w,4]."""
        cfg = self.cfg
        B = x_t.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t), (B,))
        if cfg.kind == "illume_plus":
            code = resize_nearest(cond["code_map"].astype(x_t.dtype), x_t.shape[1:3])
            sample = jnp.concatenate([x_t, code], axis=-1)
            dt = x_t.dtype
            context = jnp.zeros((B, cfg.context_len, cfg.unet.cross_attention_dim), dt)
            text_embeds = jnp.zeros((B, cfg.pooled_dim), dt) if cfg.unet.addition_embed_type else None
            time_ids = cond["time_ids"] if cfg.unet.addition_embed_type else None
            return self.unet(sample, t, context, text_embeds=text_embeds, time_ids=time_ids)
        return self.unet(x_t, t, cond["context"].astype(x_t.dtype))


def create(cfg: DecoderConfig, mesh: jax.sharding.Mesh | None = None, seed: int = 0) -> DiffusionDecoder:
    from illume_jax.sharding import make_mesh, use_mesh
    if mesh is None:
        mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    with use_mesh(mesh):
        return nnx.jit(lambda: DiffusionDecoder(cfg, rngs=nnx.Rngs(seed)))()
