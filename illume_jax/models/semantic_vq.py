"""The ILLUME (v1) semantic VQ tokenizer: quantised ViT features, 256 tokens per image.

The paper (arXiv 2412.06673) quantises the features of a semantic vision encoder (its UNIT
encoder, not public) with a 16,384-entry codebook and trains the tokenizer with a
*feature-reconstruction* loss; images are rebuilt only by its Stable-Diffusion decoder. Here:

  images → CLIP-style ViT (frozen; config names width/depth/patch) → patch tokens [B,h*w,D]
         → LayerNorm (no affine) = target → optional down-projection to z → VQ (plain codebook,
           optional l2-normalised codes and EMA updates) → codes [B,h,w]
  training: feature decoder (up-projection → ViT blocks with raster 2D RoPE → Linear + LayerNorm)
  rebuilds `target` (cosine or MSE), plus commitment.
  tiny world only: a small MoVQ-style pixel head turns the quantised map into pixels so images
  can be looked at (and the ShapeComp tokenizer ceiling measured) without a diffusion decoder.
  By default its gradient stops at the codes (`pixel_head_grad=False`), so the codes stay purely
  semantic as in the paper; the head only learns to read them.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from illume_jax.models import movq, vit
from illume_jax.models.dualvitok import (CLIP_MEAN, CLIP_STD, FeatureDecoder, TokenizerOutput, block_attention,
                                         cosine_loss, layer_norm_no_affine)
from illume_jax.modules import quantizers, resample
from illume_jax.modules.linear import Dense


@dataclasses.dataclass(frozen=True)
class SemanticVQConfig:
    vit: vit.ClipViTConfig
    image_size: int = 256             # the ViT's input resolution (paper: 256 tokens per image)
    z_channels: int = 0               # down-projection before the VQ; 0 = quantise the ViT width itself
    num_codes: int = 16384
    l2_normalize: bool = True
    ema_decay: float = 0.0            # > 0: EMA codebook updates instead of a codebook loss
    commitment_beta: float = 0.25
    decoder_dim: int = 1024
    decoder_blocks: int = 4
    decoder_heads: int = 16
    decoder_mlp_dim: int = 4096
    feature_loss: str = "cosine"      # 'cosine' | 'mse'
    pixel_head: movq.MoVQConfig | None = None
    pixel_head_grad: bool = False     # let the pixel head's loss shape the codes (off: codes stay semantic)
    freeze_vit: bool = True
    dtype: str = "float32"

    @property
    def grid(self) -> int:
        return self.image_size // self.vit.patch_size

    @property
    def code_dim(self) -> int:
        return self.z_channels or self.vit.hidden_size

    @classmethod
    def from_config(cls, c: Any) -> "SemanticVQConfig":
        d = dict(c)
        vit.check_known_keys(cls, d, "config.model", extra=("kind",))
        d.pop("kind", None)
        d["vit"] = vit.ClipViTConfig(**dict(d["vit"]))
        if d.get("pixel_head"):
            d["pixel_head"] = movq.MoVQConfig(**dict(d["pixel_head"]))
        else:
            d["pixel_head"] = None
        cfg = cls(**d)
        if cfg.feature_loss not in ("cosine", "mse"):
            raise ValueError(f"config.model.feature_loss={cfg.feature_loss!r}: expected 'cosine' or 'mse'")
        if cfg.image_size % cfg.vit.patch_size:
            raise ValueError(f"config.model.image_size={cfg.image_size} is not a multiple of the ViT patch "
                             f"{cfg.vit.patch_size}")
        return cfg


def clip_vit_tokens(model: vit.ClipVisionTransformer, images: jax.Array, image_size: int, *,
                    trainable_from: int = 0) -> jax.Array:
    """Images [B,H,W,3] in [-1,1] -> patch-token features [B, h*w, D] (class token dropped):
    antialiased bicubic to the ViT's input size, CLIP normalisation, ViT last hidden state.
    trainable_from: see `ClipVisionTransformer.__call__`."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images: expected [B, H, W, 3] in [-1, 1], got shape {images.shape}")
    x = (images.astype(jnp.float32) + 1.0) / 2.0
    if x.shape[1:3] != (image_size, image_size):
        x = resample.resize_bicubic(x, (image_size, image_size), antialias=True)
    x = (jnp.clip(x, 0, 1) - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)
    hidden, _ = model(x.astype(jnp.dtype(model.cfg.dtype)), trainable_from=trainable_from)
    return hidden[:, 1:]


