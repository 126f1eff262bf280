"""Vision transformers: the Qwen2-VL ViT (ILLUME+'s semantic encoder), a reusable 2-D-RoPE
block stack (DualViTok's extra blocks) and a CLIP ViT (HF `CLIPVisionModel`).

Qwen2-VL ViT (spec §1.1–1.2; HF `Qwen2VisionTransformerPretrainedModel`):
  patches [B, L, C*t*p*p] (see `patchify_qwen2`) -> patch_embed (the Conv3d with kernel =
  stride, as a Dense on the flattened (c, t, kh, kw) vector, no bias) -> `depth` pre-LN blocks
  (LayerNorm, fused qkv with bias, 2-D RoPE, bidirectional attention, fc1 -> quick_gelu ->
  fc2) -> PatchMerger (LayerNorm, 4 consecutive tokens = one 2x2 window -> Linear 4D->4D ->
  exact GELU -> Linear -> hidden_size).
  Attention covers each image's own tokens: a batch of same-size images is plain full
  attention per row; several images packed in one row carry segment ids (1, 2, ...; 0 =
  padding) and get a block-diagonal mask (HF's cu_seqlens).

Layers are stacked on a leading 'layers' axis (`nnx.vmap`) and run with `lax.scan` + a named
remat policy, like `models/llm.py`. Parameter paths:
  Qwen2VisionTransformer: `patch_embed/kernel` [C*t*p*p, D], `blocks/norm1/{scale,bias}` [L,D],
  `blocks/attn/qkv/{kernel [L,D,3,N,H], bias [L,3,N,H]}`, `blocks/attn/proj/{kernel [L,N,H,D], bias}`,
  `blocks/norm2/*`, `blocks/mlp/fc1/*` [L,D,F], `blocks/mlp/fc2/*` [L,F,D], `merger/ln_q/*`,
  `merger/fc1/*` [4D,4D], `merger/fc2/*` [4D,hidden].
  VisionBlockStack: `blocks/...` as above.
  ClipVisionTransformer: `patch_embed/kernel` [p,p,C,D], `class_embedding` [D],
  `position_embedding` [1+L, D], `pre_layrnorm/*`, `blocks/{layer_norm1,layer_norm2}/*`,
  `blocks/attn/{q,k,v}_proj/*` [L,D,N,H], `blocks/attn/out_proj/*` [L,N,H,D], `blocks/mlp/fc{1,2}/*`,
  `post_layernorm/*`.

Training only the upper blocks (stage 3 tunes the ViT from block 16): pass
`trainable_from=N` to `Qwen2VisionTransformer.__call__`; blocks < N then run on
`stop_gradient`-ed parameters, so their gradient rows are exactly zero and no backward pass
is computed through them (pair it with an update mask on rows < N of `blocks/*`, since
decoupled weight decay would still move them).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from illume_jax.models.llm import DTYPES, REMAT_POLICIES
from illume_jax.modules.attention import IMPLEMENTATIONS, attend
from illume_jax.modules.linear import Dense
from illume_jax.modules.rope import apply_rope_2d
from illume_jax.sharding import constrain


def quick_gelu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}


def _check_common(cfg, prefix: str = "config.vit") -> None:
    def bad(key, value, allowed):
        raise ValueError(f"{prefix}.{key}={value!r}: expected {allowed}")
    if cfg.act not in ACTIVATIONS:
        bad("act", cfg.act, f"one of {tuple(ACTIVATIONS)}")
    if cfg.attention not in IMPLEMENTATIONS:
        bad("attention", cfg.attention, f"one of {IMPLEMENTATIONS}")
    if cfg.remat not in REMAT_POLICIES:
        bad("remat", cfg.remat, f"one of {tuple(REMAT_POLICIES)}")
    for key in ("dtype", "param_dtype"):
        if getattr(cfg, key) not in DTYPES:
            bad(key, getattr(cfg, key), f"one of {tuple(DTYPES)}")


def check_known_keys(cls, items: dict, where: str, extra: tuple[str, ...] = ()) -> None:
    """A config mapping for dataclass `cls` may only hold its fields (plus `extra`): name the rest."""
    known = {f.name for f in dataclasses.fields(cls)} | set(extra)
    unknown = sorted(set(items) - known)
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}; allowed: {sorted(known)}")


def _from_mapping(cls, config: Any):
    items = dict(config.items() if hasattr(config, "items") else config)
    check_known_keys(cls, items, cls.__name__)
    return cls(**items)


@dataclasses.dataclass(frozen=True)
class Qwen2ViTConfig:
    """Defaults are the released Qwen2-VL-7B ViT (spec §1.2): 675.76M parameters."""
    depth: int = 32
    embed_dim: int = 1280
    num_heads: int = 16
    mlp_ratio: float = 4.0
    hidden_size: int = 3584          # merger output (= LLM width of Qwen2-VL-7B)
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    act: str = "quick_gelu"
    norm_eps: float = 1e-6
    rope_theta: float = 10_000.0
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention: str = "xla"
    remat: str = "nothing_saveable"
    scan_layers: bool = True
    splash_interpret: bool = False

    def __post_init__(self):
        _check_common(self)
        for key in ("depth", "embed_dim", "num_heads", "hidden_size", "patch_size", "temporal_patch_size",
                    "spatial_merge_size", "in_channels"):
            if int(getattr(self, key)) <= 0:
                raise ValueError(f"config.vit.{key}={getattr(self, key)!r}: expected a positive integer")
        if self.embed_dim % self.num_heads or (self.embed_dim // self.num_heads) % 4:
            raise ValueError(f"config.vit.num_heads={self.num_heads}: embed_dim {self.embed_dim} must split into "
                             "heads whose size is a multiple of 4 (2-D RoPE)")

    @classmethod
    def from_config(cls, config: Any) -> "Qwen2ViTConfig":
        return _from_mapping(cls, config)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return DTYPES[self.param_dtype]

    def num_params(self) -> int:
        D, F, M = self.embed_dim, self.mlp_dim, self.embed_dim * self.spatial_merge_size ** 2
        block = 4 * D + (3 * D * D + 3 * D) + (D * D + D) + (D * F + F) + (F * D + D)
        return self.patch_dim * D + self.depth * block + 2 * D + (M * M + M) + (M * self.hidden_size + self.hidden_size)


@dataclasses.dataclass(frozen=True)
class ClipViTConfig:
    """CLIP vision tower (HF `CLIPVisionConfig` names in comments). Defaults: ViT-L/14-336."""
    image_size: int = 336
    patch_size: int = 14
    hidden_size: int = 1024
    num_layers: int = 24             # num_hidden_layers
    num_heads: int = 16              # num_attention_heads
    mlp_dim: int = 4096              # intermediate_size
    in_channels: int = 3             # num_channels
    act: str = "quick_gelu"          # hidden_act
    norm_eps: float = 1e-5           # layer_norm_eps
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention: str = "xla"
    remat: str = "nothing_saveable"
    scan_layers: bool = True
    splash_interpret: bool = False

    def __post_init__(self):
        _check_common(self, "config.clip")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"config.clip.num_heads={self.num_heads}: must divide hidden_size {self.hidden_size}")
        if self.image_size % self.patch_size:
            raise ValueError(f"config.clip.image_size={self.image_size}: not a multiple of patch_size "
                             f"{self.patch_size}")

    @classmethod
    def from_config(cls, config: Any) -> "ClipViTConfig":
        return _from_mapping(cls, config)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return DTYPES[self.param_dtype]


# --- patchify / positions -----------------------------------------------------------------

def grid_positions(h: int, w: int, merge: int = 1) -> np.ndarray:
    """(row, col) ids [h*w, 2] int32 in merge-window order (merged-row, merged-col, sub-row,
    sub-col); merge=1 is plain raster order."""
    if h % merge or w % merge:
        raise ValueError(f"grid {h}x{w} is not a multiple of the merge size {merge}")
    rows = np.arange(h).reshape(h // merge, 1, merge, 1)
    cols = np.arange(w).reshape(1, w // merge, 1, merge)
    rows, cols = np.broadcast_arrays(rows, cols)
    return np.stack([rows.reshape(-1), cols.reshape(-1)], axis=-1).astype(np.int32)


def patchify_qwen2(images: jax.Array, patch_size: int = 14, temporal_patch_size: int = 2, merge: int = 2
                   ) -> tuple[jax.Array, jax.Array, tuple[int, int]]:
    """Images NHWC (already scaled/normalised) -> (patches [B, L, C*t*p*p], positions [B, L, 2], (h, w)).

    Each patch vector is ordered (channel, t, kh, kw) with the single frame repeated t times;
    the sequence is ordered by merge windows, as HF's Qwen2VLImageProcessor emits it. (h, w)
    is the grid in patches (grid_thw = (1, h, w)).
    """
    B, H, W, C = images.shape
    unit = patch_size * merge
    if H % unit or W % unit:
        raise ValueError(f"image size {H}x{W} is not a multiple of patch_size*merge = {unit}")
    h, w = H // patch_size, W // patch_size
    x = images.reshape(B, h // merge, merge, patch_size, w // merge, merge, patch_size, C)
    x = jnp.transpose(x, (0, 1, 4, 2, 5, 7, 3, 6))  # B, hm, wm, mr, mc, C, kh, kw
    x = jnp.broadcast_to(x[:, :, :, :, :, :, None], x.shape[:6] + (temporal_patch_size,) + x.shape[6:])
    patches = x.reshape(B, h * w, C * temporal_patch_size * patch_size * patch_size)
    positions = jnp.broadcast_to(jnp.asarray(grid_positions(h, w, merge)), (B, h * w, 2))
    return patches, positions, (h, w)


def pack_patches(items: list[tuple[Any, Any]], length: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Packs per-image (patches [L_i, P], positions [L_i, 2]) into one row (numpy, host side).

    Returns patches [1, T, P], positions [1, T, 2], segment_ids [1, T] (image i -> i+1, 0 =
    padding up to `length`). Each L_i must be a multiple of merge**2 for the merger to group
    whole windows.
    """
    patches = np.concatenate([np.asarray(p) for p, _ in items])
    positions = np.concatenate([np.asarray(q) for _, q in items]).astype(np.int32)
    seg = np.concatenate([np.full(len(p), i + 1, np.int32) for i, (p, _) in enumerate(items)])
    total = len(seg)
    length = total if length is None else length
    if length < total:
        raise ValueError(f"pack_patches: {total} tokens do not fit in length {length}")
    pad = length - total
    patches = np.pad(patches, ((0, pad), (0, 0)))
    positions = np.pad(positions, ((0, pad), (0, 0)))
    seg = np.pad(seg, (0, pad))
    return patches[None], positions[None], seg[None]


