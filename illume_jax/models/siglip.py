"""Contrastive (SigLIP) pre-training of a tokenizer's semantic ViT on ShapeComp captions.

The official tokenizers quantise features of encoders that were trained against text
(Qwen2-VL's ViT, ILLUME's UNIT encoder), which is what makes their codes "semantic". At tiny
scale no such encoder exists, so we make one: the tokenizer's own ViT architecture plus a
small text transformer over word-level caption ids, trained with the sigmoid loss of SigLIP
(Zhai et al. 2023): every image-caption pair of the batch is a binary problem, positives on
the diagonal; logits = exp(t) * cos + b with t, b learned (init log 10 and -10).

A contrastive loss over pooled embeddings asks only for what tells a batch's captions apart; on
ShapeComp that is mostly colour. Two additions make the ViT see shape (`config.vit_pretrain`):
`shape_twins` (negatives that differ from a scene in one object's shape, `train/tokenizer.py`) and
`caption_weight`, a captioning loss in the manner of CapPa (Tschannen et al. 2023): a small causal
decoder that cross-attends to the ViT's token grid predicts the dense caption word by word, so each
object's size, colour, shape and place must be readable from the tokens around it.

A third, `dense_weight`, supervises every token alone: linear heads on each token of the ViT's grid
name the shape and the colour of the object under its cell (or background), from the scene graph
(`shapecomp.cell_labels`). Pooled or caption losses let a token lean on its neighbours; the
multimodal LLM, though, reads the tokens one by one, and a tower whose single tokens do not name
their object's shape leaves the LLM unable to tell a red star from a red circle (README).

After pre-training the tokenizer copies `vit` and freezes it; `feature_distance` serves as
the offline perceptual loss (see `train/tokenizer.py`).
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from illume_jax.models import vit
from illume_jax.modules.attention import attend
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


def token_grid(config: Any) -> tuple[int, int]:
    """(rows, columns) of `image_tokens`' grid for the config's data.resolution: where the dense labels go."""
    m, res = config.model, int(config.data.resolution)
    if m.kind == "dualvitok":
        from illume_jax.models.dualvitok import semantic_input_size
        f = int(m.vit.patch_size) * int(m.vit.spatial_merge_size)
        h, w = semantic_input_size(res, res, f)
        return h // f, w // f
    side = int(m.image_size) // int(m.vit.patch_size)
    return side, side


class CaptionBlock(nnx.Module):
    """Pre-norm decoder block: causal self-attention over the words, cross-attention to the image
    tokens, GELU MLP."""

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
        if dim % heads:
            raise ValueError(f"caption decoder: width {dim} is not a multiple of {heads} heads")
        H = dim // heads
        dt = dict(rngs=rngs, use_bias=True)
        self.norm1 = vit.LayerNorm(dim, eps=1e-6)
        self.qkv = Dense((dim,), (3, heads, H), axes=("embed", None, "heads", "head_dim"), **dt)
        self.self_out = Dense((heads, H), (dim,), axes=("heads", "head_dim", "embed"), **dt)
        self.norm2 = vit.LayerNorm(dim, eps=1e-6)
        self.q = Dense((dim,), (heads, H), axes=("embed", "heads", "head_dim"), **dt)
        self.kv = Dense((dim,), (2, heads, H), axes=("embed", None, "heads", "head_dim"), **dt)
        self.cross_out = Dense((heads, H), (dim,), axes=("heads", "head_dim", "embed"), **dt)
        self.norm3 = vit.LayerNorm(dim, eps=1e-6)
        self.mlp = vit.VisionMLP(dim, 4 * dim, "gelu", dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, x: jax.Array, image: jax.Array, words: jax.Array) -> jax.Array:
        qkv = self.qkv(self.norm1(x))
        x = x + self.self_out(attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], q_segment_ids=words, causal=True))
        kv = self.kv(image)
        ones = jnp.ones(image.shape[:2], jnp.int32)
        x = x + self.cross_out(attend(self.q(self.norm2(x)), kv[:, :, 0], kv[:, :, 1], causal=False,
                                      q_segment_ids=jnp.ones(x.shape[:2], jnp.int32), kv_segment_ids=ones))
        return x + self.mlp(self.norm3(x))


class CaptionDecoder(nnx.Module):
    """Predicts caption word t from a start vector, words < t and the image tokens (teacher forcing)."""

    def __init__(self, vocab_size: int, image_width: int, dim: int, layers: int, heads: int, max_len: int, *,
                 rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab_size, dim, rngs=rngs,
                               embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), (None, "embed")))
        self.start = nnx.Param(jax.random.normal(rngs.params(), (dim,)) * 0.02, out_sharding=("embed",))
        self.positions = nnx.Param(jax.random.normal(rngs.params(), (max_len, dim)) * 0.02,
                                   out_sharding=(None, "embed"))
        self.image_in = Dense((image_width,), (dim,), axes=("embed", None), use_bias=True, rngs=rngs)
        self.blocks = nnx.List([CaptionBlock(dim, heads, rngs=rngs) for _ in range(layers)])
        self.norm = vit.LayerNorm(dim, eps=1e-6)
        self.head = Dense((dim,), (vocab_size,), axes=("embed", None), rngs=rngs)

    def __call__(self, image_tokens: jax.Array, ids: jax.Array) -> jax.Array:
        """image_tokens [B,S,W], ids [B,L] (0 = padding) -> logits [B,L,V] for ids[:, t]."""
        B, L = ids.shape
        if L > self.positions.shape[0]:
            raise ValueError(f"caption of {L} words: the decoder was built for at most {self.positions.shape[0]}")
        prev = jnp.concatenate([jnp.broadcast_to(self.start[...], (B, 1, self.start.shape[0])),
                                self.embed(ids[:, :-1])], axis=1)
        x = prev + self.positions[...][:L]
        # The start slot and every real word's slot form segment 1; padding after the caption its own.
        words = jnp.concatenate([jnp.ones((B, 1), jnp.int32), (ids[:, :-1] != 0).astype(jnp.int32)], axis=1)
        image = self.image_in(image_tokens)
        for block in self.blocks:
            x = block(x, image, words)
        return self.head(self.norm(x))


def caption_loss(logits: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy and argmax accuracy over the real (non-padding) words."""
    mask = (ids != 0).astype(jnp.float32)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)), ids[..., None], axis=-1)[..., 0]
    n = jnp.maximum(mask.sum(), 1.0)
    return (ce * mask).sum() / n, ((jnp.argmax(logits, -1) == ids) * mask).sum() / n