class SemanticVQ(nnx.Module):
    def __init__(self, cfg: SemanticVQConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt = jnp.dtype(cfg.dtype)
        self.vit = vit.ClipVisionTransformer(cfg.vit, rngs=rngs)
        self.down = (Dense((cfg.vit.hidden_size,), (cfg.z_channels,), axes=("embed", None), use_bias=True, dtype=dt,
                           rngs=rngs) if cfg.z_channels else None)
        self.quantizer = quantizers.VectorQuantizer(cfg.num_codes, cfg.code_dim, l2_normalize=cfg.l2_normalize,
                                                    ema_decay=cfg.ema_decay or None, beta=cfg.commitment_beta,
                                                    rngs=rngs)
        self.decoder = FeatureDecoder(cfg.code_dim, cfg.decoder_dim, cfg.decoder_blocks, cfg.decoder_heads,
                                      cfg.decoder_mlp_dim, cfg.vit.hidden_size, dtype=cfg.dtype, remat=cfg.vit.remat,
                                      attention=block_attention(cfg.vit.attention), rngs=rngs)
        if cfg.pixel_head is not None:
            self.pixel_in = Dense((cfg.code_dim,), (cfg.pixel_head.z_channels,), axes=(None, None), use_bias=True,
                                  dtype=dt, rngs=rngs)
            self.pixel_head = movq.MoVQDecoder(cfg.pixel_head, rngs=rngs)
        else:
            self.pixel_in = self.pixel_head = None

    @property
    def codebook_sizes(self) -> dict[str, int]:
        return {"semantic": self.cfg.num_codes}

    @property
    def quantizers(self) -> dict:
        return {"semantic": self.quantizer}

    def features(self, images: jax.Array) -> jax.Array:
        """Patch-token features [B, h*w, D] of images [B,H,W,3] in [-1,1] (class token dropped)."""
        return clip_vit_tokens(self.vit, images, self.cfg.image_size)

    def quantize(self, images: jax.Array):
        feats = self.features(images)
        if self.cfg.freeze_vit:
            feats = jax.lax.stop_gradient(feats)
        target = layer_norm_no_affine(feats)
        z = self.down(target) if self.down is not None else target
        g = self.cfg.grid
        z = z.reshape(z.shape[0], g, g, -1)
        return z, self.quantizer(z), target

    def encode(self, images: jax.Array) -> jax.Array:
        """images -> codes [B, h, w] int32."""
        _, (_, codes, _), _ = self.quantize(images)
        return codes

    def decode_pixels(self, zq: jax.Array, size: tuple[int, int]) -> jax.Array:
        if self.pixel_head is None:
            raise ValueError("this semantic VQ has no pixel head (config.model.pixel_head); decode images with "
                             "the diffusion decoder")
        if not self.cfg.pixel_head_grad:
            zq = jax.lax.stop_gradient(zq)
        out = self.pixel_head(self.pixel_in(zq), zq)
        if out.shape[1:3] != tuple(size):
            out = resample.resize_bicubic(out.astype(jnp.float32), size, antialias=True).astype(out.dtype)
        return out

    def decode(self, codes: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
        s = self.cfg.image_size
        return self.decode_pixels(self.quantizer.lookup(codes), size or (s, s))

    def reconstruct_unquantized(self, images: jax.Array) -> jax.Array:
        """images -> the pixel head's images from the un-quantised features (normalised as the
        quantiser sees them): the limit of the features and the head, without the codebook."""
        z, _, _ = self.quantize(images)
        return self.decode_pixels(self.quantizer.prepare(z), images.shape[1:3])

    def reconstruct_features(self, codes: jax.Array) -> jax.Array:
        """Codes -> rebuilt (normalised) ViT features [B, h*w, D]: the diffusion decoder's condition."""
        return self.decoder(self.quantizer.lookup(codes))

    def __call__(self, images: jax.Array, *, train: bool = False, rng: jax.Array | None = None) -> TokenizerOutput:
        del rng
        z, (zq, codes, q_losses), target = self.quantize(images)
        rebuilt = self.decoder(zq)
        if self.cfg.feature_loss == "cosine":
            feat = cosine_loss(rebuilt, target)
        else:
            feat = jnp.mean((rebuilt.astype(jnp.float32) - target.astype(jnp.float32)) ** 2)
        losses = {"commit": q_losses["loss"], "feature": feat}
        recon = self.decode_pixels(zq, images.shape[1:3]) if self.pixel_head is not None else None
        if train and self.cfg.ema_decay:
            self.quantizer.update_ema(jax.lax.stop_gradient(z), codes)
        return TokenizerOutput(recon=recon, losses=losses, codes={"semantic": codes}, latents={"semantic": z})

    def semantic_vit(self):
        return self.vit