# --- layers -------------------------------------------------------------------------------

class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm: statistics and affine in fp32, result in the input dtype."""

    def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        del rngs
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


class VisionMLP(nnx.Module):
    def __init__(self, dim: int, mlp_dim: int, act: str, *, dtype, param_dtype, rngs: nnx.Rngs):
        dt = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, use_bias=True)
        self.act = act
        self.fc1 = Dense((dim,), (mlp_dim,), axes=("embed", "mlp"), **dt)
        self.fc2 = Dense((mlp_dim,), (dim,), axes=("mlp", "embed"), **dt)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = ACTIVATIONS[self.act](self.fc1(x))
        h = constrain(h, "batch", "act_seq", "act_mlp")
        return self.fc2(h)


class VisionAttention(nnx.Module):
    """Fused qkv (rows q, k, v; kernel [D, 3, N, H]) + 2-D RoPE + bidirectional attention."""

    def __init__(self, dim: int, num_heads: int, *, rope_theta: float, attention: str, splash_interpret: bool,
                 dtype, param_dtype, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"vision attention: width {dim} is not a multiple of {num_heads} heads")
        H = dim // num_heads
        dt = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, use_bias=True)
        self.rope_theta, self.attention, self.splash_interpret = rope_theta, attention, splash_interpret
        self.qkv = Dense((dim,), (3, num_heads, H), axes=("embed", None, "heads", "head_dim"), **dt)
        self.proj = Dense((num_heads, H), (dim,), axes=("heads", "head_dim", "embed"), **dt)

    def __call__(self, x, positions, segment_ids=None):
        qkv = self.qkv(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q = apply_rope_2d(q, positions, self.rope_theta)
        k = apply_rope_2d(k, positions, self.rope_theta)
        q, k, v = (constrain(a, "batch", "act_seq", "act_heads", "head_dim") for a in (q, k, v))
        out = attend(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids, causal=False,
                     implementation=self.attention, splash_interpret=self.splash_interpret)
        return self.proj(out)


class VisionBlock(nnx.Module):
    """Qwen2-VL vision block: x += attn(norm1(x)); x += mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, *, act: str = "quick_gelu", eps: float = 1e-6,
                 rope_theta: float = 10_000.0, attention: str = "xla", splash_interpret: bool = False,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.norm1 = LayerNorm(dim, eps=eps, param_dtype=param_dtype)
        self.attn = VisionAttention(dim, num_heads, rope_theta=rope_theta, attention=attention,
                                    splash_interpret=splash_interpret, dtype=dtype, param_dtype=param_dtype,
                                    rngs=rngs)
        self.norm2 = LayerNorm(dim, eps=eps, param_dtype=param_dtype)
        self.mlp = VisionMLP(dim, mlp_dim, act, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, positions, segment_ids=None):
        x = x + self.attn(self.norm1(x), positions, segment_ids)
        x = x + self.mlp(self.norm2(x))
        return constrain(x, "batch", "act_seq", "act_embed")