class SigLIP(nnx.Module):
    def __init__(self, config: Any, vocab_size: int, *, rngs: nnx.Rngs):
        p = config.vit_pretrain
        self.siglip_weight = float(p.get("siglip_weight", 1.0))
        self.caption_weight = float(p.get("caption_weight", 0.0))
        self.dense_weight = float(p.get("dense_weight", 0.0))
        self.dense_object_weight = float(p.get("dense_object_weight", 4.0))
        weights = (self.siglip_weight, self.caption_weight, self.dense_weight)
        if min(weights) < 0 or sum(weights) == 0 or self.dense_object_weight <= 0:
            raise ValueError(f"config.vit_pretrain.siglip_weight={self.siglip_weight}, caption_weight="
                             f"{self.caption_weight}, dense_weight={self.dense_weight}, dense_object_weight="
                             f"{self.dense_object_weight}: expected weights >= 0, not all 0, and an object "
                             "weight > 0")
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
        self.captioner = CaptionDecoder(vocab_size, width, p.caption_dim, p.caption_layers, p.caption_heads,
                                        p.text_len, rngs=rngs) if self.caption_weight > 0 else None
        # Dense heads: len(SHAPES) + 1 / len(COLORS) + 1 classes, the last one background.
        from illume_jax.data.shapecomp import world
        self.dense_shape_head = Dense((width,), (len(world.SHAPES) + 1,), axes=("embed", None), use_bias=True,
                                      rngs=rngs) if self.dense_weight > 0 else None
        self.dense_color_head = Dense((width,), (len(world.COLORS) + 1,), axes=("embed", None), use_bias=True,
                                      rngs=rngs) if self.dense_weight > 0 else None

    def embed_images(self, images: jax.Array) -> jax.Array:
        return self._pooled(image_tokens(self.vit, images, self.config))

    def _pooled(self, tokens: jax.Array) -> jax.Array:
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

    def dense_logits(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Token features [B,S,W] -> per-token (shape, colour) logits [B,S,len(SHAPES)+1] / [B,S,len(COLORS)+1]."""
        if self.dense_shape_head is None:
            raise ValueError("dense_logits: the model was built with config.vit_pretrain.dense_weight=0 (no heads)")
        return self.dense_shape_head(tokens).astype(jnp.float32), self.dense_color_head(tokens).astype(jnp.float32)

    def evaluation_outputs(self, images: jax.Array, text: jax.Array, captions: jax.Array):
        """Image embeddings, text embeddings, (with a captioner, else None) the caption logits for
        `captions` of `images` and (with dense heads, else None) the per-token shape logits: the ViT
        runs once for all."""
        tokens = image_tokens(self.vit, images, self.config)
        logits = self.captioner(tokens, captions) if self.captioner is not None else None
        shape_logits = self.dense_logits(tokens)[0] if self.dense_shape_head is not None else None
        return self._pooled(tokens), self.embed_text(text), logits, shape_logits

    def loss(self, images: jax.Array, text: jax.Array, cell_shape: jax.Array | None = None,
             cell_color: jax.Array | None = None) -> tuple[jax.Array, dict]:
        """cell_shape / cell_color [n, S] (`shapecomp.cell_labels` over the token grid) label the first n
        images' tokens; the dense loss needs them (and only they are dense-supervised: shape twins
        join the batch after the scenes and have none)."""
        tokens = image_tokens(self.vit, images, self.config)   # once, for every loss
        zi, zt = self._pooled(tokens), self.embed_text(text)
        logits = jnp.exp(self.logit_scale[...]) * zi @ zt.T + self.logit_bias[...]
        labels = 2.0 * jnp.eye(logits.shape[0]) - 1.0
        contrastive = -jnp.mean(jnp.sum(jax.nn.log_sigmoid(labels * logits), axis=-1))
        acc = jnp.mean(jnp.argmax(logits, axis=1) == jnp.arange(logits.shape[0]))
        metrics = {"i2t_acc": acc, "siglip_loss": contrastive}
        loss = self.siglip_weight * contrastive
        if self.captioner is not None:
            cap, cap_acc = caption_loss(self.captioner(tokens, text), text)
            loss = loss + self.caption_weight * cap
            metrics.update(caption_loss=cap, caption_acc=cap_acc)
        if self.dense_shape_head is not None:
            if cell_shape is None or cell_color is None:
                raise ValueError("config.vit_pretrain.dense_weight > 0 needs per-cell labels (cell_shape, cell_color)")
            dense, dense_metrics = self.dense_loss(tokens[:cell_shape.shape[0]], cell_shape, cell_color)
            loss = loss + self.dense_weight * dense
            metrics.update(dense_loss=dense, **dense_metrics)
        return loss, metrics

    def dense_loss(self, tokens: jax.Array, cell_shape: jax.Array, cell_color: jax.Array):
        """Shape + colour cross-entropy of every token, object cells weighted `dense_object_weight` x
        background ones (objects cover a small part of a ShapeComp grid, and they are the point)."""
        if cell_shape.shape != tokens.shape[:2] or cell_color.shape != tokens.shape[:2]:
            raise ValueError(f"dense loss: labels {cell_shape.shape} / {cell_color.shape} do not match the ViT's "
                             f"token grid {tokens.shape[:2]} (cell_grid must be the ViT's merged grid)")
        shape_logits, color_logits = self.dense_logits(tokens)
        obj = cell_shape < shape_logits.shape[-1] - 1
        w = jnp.where(obj, self.dense_object_weight, 1.0)
        ce = (optax.softmax_cross_entropy_with_integer_labels(shape_logits, cell_shape)
              + optax.softmax_cross_entropy_with_integer_labels(color_logits, cell_color))
        n_obj = jnp.maximum(obj.sum(), 1)
        return (ce * w).sum() / w.sum(), {
            "dense_shape_acc": ((shape_logits.argmax(-1) == cell_shape) & obj).sum() / n_obj,
            "dense_color_acc": ((color_logits.argmax(-1) == cell_color) & obj).sum() / n_obj}


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
    dense_ids = ids[len(recs):2 * len(recs)]
    zi, zt, logits, shape_logits = nnx.jit(lambda m, a, b, c: m.evaluation_outputs(a, b, c))(
        model, imgs, jnp.asarray(ids), jnp.asarray(dense_ids))
    zt_caption, zt_dense, zt_twin = np.split(np.asarray(zt), 3)
    zi = np.asarray(zi)
    best = np.argmax(zi @ zt_caption.T, axis=1)
    captions = [r["caption"] for r in recs]
    twin_right = np.sum(zi * zt_dense, axis=1) > np.sum(zi * zt_twin, axis=1)
    out = {"val_i2t_acc": float(np.mean([captions[j] == captions[i] for i, j in enumerate(best)])),
           "val_twin_acc": float(np.mean(twin_right))}
    if logits is not None:
        out.update(caption_accuracy(np.asarray(logits), dense_ids, vocab))
    if shape_logits is not None:  # the dense heads on validation scenes: object cells' shape, alone
        grid = token_grid(config)
        cells = np.stack([shapecomp.cell_labels(s, grid)[0] for s in scenes])
        obj = cells < np.asarray(shape_logits).shape[-1] - 1
        out["val_dense_shape_acc"] = float(np.mean(np.argmax(np.asarray(shape_logits), -1)[obj] == cells[obj]))
    return out


def caption_accuracy(logits: np.ndarray, ids: np.ndarray, vocab) -> dict:
    """Teacher-forced argmax accuracy of the caption decoder's `logits` on dense captions `ids`: over
    all words (val_caption_acc) and over the shape words alone (val_caption_shape_acc: is each
    object's shape read off the image, given the words before it, size and colour included)."""
    from illume_jax.data.shapecomp import world
    said = np.argmax(logits, -1)
    shape_ids = np.isin(ids, [vocab.index[s] for s in world.SHAPES if s in vocab.index])
    real = ids != 0
    return {"val_caption_acc": float(np.mean(said[real] == ids[real])),
            "val_caption_shape_acc": float(np.mean(said[shape_ids] == ids[shape_ids]))}


def feature_distance(model, x: jax.Array, y: jax.Array, config: Any) -> jax.Array:
    """LPIPS-style distance with the frozen ViT: token features normalised over channels,
    squared difference summed over channels, averaged over tokens and batch."""
    fx = image_tokens(model, x, config).astype(jnp.float32)
    fy = image_tokens(model, y, config).astype(jnp.float32)
    fx = fx / (jnp.linalg.norm(fx, axis=-1, keepdims=True) + 1e-10)
    fy = fy / (jnp.linalg.norm(fy, axis=-1, keepdims=True) + 1e-10)
    return jnp.mean(jnp.sum((fx - fy) ** 2, axis=-1))
