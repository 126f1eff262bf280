"""DualViTok, the ILLUME+ vision tokenizer (spec §1): a semantic level and a pixel level.

  images [B,H,W,3] in [-1,1]
   ├─ scaling layer (torch-exact antialiased bicubic to the semantic size, CLIP normalisation)
   │   → Qwen2-VL ViT (frozen) → merger features [B,h1*w1,3584] → LayerNorm (no affine) = target
   │   → proj_in → 4 ViT blocks (raster 2D RoPE) → proj_out → SimVQ 32,768  → semantic codes [B,h1,w1]
   └─ MoVQ encoder (/16) → pixel_quant_conv → SimVQ 98,304                  → pixel codes [B,h2,w2]
  decode: semantic vectors bicubic-upsampled (torch a=-0.75, no antialias) to (h2,w2), concatenated
  with the pixel vectors (64 ch) → pixel_post_quant_conv → MoVQ decoder whose every norm is
  modulated by the same 64-ch map → image.
  training only: semantic decoder (proj_in → 4 blocks → Linear + LayerNorm) rebuilds `target`.

All arrays are channels-last; attribute names follow the official state-dict keys (spec §6.1)
so the converter is a table (`semantic_encoder.model` is our `semantic_encoder/vit`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from illume_jax.models import movq, vit
from illume_jax.modules import quantizers, resample
from illume_jax.modules.linear import Dense

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The official size -> semantic-input-size table (spec §1.1), for the official factor 28
# (patch 14 x merge 2). It keeps the semantic grid's aspect ratio equal to the image's,
# which the floor rule would not (384x576 -> 12x18, not 13x20). Copied verbatim.
RESOLUTION_MAPPING = {
    (256, 256): (252, 252), (512, 512): (504, 504), (512, 384): (448, 336), (384, 512): (336, 448),
    (768, 384): (728, 364), (384, 768): (364, 728), (1024, 256): (1008, 252), (256, 1024): (252, 1008),
    (384, 576): (336, 504), (576, 384): (504, 336), (960, 320): (924, 308), (320, 960): (308, 924),
}
# Aspect-ratio anchors (h, w) of generation and editing (spec §1.8), plus 256x256 of early stages.
ANCHORS = ((512, 512), (384, 512), (512, 384), (384, 768), (768, 384), (384, 576), (576, 384), (320, 960),
           (960, 320), (256, 1024), (1024, 256), (256, 256))


@dataclasses.dataclass(frozen=True)
class DualViTokConfig:
    vit: vit.Qwen2ViTConfig
    # semantic branch after the ViT
    semantic_dim: int = 1280          # width of the 4 extra blocks
    semantic_blocks: int = 4
    semantic_heads: int = 16
    semantic_mlp_dim: int = 5120
    semantic_decoder_blocks: int = 4
    z_channels: int = 32              # code vector size (both levels)
    semantic_codes: int = 32768
    # pixel branch
    pixel_encoder: movq.MoVQConfig = None
    pixel_decoder: movq.MoVQConfig = None
    pixel_codes: int = 98304
    quantizer_chunk: int = 32768      # codes per distance chunk (SimVQ)
    commitment_beta: float = 0.25
    # noise injection on pixel codes during training (spec §1.9); 0 = off (released config)
    pixel_drop_rate: float = 0.0
    pixel_drop_batch_rate: float = 0.1
    pixel_noise_type: str = "random"  # 'random' (code of the previous sample) | 'zero'
    freeze_vit: bool = True           # no gradient into the ViT (the official tokenizer trains it never)
    dtype: str = "float32"

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.pixel_encoder.ch_mult) - 1)

    @property
    def semantic_factor(self) -> int:
        return self.vit.patch_size * self.vit.spatial_merge_size

    @classmethod
    def from_config(cls, c: Any) -> "DualViTokConfig":
        d = dict(c)
        vit.check_known_keys(cls, d, "config.model", extra=("kind",))
        d.pop("kind", None)
        d["vit"] = vit.Qwen2ViTConfig(**dict(d["vit"]))
        d["pixel_encoder"] = movq.MoVQConfig(**dict(d["pixel_encoder"]))
        d["pixel_decoder"] = movq.MoVQConfig(**dict(d["pixel_decoder"]))
        cfg = cls(**d)
        if cfg.pixel_noise_type not in ("random", "zero"):
            raise ValueError(f"config.model.pixel_noise_type={cfg.pixel_noise_type!r}: expected 'random' or 'zero'")
        return cfg


def semantic_input_size(h: int, w: int, factor: int = 28) -> tuple[int, int]:
    """(H', W') the semantic branch sees for an (h, w) image: the official table for factor 28,
    else each side floored to a multiple of `factor` (at least `factor`)."""
    if factor == 28 and (h, w) in RESOLUTION_MAPPING:
        return RESOLUTION_MAPPING[(h, w)]
    return max(factor, h // factor * factor), max(factor, w // factor * factor)


def token_grids(h: int, w: int, cfg: DualViTokConfig) -> tuple[tuple[int, int], tuple[int, int]]:
    """((h1, w1), (h2, w2)): semantic and pixel code grids of an (h, w) image."""
    d = cfg.downsample
    if h % d or w % d:
        raise ValueError(f"image size {h}x{w}: both sides must be multiples of {d} (the pixel encoder's stride)")
    sh, sw = semantic_input_size(h, w, cfg.semantic_factor)
    f = cfg.semantic_factor
    return (sh // f, sw // f), (h // d, w // d)


def image_block_length(h: int, w: int, cfg: DualViTokConfig) -> int:
    """Tokens of one image block: 6 structure tokens + every code row followed by an EOL (spec §1.8)."""
    (h1, w1), (h2, w2) = token_grids(h, w, cfg)
    return 6 + h1 * (w1 + 1) + h2 * (w2 + 1)


@struct.dataclass
class TokenizerOutput:
    recon: jax.Array            # [B,H,W,3] in (about) [-1, 1]
    losses: dict                # unweighted auxiliary losses (scalars)
    codes: dict                 # codebook name -> int32 code grid
    latents: dict | None = None  # codebook name -> encoder output before quantisation (dead-code restarts)


def layer_norm_no_affine(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mu = x32.mean(-1, keepdims=True)
    var = ((x32 - mu) ** 2).mean(-1, keepdims=True)
    return ((x32 - mu) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def cosine_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
    """mean(1 - cos) per token (torch cosine_embedding_loss with target +1)."""
    p = pred.astype(jnp.float32)
    t = target.astype(jnp.float32)
    p = p / jnp.maximum(jnp.linalg.norm(p, axis=-1, keepdims=True), 1e-8)
    t = t / jnp.maximum(jnp.linalg.norm(t, axis=-1, keepdims=True), 1e-8)
    return jnp.mean(1.0 - (p * t).sum(-1))


def raster_positions(batch: int, h: int, w: int) -> jax.Array:
    rows, cols = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij")
    pos = jnp.stack([rows.reshape(-1), cols.reshape(-1)], -1).astype(jnp.int32)
    return jnp.broadcast_to(pos, (batch, h * w, 2))


def scale_for_vit(images: jax.Array, size: tuple[int, int]) -> jax.Array:
    """The official ScalingLayerForQwen2ViT: [-1,1] -> [0,1] -> antialiased bicubic (fp32) -> clamp -> CLIP norm."""
    x = (images.astype(jnp.float32) + 1.0) / 2.0
    if x.shape[1:3] != tuple(size):
        x = resample.resize_bicubic(x, size, antialias=True)
    x = jnp.clip(x, 0.0, 1.0)
    return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


def qwen2_vit_tokens(model: vit.Qwen2VisionTransformer, images: jax.Array) -> tuple[jax.Array, tuple[int, int]]:
    """Images [B,H,W,3] in [-1,1] -> merger features [B, h1*w1, hidden] (raster order over the
    merged grid) and (h1, w1): scaling layer, Qwen2-VL patchify, ViT."""
    c = model.cfg
    size = semantic_input_size(images.shape[1], images.shape[2], c.patch_size * c.spatial_merge_size)
    x = scale_for_vit(images, size)
    patches, positions, (gh, gw) = vit.patchify_qwen2(x, c.patch_size, c.temporal_patch_size, c.spatial_merge_size)
    feats = model(patches.astype(jnp.dtype(c.dtype)), positions)
    m = c.spatial_merge_size
    return feats, (gh // m, gw // m)


def block_attention(vit_attention: str) -> str:
    """The kernel of the tokenizer's own ViT blocks: its ViT's, except splash (their short raster
    sequences rarely fill splash's blocks), which falls back to 'xla'."""
    return "xla" if vit_attention == "splash" else vit_attention


class SemanticEncoder(nnx.Module):
    def __init__(self, cfg: DualViTokConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt = jnp.dtype(cfg.dtype)
        self.vit = vit.Qwen2VisionTransformer(cfg.vit, rngs=rngs)
        self.proj_in = Dense((cfg.vit.hidden_size,), (cfg.semantic_dim,), axes=("embed", "mlp"), use_bias=True,
                             dtype=dt, rngs=rngs)
        self.blocks = vit.VisionBlockStack(cfg.semantic_blocks, cfg.semantic_dim, cfg.semantic_heads,
                                           cfg.semantic_mlp_dim, dtype=cfg.dtype, remat=cfg.vit.remat,
                                           attention=block_attention(cfg.vit.attention), rngs=rngs)
        self.proj_out = Dense((cfg.semantic_dim,), (cfg.z_channels,), axes=("embed", None), use_bias=True,
                              dtype=dt, rngs=rngs)

    def __call__(self, images: jax.Array):
        """-> (z [B,h1,w1,z], target [B,h1*w1,hidden]) where target = LayerNorm(merger features)."""
        feats, (h1, w1) = qwen2_vit_tokens(self.vit, images)
        if self.cfg.freeze_vit:
            feats = jax.lax.stop_gradient(feats)
        target = layer_norm_no_affine(feats)
        x = self.proj_in(target)
        x = self.blocks(x, raster_positions(x.shape[0], h1, w1))
        z = self.proj_out(x)
        return z.reshape(z.shape[0], h1, w1, -1), target


class FeatureDecoder(nnx.Module):
    """Codes -> encoder features: Linear -> ViT blocks (raster 2D RoPE) -> Linear -> LayerNorm.
    DualViTok's semantic decoder and the ILLUME semantic VQ's feature decoder."""

    def __init__(self, code_dim: int, width: int, num_blocks: int, heads: int, mlp_dim: int, out_dim: int, *,
                 dtype: str, remat: str, attention: str = "xla", rngs: nnx.Rngs):
        dt = jnp.dtype(dtype)
        self.proj_in = Dense((code_dim,), (width,), axes=(None, "embed"), use_bias=True, dtype=dt, rngs=rngs)
        self.blocks = vit.VisionBlockStack(num_blocks, width, heads, mlp_dim, dtype=dtype, remat=remat,
                                           attention=attention, rngs=rngs)
        self.proj_out = Dense((width,), (out_dim,), axes=("embed", "mlp"), use_bias=True, dtype=dt, rngs=rngs)
        self.norm_out = nnx.LayerNorm(out_dim, epsilon=1e-5, rngs=rngs,
                                      scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
                                      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",)))

    def __call__(self, zq: jax.Array) -> jax.Array:
        B, h, w, _ = zq.shape
        x = self.proj_in(zq.reshape(B, h * w, -1))
        x = self.blocks(x, raster_positions(B, h, w))
        return self.norm_out(self.proj_out(x))


class DualViTok(nnx.Module):
    def __init__(self, cfg: DualViTokConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt = jnp.dtype(cfg.dtype)
        self.semantic_encoder = SemanticEncoder(cfg, rngs=rngs)
        self.semantic_quantizer = quantizers.SimVQ(cfg.semantic_codes, cfg.z_channels, chunk_size=cfg.quantizer_chunk,
                                                   beta=cfg.commitment_beta, rngs=rngs)
        self.semantic_decoder = FeatureDecoder(cfg.z_channels, cfg.semantic_dim, cfg.semantic_decoder_blocks,
                                               cfg.semantic_heads, cfg.semantic_mlp_dim, cfg.vit.hidden_size,
                                               dtype=cfg.dtype, remat=cfg.vit.remat,
                                               attention=block_attention(cfg.vit.attention), rngs=rngs)
        self.pixel_encoder = movq.MoVQEncoder(cfg.pixel_encoder, rngs=rngs)
        self.pixel_quant_conv = Dense((cfg.pixel_encoder.z_channels,), (cfg.z_channels,), axes=(None, None),
                                      use_bias=True, dtype=dt, rngs=rngs)
        self.pixel_quantizer = quantizers.SimVQ(cfg.pixel_codes, cfg.z_channels, chunk_size=cfg.quantizer_chunk,
                                                beta=cfg.commitment_beta, rngs=rngs)
        self.pixel_post_quant_conv = Dense((2 * cfg.z_channels,), (2 * cfg.z_channels,), axes=(None, None),
                                           use_bias=True, dtype=dt, rngs=rngs)
        self.pixel_decoder = movq.MoVQDecoder(cfg.pixel_decoder, rngs=rngs)

    @property
    def codebook_sizes(self) -> dict[str, int]:
        return {"semantic": self.cfg.semantic_codes, "pixel": self.cfg.pixel_codes}

    def _check(self, images: jax.Array) -> None:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images: expected [B, H, W, 3] in [-1, 1], got shape {images.shape}")
        token_grids(images.shape[1], images.shape[2], self.cfg)  # raises on sizes the encoder cannot take

    @property
    def quantizers(self) -> dict:
        return {"semantic": self.semantic_quantizer, "pixel": self.pixel_quantizer}

    def latents(self, images: jax.Array):
        """-> (semantic z [B,h1,w1,z], pixel z [B,h2,w2,z], target): the encoders' outputs before
        quantisation, and the LayerNorm-ed ViT features the semantic decoder reconstructs."""
        self._check(images)
        z_sem, target = self.semantic_encoder(images)
        z_pix = self.pixel_quant_conv(self.pixel_encoder(images))
        return z_sem, z_pix, target

    def quantize(self, images: jax.Array):
        """-> (semantic (zq, codes, losses), pixel (zq, codes, losses), target)."""
        z_sem, z_pix, target = self.latents(images)
        return self.semantic_quantizer(z_sem), self.pixel_quantizer(z_pix), target

    @staticmethod
    def merge_quants(sem_q: jax.Array, pix_q: jax.Array) -> jax.Array:
        """Semantic vectors [B,h1,w1,z] bicubic-upsampled (torch a=-0.75, no antialias) to the pixel
        grid and concatenated before the pixel vectors [B,h2,w2,z] -> the [B,h2,w2,2z] code map."""
        up = resample.resize_bicubic(sem_q.astype(jnp.float32), pix_q.shape[1:3], antialias=False)
        return jnp.concatenate([up.astype(pix_q.dtype), pix_q], axis=-1)

    def decode_vectors(self, sem_q: jax.Array, pix_q: jax.Array) -> jax.Array:
        """Quantised vectors (semantic [B,h1,w1,z], pixel [B,h2,w2,z]) -> images [B,H,W,3]."""
        quant = self.merge_quants(sem_q, pix_q)
        return self.pixel_decoder(self.pixel_post_quant_conv(quant), quant)

    def reconstruct_unquantized(self, images: jax.Array) -> jax.Array:
        """images -> images decoded from the encoders' latents with both quantisers bypassed: the
        autoencoder's own limit, which tells a codebook bottleneck from an encoder/decoder one."""
        z_sem, z_pix, _ = self.latents(images)
        return self.decode_vectors(z_sem, z_pix)

    def code_map(self, semantic_codes: jax.Array, pixel_codes: jax.Array) -> jax.Array:
        """Codes -> the merged code map [B,h2,w2,2z] that both the pixel decoder and the ILLUME+
        SDXL diffusion decoder condition on (spec §2: 64 channels at official size)."""
        return self.merge_quants(self.semantic_quantizer.lookup(semantic_codes),
                                 self.pixel_quantizer.lookup(pixel_codes))

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images [B,H,W,3] in [-1,1] -> (semantic codes [B,h1,w1], pixel codes [B,h2,w2]) int32."""
        sem, pix, _ = self.quantize(images)
        return sem[1], pix[1]

    def decode(self, semantic_codes: jax.Array, pixel_codes: jax.Array) -> jax.Array:
        return self.decode_vectors(self.semantic_quantizer.lookup(semantic_codes),
                                   self.pixel_quantizer.lookup(pixel_codes))

    def _noise(self, pix_q: jax.Array, rng: jax.Array) -> jax.Array:
        """Pixel-code dropout (spec §1.9): per sample with prob drop_batch_rate, each position
        with prob drop_rate takes the previous sample's code ('random') or zero."""
        cfg = self.cfg
        k1, k2 = jax.random.split(rng)
        B, h, w, _ = pix_q.shape
        sample = jax.random.uniform(k1, (B, 1, 1, 1)) < cfg.pixel_drop_batch_rate
        pos = jax.random.uniform(k2, (B, h, w, 1)) < cfg.pixel_drop_rate
        drop = sample & pos
        other = jax.lax.stop_gradient(jnp.roll(pix_q, 1, axis=0)) if cfg.pixel_noise_type == "random" \
            else jnp.zeros_like(pix_q)
        return jnp.where(drop, other, pix_q)

    def __call__(self, images: jax.Array, *, train: bool = False, rng: jax.Array | None = None) -> TokenizerOutput:
        z_sem, z_pix, target = self.latents(images)
        (sem_q, sem_codes, sem_losses), (pix_q, pix_codes, pix_losses) = \
            self.semantic_quantizer(z_sem), self.pixel_quantizer(z_pix)
        if train and self.cfg.pixel_drop_rate > 0:
            if rng is None:
                raise ValueError("DualViTok: training with pixel_drop_rate > 0 needs an rng")
            pix_q = self._noise(pix_q, rng)
        recon = self.decode_vectors(sem_q, pix_q)
        losses = {"semantic_commit": sem_losses["loss"], "pixel_commit": pix_losses["loss"]}
        if train:
            losses["semantic_cosine"] = cosine_loss(self.semantic_decoder(sem_q), target)
        return TokenizerOutput(recon=recon, losses=losses, codes={"semantic": sem_codes, "pixel": pix_codes},
                               latents={"semantic": z_sem, "pixel": z_pix})

    def semantic_vit(self):
        return self.semantic_encoder.vit