def _stack(num: int, make: Callable[[nnx.Rngs], nnx.Module], rngs: nnx.Rngs) -> nnx.Module:
    """`num` modules stacked on a leading 'layers' axis (each with its own init)."""

    @nnx.split_rngs(splits=num)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def build(r):
        return make(r)

    return build(rngs)


def run_stack(stack: nnx.Module, fn: Callable, x: jax.Array, *, num_layers: int, remat: str = "none",
              scan_layers: bool = True, stop: int | None = None, trainable_from: int = 0) -> jax.Array:
    """x -> fn(layer_i, x) for layers [0, stop) of a stacked module (lax.scan or unrolled).

    Layers below `trainable_from` use stop_gradient-ed parameters.
    """
    stop = num_layers if stop is None else stop
    if not 0 <= stop <= num_layers:
        raise ValueError(f"stop={stop}: expected 0..{num_layers}")
    if not 0 <= trainable_from <= num_layers:
        raise ValueError(f"trainable_from={trainable_from}: expected 0..{num_layers}")
    graphdef, state = nnx.split(stack)

    def body(c, layer_state):
        return fn(nnx.merge(graphdef, layer_state), c), None

    if remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)

    cut = min(trainable_from, stop)
    for lo, hi, frozen in ((0, cut, True), (cut, stop, False)):
        if hi <= lo:
            continue
        part = state if (lo, hi) == (0, num_layers) else jax.tree.map(lambda a: a[lo:hi], state)
        if frozen:
            part = jax.lax.stop_gradient(part)
        if scan_layers:
            x, _ = jax.lax.scan(body, x, part)
        else:
            for i in range(hi - lo):
                x, _ = body(x, jax.tree.map(lambda a: a[i], part))
    return x


