"""Contrastive (SigLIP) pre-training of a tokenizer's semantic ViT on ShapeComp captions.

The official tokenizers quantise features of encoders that were trained against text
(Qwen2-VL's ViT, ILLUME's UNIT encoder), which is what makes their codes "semantic". At tiny
scale no such encoder exists, so we make one: the tokenizer's own ViT architecture plus a
small text transformer over word-level caption ids, trained with the sigmoid loss of SigLIP
(Zhai et al. 2023): every image-caption pair of the batch is a binary problem, positives on
the diagonal; logits = exp(t) * cos + b with t, b learned (init log 10 and -10).

After pre-training the tokenizer copies `vit` and freezes it; `feature_distance` serves as
the offline perceptual loss (see `train/tokenizer.py`).
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from illume_jax.models import vit
from illume_jax.modules.linear import Dense


def _vit_for(config: Any, rngs: nnx.Rngs):
    m = config.model
    if m.kind == "dualvitok":
        return vit.Qwen2VisionTransformer(vit.Qwen2ViTConfig(**dict(m.vit)), rngs=rngs)
    return vit.ClipVisionTransformer(vit.ClipViTConfig(**dict(m.vit)), rngs=rngs)


def image_tokens(model, images: jax.Array, config: Any) -> jax.Array:
    """The token features the tokenizer quantises, for images [B,H,W,3] in [-1,1]."""
    if config.model.kind == "dualvitok":
        from illume_jax.models.dualvitok import qwen2_vit_tokens
        return qwen2_vit_tokens(model, images)[0]
    from illume_jax.models.semantic_vq import clip_vit_tokens
    return clip_vit_tokens(model, images, config.model.image_size)


class SigLIP(nnx.Module):
    def __init__(self, config: Any, vocab_size: int, *, rngs: nnx.Rngs):
        p = config.vit_pretrain
        self.config = config
        self.vit = _vit_for(config, rngs)
        width = config.model.vit.hidden_size
        self.text_embed = nnx.Embed(vocab_size, p.text_dim, rngs=rngs,
                                    embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), (None, "embed")))
        self.text_blocks = vit.VisionBlockStack(p.text_layers, p.text_dim, p.text_heads, 4 * p.text_dim, rngs=rngs)
        self.text_norm = nnx.LayerNorm(p.text_dim, rngs=rngs,
                                       scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
                                       bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",)))
        self.image_proj = Dense((width,), (p.embed_dim,), axes=("embed", None), rngs=rngs)
        self.text_proj = Dense((p.text_dim,), (p.embed_dim,), axes=("embed", None), rngs=rngs)
        self.logit_scale = nnx.Param(jnp.asarray(math.log(10.0)), out_sharding=())
        self.logit_bias = nnx.Param(jnp.asarray(-10.0), out_sharding=())

    def embed_images(self, images: jax.Array) -> jax.Array:
        tokens = image_tokens(self.vit, images, self.config)
        z = self.image_proj(tokens.mean(1))
        return z / jnp.linalg.norm(z, axis=-1, keepdims=True)

    def embed_text(self, ids: jax.Array) -> jax.Array:
        B, L = ids.shape
        mask = (ids != 0).astype(jnp.float32)[..., None]
        # 1-D positions through the 2-D RoPE blocks: row 0, column = word index.
        pos = jnp.broadcast_to(jnp.stack([jnp.zeros(L, jnp.int32), jnp.arange(L, dtype=jnp.int32)], -1), (B, L, 2))
        x = self.text_blocks(self.text_embed(ids), pos, segment_ids=(ids != 0).astype(jnp.int32))
        x = self.text_norm(x)
        pooled = (x * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)
        z = self.text_proj(pooled)
        return z / jnp.linalg.norm(z, axis=-1, keepdims=True)

    def loss(self, images: jax.Array, text: jax.Array) -> tuple[jax.Array, dict]:
        zi, zt = self.embed_images(images), self.embed_text(text)
        logits = jnp.exp(self.logit_scale[...]) * zi @ zt.T + self.logit_bias[...]
        labels = 2.0 * jnp.eye(logits.shape[0]) - 1.0
        loss = -jnp.mean(jnp.sum(jax.nn.log_sigmoid(labels * logits), axis=-1))
        acc = jnp.mean(jnp.argmax(logits, axis=1) == jnp.arange(logits.shape[0]))
        return loss, {"i2t_acc": acc}


def make_siglip(config: Any, *, rngs: nnx.Rngs, vocab_size: int | None = None) -> SigLIP:
    if vocab_size is None:
        from illume_jax.data.images import CaptionVocab
        vocab_size = len(CaptionVocab(config.data.levels))
    return SigLIP(config, vocab_size, rngs=rngs)


def retrieval_accuracy(model: SigLIP, config: Any, vocab, n: int = 128) -> dict:
    """On `n` validation scenes: val_i2t_acc, image -> caption top-1 accuracy among them (chance
    = 1/n, but identical captions count as correct); val_twin_acc, how often an image's dense
    caption scores above its shape twin's (`shapecomp.shape_twin`: one object's shape changed,
    chance 0.5) -- whether the image embedding knows the shapes, which colour alone cannot tell."""
    from illume_jax.data import shapecomp
    from illume_jax.data.images import ShapeCompImages, to_model_range
    src = ShapeCompImages(config.data.levels, "validation", max(n // len(config.data.levels), 1))
    recs = [src[i] for i in range(len(src))]
    scenes = [src.scene(i) for i in range(len(src))]
    imgs = jnp.asarray(np.stack([to_model_range(r["image"]) for r in recs]))
    encode = lambda texts: np.stack([vocab.encode(t, config.vit_pretrain.text_len) for t in texts])  # noqa: E731
    ids = encode([r["caption"] for r in recs]
                 + [shapecomp.dense_caption(s) for s in scenes]
                 + [shapecomp.dense_caption(shapecomp.shape_twin(s)) for s in scenes])
    zi, zt = nnx.jit(lambda m, a, b: (m.embed_images(a), m.embed_text(b)))(model, imgs, jnp.asarray(ids))
    zt_caption, zt_dense, zt_twin = np.split(np.asarray(zt), 3)
    zi = np.asarray(zi)
    best = np.argmax(zi @ zt_caption.T, axis=1)
    captions = [r["caption"] for r in recs]
    twin_right = np.sum(zi * zt_dense, axis=1) > np.sum(zi * zt_twin, axis=1)
    return {"val_i2t_acc": float(np.mean([captions[j] == captions[i] for i, j in enumerate(best)])),
            "val_twin_acc": float(np.mean(twin_right))}


def feature_distance(model, x: jax.Array, y: jax.Array, config: Any) -> jax.Array:
    """LPIPS-style distance with the frozen ViT: token features normalised over channels,
    squared difference summed over channels, averaged over tokens and batch."""
    fx = image_tokens(model, x, config).astype(jnp.float32)
    fy = image_tokens(model, y, config).astype(jnp.float32)
    fx = fx / (jnp.linalg.norm(fx, axis=-1, keepdims=True) + 1e-10)
    fy = fy / (jnp.linalg.norm(fy, axis=-1, keepdims=True) + 1e-10)
    return jnp.mean(jnp.sum((fx - fy) ** 2, axis=-1))