class VisionBlockStack(nnx.Module):
    """`num_blocks` VisionBlocks on a 'layers' axis (DualViTok's extra encoder/decoder blocks).

    __call__(x [B, L, C], positions [B, L, 2], segment_ids [B, L] | None) -> [B, L, C].
    DualViTok uses raster-order positions (`grid_positions(h, w)`) and no mask.
    """

    def __init__(self, num_blocks: int, dim: int, num_heads: int, mlp_dim: int, *, act: str = "quick_gelu",
                 eps: float = 1e-6, rope_theta: float = 10_000.0, attention: str = "xla",
                 remat: str = "nothing_saveable", scan_layers: bool = True, splash_interpret: bool = False,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if act not in ACTIVATIONS:
            raise ValueError(f"VisionBlockStack act={act!r}: expected one of {tuple(ACTIVATIONS)}")
        if remat not in REMAT_POLICIES:
            raise ValueError(f"VisionBlockStack remat={remat!r}: expected one of {tuple(REMAT_POLICIES)}")
        self.num_blocks, self.remat, self.scan_layers = num_blocks, remat, scan_layers
        dtype, param_dtype = DTYPES.get(dtype, dtype), DTYPES.get(param_dtype, param_dtype)
        self.blocks = _stack(num_blocks, lambda r: VisionBlock(
            dim, num_heads, mlp_dim, act=act, eps=eps, rope_theta=rope_theta, attention=attention,
            splash_interpret=splash_interpret, dtype=dtype, param_dtype=param_dtype, rngs=r), rngs)

    def __call__(self, x, positions, segment_ids=None, *, trainable_from: int = 0):
        return run_stack(self.blocks, lambda blk, h: blk(h, positions, segment_ids), x,
                         num_layers=self.num_blocks, remat=self.remat, scan_layers=self.scan_layers,
                         trainable_from=trainable_from)


class PatchMerger(nnx.Module):
    """LayerNorm -> group merge**2 consecutive tokens -> fc1 -> exact GELU -> fc2."""

    def __init__(self, dim: int, out_dim: int, merge: int = 2, *, eps: float = 1e-6, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.group = merge * merge
        M = dim * self.group
        dt = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, use_bias=True)
        self.ln_q = LayerNorm(dim, eps=eps, param_dtype=param_dtype)
        self.fc1 = Dense((M,), (M,), axes=("embed", "mlp"), **dt)
        self.fc2 = Dense((M,), (out_dim,), axes=("mlp", "embed"), **dt)

    def __call__(self, x):
        B, L, D = x.shape
        if L % self.group:
            raise ValueError(f"patch merger: sequence length {L} is not a multiple of {self.group}")
        h = self.ln_q(x).reshape(B, L // self.group, D * self.group)
        h = jax.nn.gelu(self.fc1(h), approximate=False)
        h = constrain(h, "batch", "act_seq", "act_mlp")
        return self.fc2(h)


class Qwen2VisionTransformer(nnx.Module):
    def __init__(self, cfg: Qwen2ViTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
        self.patch_embed = Dense((cfg.patch_dim,), (cfg.embed_dim,), axes=(None, "embed"), rngs=rngs, **dt)
        self.blocks = _stack(cfg.depth, lambda r: VisionBlock(
            cfg.embed_dim, cfg.num_heads, cfg.mlp_dim, act=cfg.act, eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
            attention=cfg.attention, splash_interpret=cfg.splash_interpret, rngs=r, **dt), rngs)
        self.merger = PatchMerger(cfg.embed_dim, cfg.hidden_size, cfg.spatial_merge_size, eps=cfg.norm_eps,
                                  rngs=rngs, **dt)

    def __call__(self, patches: jax.Array, positions: jax.Array, segment_ids: jax.Array | None = None, *,
                 output: str = "merger", trainable_from: int = 0, num_blocks: int | None = None) -> jax.Array:
        """patches [B, L, C*t*p*p], positions [B, L, 2] (from `patchify_qwen2` / `pack_patches`),
        segment_ids [B, L] (packed images; 0 = padding) or None (one image per row).

        output='merger': [B, L/merge**2, hidden_size]; 'blocks': pre-merger states [B, L, D].
        num_blocks: run only the first n blocks (default all). trainable_from: see module doc.
        """
        if output not in ("merger", "blocks"):
            raise ValueError(f"output={output!r}: expected 'merger' or 'blocks'")
        cfg = self.cfg
        x = self.patch_embed(patches.astype(cfg.compute_dtype))
        x = constrain(x, "batch", "act_seq", "act_embed")
        x = run_stack(self.blocks, lambda blk, h: blk(h, positions, segment_ids), x, num_layers=cfg.depth,
                      remat=cfg.remat, scan_layers=cfg.scan_layers, stop=num_blocks, trainable_from=trainable_from)
        return x if output == "blocks" else self.merger(x)

    def encode_images(self, images: jax.Array, **kwargs) -> jax.Array:
        """Same-size images NHWC (already normalised) -> merger features [B, h*w/merge**2, hidden]."""
        cfg = self.cfg
        patches, positions, _ = patchify_qwen2(images, cfg.patch_size, cfg.temporal_patch_size,
                                               cfg.spatial_merge_size)
        return self(patches, positions, **kwargs)


# --- CLIP ---------------------------------------------------------------------------------

class ClipAttention(nnx.Module):
    def __init__(self, cfg: ClipViTConfig, *, rngs: nnx.Rngs):
        D, N, H = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        dt = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype, rngs=rngs, use_bias=True)
        self.cfg = cfg
        self.q_proj = Dense((D,), (N, H), axes=("embed", "heads", "head_dim"), **dt)
        self.k_proj = Dense((D,), (N, H), axes=("embed", "heads", "head_dim"), **dt)
        self.v_proj = Dense((D,), (N, H), axes=("embed", "heads", "head_dim"), **dt)
        self.out_proj = Dense((N, H), (D,), axes=("heads", "head_dim", "embed"), **dt)

    def __call__(self, x):
        q, k, v = (constrain(p(x), "batch", "act_seq", "act_heads", "head_dim")
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        impl = "xla" if self.cfg.attention == "splash" else self.cfg.attention  # 1+L is rarely block-aligned
        return self.out_proj(attend(q, k, v, causal=False, implementation=impl))


class ClipBlock(nnx.Module):
    def __init__(self, cfg: ClipViTConfig, *, rngs: nnx.Rngs):
        dt = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, param_dtype=cfg.weight_dtype)
        self.attn = ClipAttention(cfg, rngs=rngs)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, param_dtype=cfg.weight_dtype)
        self.mlp = VisionMLP(cfg.hidden_size, cfg.mlp_dim, cfg.act, rngs=rngs, **dt)

    def __call__(self, x):
        x = x + self.attn(self.layer_norm1(x))
        x = x + self.mlp(self.layer_norm2(x))
        return constrain(x, "batch", "act_seq", "act_embed")


class ClipVisionTransformer(nnx.Module):
    """HF `CLIPVisionModel`: conv patch embed (no bias) + class token + learned positions,
    pre_layrnorm, pre-LN blocks, post_layernorm on the class token (pooled output)."""

    def __init__(self, cfg: ClipViTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        D, p, C = cfg.hidden_size, cfg.patch_size, cfg.in_channels
        dt = dict(dtype=cfg.compute_dtype, param_dtype=cfg.weight_dtype)
        self.patch_embed = Dense((p, p, C), (D,), axes=(None, None, None, "embed"), rngs=rngs, **dt)
        init = nnx.initializers.normal(0.02)
        self.class_embedding = nnx.Param(init(rngs.params(), (D,), cfg.weight_dtype), out_sharding=("norm",))
        self.position_embedding = nnx.Param(init(rngs.params(), (cfg.num_patches + 1, D), cfg.weight_dtype),
                                            out_sharding=(None, "embed"))
        self.pre_layrnorm = LayerNorm(D, eps=cfg.norm_eps, param_dtype=cfg.weight_dtype)
        self.blocks = _stack(cfg.num_layers, lambda r: ClipBlock(cfg, rngs=r), rngs)
        self.post_layernorm = LayerNorm(D, eps=cfg.norm_eps, param_dtype=cfg.weight_dtype)

    def __call__(self, images: jax.Array, *, num_blocks: int | None = None, trainable_from: int = 0
                 ) -> tuple[jax.Array, jax.Array]:
        """images NHWC [B, S, S, C] (CLIP-normalised) -> (last_hidden_state [B, 1+L, D], pooled [B, D]).

        num_blocks=n runs only the first n blocks; the hidden state is then HF's
        `hidden_states[n]` (LLaVA's "penultimate layer" is n = num_layers - 1). trainable_from=N: blocks
        below N, and with N > 0 the embeddings before them, get no gradient (the MLLM's
        `vit_trainable_from`, as the Qwen2-VL tower's).
        """
        cfg = self.cfg
        B, Hh, Ww, C = images.shape
        if (Hh, Ww) != (cfg.image_size, cfg.image_size) or C != cfg.in_channels:
            raise ValueError(f"CLIP ViT expects images [B, {cfg.image_size}, {cfg.image_size}, {cfg.in_channels}], "
                             f"got {images.shape}")
        p, g = cfg.patch_size, cfg.image_size // cfg.patch_size
        x = images.astype(cfg.compute_dtype).reshape(B, g, p, g, p, C).transpose(0, 1, 3, 2, 4, 5)
        x = self.patch_embed(x.reshape(B, g * g, p, p, C))
        cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (B, 1, cfg.hidden_size))
        x = jnp.concatenate([cls, x], axis=1) + self.position_embedding[...].astype(x.dtype)
        x = self.pre_layrnorm(constrain(x, "batch", "act_seq", "act_embed"))
        if trainable_from > 0:  # the embeddings sit below the first frozen block
            x = jax.lax.stop_gradient(x)
        x = run_stack(self.blocks, lambda blk, h: blk(h), x, num_layers=cfg.num_layers, remat=cfg.remat,
                      scan_layers=cfg.scan_layers, stop=num_blocks, trainable_from=trainable_from)
        return x, self.post_layernorm(x[:, 0])


# --- creation -----------------------------------------------------------------------------

def create_sharded(make: Callable[[], nnx.Module], mesh: jax.sharding.Mesh | None = None) -> nnx.Module:
    """Runs `make` inside nnx.jit under the mesh + logical rules (params created sharded)."""
    from illume_jax.sharding import make_mesh, use_mesh
    if mesh is None:
        mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    with use_mesh(mesh):
        return nnx.jit(make)()


def create_qwen2_vit(cfg: Qwen2ViTConfig, mesh: jax.sharding.Mesh | None = None, seed: int = 0
                     ) -> Qwen2VisionTransformer:
    return create_sharded(lambda: Qwen2VisionTransformer(cfg, rngs=nnx.Rngs(seed)), mesh)


def create_clip_vit(cfg: ClipViTConfig, mesh: jax.sharding.Mesh | None = None, seed: int = 0
                    ) -> ClipVisionTransformer:
    return create_sharded(lambda: ClipVisionTransformer(cfg, rngs=nnx.Rngs(seed)), mesh)
