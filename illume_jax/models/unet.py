"""diffusers `UNet2DConditionModel` in Flax NNX, channels-last (the ILLUME+ diffusion decoder).

The official ILLUME+ decoder is a diffusers SDXL UNet whose conv_in takes 68 channels (4 latent
+ 64 code-map channels), so the model is written against diffusers' own modules and numerics
(diffusers 0.42: unet_2d_condition.py, unet_2d_blocks.py, resnet.py, transformer_2d.py,
attention.py, embeddings.py) rather than a paper:

- time: sinusoidal `Timesteps` (flip_sin_to_cos, freq_shift) -> `TimestepEmbedding`
  (linear_1, SiLU, linear_2); SDXL's `addition_embed_type="text_time"` embeds each time id the
  same way, concatenates [text_embeds, time id embeddings] and adds `add_embedding(...)`.
- `ResnetBlock2D`: GroupNorm, SiLU, conv3x3, + time_emb_proj(SiLU(temb)), GroupNorm, SiLU,
  conv3x3, 1x1 conv_shortcut when the width changes, / output_scale_factor.
- `Transformer2DModel`: GroupNorm(eps 1e-6), proj_in (Linear with `use_linear_projection`, else a
  1x1 conv — the same matmul channels-last), `BasicTransformerBlock`s (LayerNorm'd self-attn,
  cross-attn, GEGLU feed-forward; q/k/v without bias, to_out with bias), proj_out, residual.
- down/mid/up blocks with diffusers' channel arithmetic and skip connections; the up path
  resizes to the size of the skip it meets next, which is diffusers' `upsample_size` rule for
  inputs not divisible by 2**num_upsamplers and plain 2x nearest otherwise.

diffusers' naming quirk is kept: `attention_head_dim` is the number of heads when
`num_attention_heads` is None (SDXL's (5, 10, 20) means 5/10/20 heads of 64 channels); each
head then has `channels // heads` channels. `upcast_attention` only matters below fp32.
Attribute names are diffusers' module names (`down_blocks[1].attentions[0].transformer_blocks[0]
.attn1.to_q`, `ff.net[0].proj`, `downsamplers[0].conv`, ...), so `illume_jax.convert.unet` is a
short table. Attention runs through the shared `illume_jax.modules.attention.attend`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from illume_jax.models.vit import LayerNorm
from illume_jax.modules.attention import IMPLEMENTATIONS, attend
from illume_jax.modules.conv import Conv2d, GroupNorm
from illume_jax.modules.linear import Dense
from illume_jax.modules.resample import resize_nearest

DOWN_BLOCK_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", None)

# diffusers config keys for features this port does not implement: key -> the accepted
# (default) value. A config with any other value is refused by `UNetConfig.from_diffusers`.
_UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "class_embed_type": None,
    "num_class_embeds": None,
    "class_embeddings_concat": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "time_cond_proj_dim": None,
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "attention_type": "default",
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "dual_cross_attention": False,
    "only_cross_attention": False,
    "dropout": 0.0,
}


def _tuplify(v: Any) -> Any:
    """JSON lists (possibly nested) -> tuples, so configs stay hashable."""
    if isinstance(v, (list, tuple)):
        return tuple(_tuplify(x) for x in v)
    return v


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Fields carry diffusers' names and defaults (SD 1.x layout); see `from_diffusers`."""
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                         "DownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: int | tuple = 1          # int, per level, or per level and layer
    reverse_transformer_layers_per_block: tuple | None = None  # up path, with per-layer counts
    attention_head_dim: int | tuple[int, ...] = 8           # = number of heads (diffusers' quirk)
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    upcast_attention: bool = False                          # no effect: softmax is fp32 here
    addition_embed_type: str | None = None                  # None or "text_time" (SDXL)
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    time_embedding_dim: int | None = None                   # default 4 * block_out_channels[0]
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention: str = "xla"                                  # kernel for modules.attention.attend
    remat: bool = False                                     # rematerialise each resnet / transformer block

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _tuplify(getattr(self, f.name)))
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"UNetConfig: down_block_types ({len(self.down_block_types)}), up_block_types "
                             f"({len(self.up_block_types)}) and block_out_channels ({n}) must have equal lengths")
        for key, allowed in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
            bad = [t for t in getattr(self, key) if t not in allowed]
            if bad:
                raise ValueError(f"UNetConfig.{key}: {bad} are not supported (supported: {allowed})")
        if self.mid_block_type not in MID_BLOCK_TYPES:
            raise ValueError(f"UNetConfig.mid_block_type={self.mid_block_type!r} is not supported "
                             f"(supported: {MID_BLOCK_TYPES})")
        if self.act_fn not in ("silu", "swish"):
            raise ValueError(f"UNetConfig.act_fn={self.act_fn!r} is not supported (only silu)")
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"UNetConfig.addition_embed_type={self.addition_embed_type!r} is not supported "
                             "(None or 'text_time')")
        if self.addition_embed_type == "text_time" and (not self.addition_time_embed_dim
                                                        or not self.projection_class_embeddings_input_dim):
            raise ValueError("UNetConfig: addition_embed_type='text_time' needs addition_time_embed_dim and "
                             "projection_class_embeddings_input_dim")
        if self.attention not in IMPLEMENTATIONS:
            raise ValueError(f"UNetConfig.attention={self.attention!r}: expected one of {IMPLEMENTATIONS}")
        if self.downsample_padding not in (0, 1):
            raise ValueError(f"UNetConfig.downsample_padding={self.downsample_padding}: expected 0 or 1")
        for key in ("layers_per_block", "cross_attention_dim", "attention_head_dim", "num_attention_heads",
                    "transformer_layers_per_block"):
            v = getattr(self, key)
            if isinstance(v, tuple) and len(v) != n:
                raise ValueError(f"UNetConfig.{key}: {len(v)} values for {n} levels")
        nested = any(isinstance(t, tuple) for t in self._per_level(self.transformer_layers_per_block))
        if nested and self.reverse_transformer_layers_per_block is None:
            raise ValueError("UNetConfig: per-layer transformer_layers_per_block needs "
                             "reverse_transformer_layers_per_block (diffusers' asymmetric UNet)")

    # ------------------------------------------------------------------ per-level views
    def _per_level(self, v: Any) -> tuple:
        return v if isinstance(v, tuple) else (v,) * len(self.block_out_channels)

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention heads per level (num_attention_heads, else attention_head_dim)."""
        return self._per_level(self.num_attention_heads if self.num_attention_heads is not None
                               else self.attention_head_dim)

    @property
    def layers(self) -> tuple[int, ...]:
        return self._per_level(self.layers_per_block)

    @property
    def cross_dims(self) -> tuple[int, ...]:
        return self._per_level(self.cross_attention_dim)

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    # ------------------------------------------------------------------ diffusers config.json
    @classmethod
    def from_diffusers(cls, cfg: Mapping[str, Any], **overrides) -> "UNetConfig":
        """A diffusers UNet2DConditionModel `config.json` dict -> UNetConfig.

        Keys this port has no use for (sample_size, _class_name, ...) are ignored; keys of features
        it does not implement raise a ValueError naming the key unless they hold the default. Our
        own fields (dtype, param_dtype, attention, remat) may be in the dict or in `overrides`."""
        for key, default in _UNSUPPORTED_DEFAULTS.items():
            if key not in cfg:
                continue
            v = cfg[key]
            ok = v == default or (isinstance(v, (list, tuple)) and all(x == default for x in v))
            if not ok:
                raise ValueError(f"diffusers UNet config: {key}={v!r} is not supported (only {default!r})")
        if "norm_num_groups" in cfg and cfg["norm_num_groups"] is None:
            raise ValueError("diffusers UNet config: norm_num_groups=None (no output norm) is not supported")
        names = {f.name for f in dataclasses.fields(cls)}  # our own (dtype, attention, remat) may ride along
        kwargs = {k: _tuplify(v) for k, v in cfg.items() if k in names}
        for key in ("down_block_types", "up_block_types"):  # diffusers accepts a 'UNetRes' prefix
            if key in kwargs:
                kwargs[key] = tuple(t[7:] if t.startswith("UNetRes") else t for t in kwargs[key])
        try:
            return cls(**{**kwargs, **overrides})
        except ValueError as e:
            raise ValueError(f"diffusers UNet config: {e}") from None


# ---------------------------------------------------------------------------- helpers
def _torch_linear_init(fan_in: int):
    """torch.nn.Linear's default weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)
    return init


def _dense(in_shape: tuple[int, ...], out_shape: tuple[int, ...], axes: tuple, *, use_bias: bool, kw: dict) -> Dense:
    return Dense(in_shape, out_shape, axes=axes, use_bias=use_bias, init=_torch_linear_init(math.prod(in_shape)),
                 **kw)


def _run(block: nnx.Module, remat: bool, *args):
    """block(*args), rematerialised in the backward pass when `remat`."""
    if not remat:
        return block(*args)
    return nnx.remat(lambda m, *a: m(*a))(block, *args)


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: int = 10000) -> jax.Array:
    """diffusers `get_timestep_embedding`: [N] -> [N, dim] fp32 (sin|cos, or cos|sin when flipped).
    Frequencies follow torch's fp32 op order; an odd `dim` gets a zero column."""
    half = dim // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
    freqs = np.exp(exponent / np.float32(half - freq_shift)).astype(np.float32)
    arg = t.astype(jnp.float32)[:, None] * jnp.asarray(freqs)[None, :]
    sin, cos = jnp.sin(arg), jnp.cos(arg)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class _KeyStream:
    """Stands in for `nnx.Rngs` in the layer constructors (they only call `rngs.params()`): folds a
    Python counter into one key. Under a trace, each `nnx.Rngs` draw updates its counter Variable,
    which probes the tracer's `.sharding`; the AttributeError message that builds scans the whole
    trace, so SDXL's ~1,700 draws made `abstract()` quadratic (28 s instead of ~1 s)."""

    def __init__(self, key: jax.Array):
        self.key, self.count = key, 0

    def params(self) -> jax.Array:
        self.count += 1
        return jax.random.fold_in(self.key, self.count)


def _kw(cfg: UNetConfig, rngs: nnx.Rngs) -> dict:
    return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=_KeyStream(rngs.params()))


# ---------------------------------------------------------------------------- embeddings
class TimestepEmbedding(nnx.Module):
    """linear_1, SiLU, linear_2."""

    def __init__(self, in_channels: int, time_embed_dim: int, *, kw: dict):
        self.linear_1 = _dense((in_channels,), (time_embed_dim,), (None, "mlp"), use_bias=True, kw=kw)
        self.linear_2 = _dense((time_embed_dim,), (time_embed_dim,), ("mlp", "embed"), use_bias=True, kw=kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


# ---------------------------------------------------------------------------- resnet / resample
class ResnetBlock2D(nnx.Module):
    """diffusers ResnetBlock2D (time_embedding_norm='default', pre-norm, no up/down)."""

    def __init__(self, cin: int, cout: int, temb_channels: int, *, groups: int, eps: float,
                 output_scale_factor: float = 1.0, kw: dict):
        pdt = kw["param_dtype"]
        self.output_scale_factor = output_scale_factor
        self.norm1 = GroupNorm(cin, num_groups=groups, eps=eps, param_dtype=pdt)
        self.conv1 = Conv2d(cin, cout, 3, **kw)
        self.time_emb_proj = _dense((temb_channels,), (cout,), ("embed", "conv_out"), use_bias=True, kw=kw)
        self.norm2 = GroupNorm(cout, num_groups=groups, eps=eps, param_dtype=pdt)
        self.conv2 = Conv2d(cout, cout, 3, **kw)
        self.conv_shortcut = Conv2d(cin, cout, 1, **kw) if cin != cout else None

    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))  # dropout: 0 in every supported config
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nnx.Module):
    """3x3 conv, stride 2; padding 1, or 0 after a (bottom, right) zero pad like diffusers."""

    def __init__(self, channels: int, padding: int, *, kw: dict):
        self.pad_bottom_right = padding == 0
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=padding, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.pad_bottom_right:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest resize (torch rule) to `size`, then 3x3 conv."""

    def __init__(self, channels: int, *, kw: dict):
        self.conv = Conv2d(channels, channels, 3, **kw)

    def __call__(self, x: jax.Array, size: tuple[int, int]) -> jax.Array:
        return self.conv(resize_nearest(x, tuple(size)))


# ---------------------------------------------------------------------------- transformer
class Attention(nnx.Module):
    """diffusers Attention (AttnProcessor2_0): q/k/v without bias, to_out[0] with bias,
    scale 1/sqrt(head_dim); self-attention when `context` is None. Splash needs as many keys as
    queries, so with 'splash' the cross-attention (a short text context) runs on 'xla'."""

    def __init__(self, query_dim: int, heads: int, head_dim: int, cross_attention_dim: int | None, *,
                 implementation: str, kw: dict):
        kv_dim = cross_attention_dim or query_dim
        self.implementation = implementation
        self.to_q = _dense((query_dim,), (heads, head_dim), ("embed", "heads", "head_dim"), use_bias=False, kw=kw)
        self.to_k = _dense((kv_dim,), (heads, head_dim), ("embed", "heads", "head_dim"), use_bias=False, kw=kw)
        self.to_v = _dense((kv_dim,), (heads, head_dim), ("embed", "heads", "head_dim"), use_bias=False, kw=kw)
        self.to_out = nnx.List([_dense((heads, head_dim), (query_dim,), ("heads", "head_dim", "embed"),
                                       use_bias=True, kw=kw)])

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        ctx = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
        impl = "xla" if self.implementation == "splash" and k.shape[1] != q.shape[1] else self.implementation
        o = attend(q, k, v, causal=False, implementation=impl)
        return self.to_out[0](o)


class GEGLU(nnx.Module):
    """proj -> (hidden, gate) halves; hidden * gelu(gate) (exact erf GELU, as torch's F.gelu)."""

    def __init__(self, dim: int, inner: int, *, kw: dict):
        # out shape (2, inner): torch's row order [hidden; gate], each half sharded alike over 'mlp'
        self.proj = _dense((dim,), (2, inner), ("embed", None, "mlp"), use_bias=True, kw=kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.proj(x)
        return y[..., 0, :] * jax.nn.gelu(y[..., 1, :], approximate=False)


class FeedForward(nnx.Module):
    """net = [GEGLU, Dropout (no parameters: None), Linear], mult 4, as diffusers."""

    def __init__(self, dim: int, *, kw: dict, mult: int = 4):
        inner = dim * mult
        self.net = nnx.List([GEGLU(dim, inner, kw=kw), None,
                             _dense((inner,), (dim,), ("mlp", "embed"), use_bias=True, kw=kw)])

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
    """x + attn1(norm1 x); + attn2(norm2 x, context); + ff(norm3 x) (LayerNorm eps 1e-5)."""

    def __init__(self, dim: int, heads: int, head_dim: int, cross_attention_dim: int, *, implementation: str,
                 kw: dict):
        pdt = kw["param_dtype"]
        self.norm1 = LayerNorm(dim, eps=1e-5, param_dtype=pdt)
        self.attn1 = Attention(dim, heads, head_dim, None, implementation=implementation, kw=kw)
        self.norm2 = LayerNorm(dim, eps=1e-5, param_dtype=pdt)
        self.attn2 = Attention(dim, heads, head_dim, cross_attention_dim, implementation=implementation, kw=kw)
        self.norm3 = LayerNorm(dim, eps=1e-5, param_dtype=pdt)
        self.ff = FeedForward(dim, kw=kw)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
    """GroupNorm (eps 1e-6), proj_in, transformer blocks over H*W tokens, proj_out, + input."""

    def __init__(self, channels: int, heads: int, num_layers: int, cross_attention_dim: int, *, groups: int,
                 linear: bool, implementation: str, kw: dict):
        head_dim = channels // heads
        inner = heads * head_dim
        self.linear = linear
        self.norm = GroupNorm(channels, num_groups=groups, eps=1e-6, param_dtype=kw["param_dtype"])
        if linear:
            self.proj_in = _dense((channels,), (inner,), (None, "embed"), use_bias=True, kw=kw)
            self.proj_out = _dense((inner,), (channels,), ("embed", "conv_out"), use_bias=True, kw=kw)
        else:
            self.proj_in = Conv2d(channels, inner, 1, out_axis="embed", **kw)
            self.proj_out = Conv2d(inner, channels, 1, **kw)
        self.transformer_blocks = nnx.List([
            BasicTransformerBlock(inner, heads, head_dim, cross_attention_dim, implementation=implementation, kw=kw)
            for _ in range(num_layers)])

    def __call__(self, x: jax.Array, context: jax.Array, remat: bool) -> jax.Array:
        B, H, W, C = x.shape
        h = self.norm(x)
        h = self.proj_in(h.reshape(B, H * W, C)) if self.linear else self.proj_in(h).reshape(B, H * W, -1)
        for block in self.transformer_blocks:
            h = _run(block, remat, h, context)
        h = self.proj_out(h).reshape(B, H, W, C) if self.linear else self.proj_out(h.reshape(B, H, W, -1))
        return h + x


# ---------------------------------------------------------------------------- UNet blocks
def _per_layer(v: int | tuple[int, ...], n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, tuple) else (v,) * n


class DownBlock(nnx.Module):
    """DownBlock2D (no `attentions`) or CrossAttnDownBlock2D; returns (h, skip states)."""

    def __init__(self, cin: int, cout: int, n: int, *, cross: bool, transformer_layers, heads: int,
                 cross_dim: int, add_downsample: bool, cfg: UNetConfig, kw: dict):
        self.resnets = nnx.List([
            ResnetBlock2D(cin if i == 0 else cout, cout, cfg.time_embed_dim, groups=cfg.norm_num_groups,
                          eps=cfg.norm_eps, kw=kw) for i in range(n)])
        layers = _per_layer(transformer_layers, n)
        self.attentions = nnx.List([
            Transformer2DModel(cout, heads, layers[i], cross_dim, groups=cfg.norm_num_groups,
                               linear=cfg.use_linear_projection, implementation=cfg.attention, kw=kw)
            for i in range(n)] if cross else [])
        self.downsamplers = (nnx.List([Downsample2D(cout, cfg.downsample_padding, kw=kw)])
                             if add_downsample else None)

    def __call__(self, h, temb, context, remat):
        skips = []
        for i, resnet in enumerate(self.resnets):
            h = _run(resnet, remat, h, temb)
            if len(self.attentions):
                h = self.attentions[i](h, context, remat)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, skips


class MidBlock(nnx.Module):
    """UNetMidBlock2DCrossAttn: resnet, then (transformer, resnet) once."""

    def __init__(self, channels: int, *, transformer_layers, heads: int, cross_dim: int, cfg: UNetConfig, kw: dict):
        rk = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps, output_scale_factor=cfg.mid_block_scale_factor, kw=kw)
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, cfg.time_embed_dim, **rk) for _ in range(2)])
        self.attentions = nnx.List([
            Transformer2DModel(channels, heads, _per_layer(transformer_layers, 1)[0], cross_dim,
                               groups=cfg.norm_num_groups, linear=cfg.use_linear_projection,
                               implementation=cfg.attention, kw=kw)])

    def __call__(self, h, temb, context, remat):
        h = _run(self.resnets[0], remat, h, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            h = _run(resnet, remat, attn(h, context, remat), temb)
        return h


class UpBlock(nnx.Module):
    """UpBlock2D / CrossAttnUpBlock2D: each resnet eats [h, popped skip] concatenated on channels."""

    def __init__(self, cin: int, prev: int, cout: int, n: int, *, cross: bool, transformer_layers, heads: int,
                 cross_dim: int, add_upsample: bool, cfg: UNetConfig, kw: dict):
        self.resnets = nnx.List([
            ResnetBlock2D((prev if i == 0 else cout) + (cin if i == n - 1 else cout), cout, cfg.time_embed_dim,
                          groups=cfg.norm_num_groups, eps=cfg.norm_eps, kw=kw) for i in range(n)])
        layers = _per_layer(transformer_layers, n)
        self.attentions = nnx.List([
            Transformer2DModel(cout, heads, layers[i], cross_dim, groups=cfg.norm_num_groups,
                               linear=cfg.use_linear_projection, implementation=cfg.attention, kw=kw)
            for i in range(n)] if cross else [])
        self.upsamplers = nnx.List([Upsample2D(cout, kw=kw)]) if add_upsample else None

    def __call__(self, h, skips, temb, context, size, remat):
        skips = list(skips)
        for i, resnet in enumerate(self.resnets):
            h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
            h = _run(resnet, remat, h, temb)
            if len(self.attentions):
                h = self.attentions[i](h, context, remat)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h, size)
        return h


# ---------------------------------------------------------------------------- the UNet
class UNet(nnx.Module):
    """sample [B,H,W,in], timesteps [B] (or scalar), encoder_hidden_states [B,S,D] -> [B,H,W,out];
    SDXL-style configs also take pooled `text_embeds` [B,P] and `time_ids` [B,6]."""

    def __init__(self, cfg: UNetConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        kw = _kw(cfg, rngs)
        boc, n = cfg.block_out_channels, len(cfg.block_out_channels)
        heads, layers, cross_dims = cfg.heads, cfg.layers, cfg.cross_dims
        tlpb = cfg._per_level(cfg.transformer_layers_per_block)
        ted = cfg.time_embed_dim

        self.conv_in = Conv2d(cfg.in_channels, boc[0], cfg.conv_in_kernel, padding=(cfg.conv_in_kernel - 1) // 2, **kw)
        self.time_embedding = TimestepEmbedding(boc[0], ted, kw=kw)
        self.add_embedding = (TimestepEmbedding(cfg.projection_class_embeddings_input_dim, ted, kw=kw)
                              if cfg.addition_embed_type == "text_time" else None)

        down, cout = [], boc[0]
        for i, kind in enumerate(cfg.down_block_types):
            cin, cout = cout, boc[i]
            down.append(DownBlock(cin, cout, layers[i], cross=kind == "CrossAttnDownBlock2D",
                                  transformer_layers=tlpb[i], heads=heads[i], cross_dim=cross_dims[i],
                                  add_downsample=i != n - 1, cfg=cfg, kw=kw))
        self.down_blocks = nnx.List(down)

        self.mid_block = (MidBlock(boc[-1], transformer_layers=tlpb[-1], heads=heads[-1], cross_dim=cross_dims[-1],
                                   cfg=cfg, kw=kw) if cfg.mid_block_type is not None else None)

        rev = lambda v: tuple(reversed(v))  # noqa: E731
        r_boc, r_heads, r_layers, r_cross = rev(boc), rev(heads), rev(layers), rev(cross_dims)
        r_tlpb = cfg.reverse_transformer_layers_per_block or rev(tlpb)
        up, cout = [], r_boc[0]
        for i, kind in enumerate(cfg.up_block_types):
            prev, cout = cout, r_boc[i]
            cin = r_boc[min(i + 1, n - 1)]
            up.append(UpBlock(cin, prev, cout, r_layers[i] + 1, cross=kind == "CrossAttnUpBlock2D",
                              transformer_layers=r_tlpb[i], heads=r_heads[i], cross_dim=r_cross[i],
                              add_upsample=i != n - 1, cfg=cfg, kw=kw))
        self.up_blocks = nnx.List(up)

        self.conv_norm_out = GroupNorm(boc[0], num_groups=cfg.norm_num_groups, eps=cfg.norm_eps,
                                       param_dtype=kw["param_dtype"])
        # out_channels (4) is too small to shard: no sharding name on the last conv.
        self.conv_out = Conv2d(boc[0], cfg.out_channels, cfg.conv_out_kernel, padding=(cfg.conv_out_kernel - 1) // 2,
                               out_axis=None, **kw)

    def __call__(self, sample: jax.Array, timesteps: jax.Array | float | int, encoder_hidden_states: jax.Array,
                 text_embeds: jax.Array | None = None, time_ids: jax.Array | None = None) -> jax.Array:
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
            raise ValueError(f"UNet: sample must be [B,H,W,{cfg.in_channels}], got {sample.shape}")
        B = sample.shape[0]
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != B:
            raise ValueError(f"UNet: encoder_hidden_states must be [{B},S,D], got {encoder_hidden_states.shape}")
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0

        t = jnp.asarray(timesteps)
        t = jnp.broadcast_to(t.reshape(-1) if t.ndim else t[None], (B,))
        emb = self.time_embedding(
            timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift).astype(dt))
        if self.add_embedding is not None:
            if text_embeds is None or time_ids is None:
                raise ValueError("UNet: addition_embed_type='text_time' needs text_embeds [B,P] and time_ids [B,6]")
            tid = timestep_embedding(jnp.asarray(time_ids).reshape(-1), cfg.addition_time_embed_dim,
                                     cfg.flip_sin_to_cos, cfg.freq_shift).reshape(B, -1)
            add = jnp.concatenate([jnp.asarray(text_embeds, jnp.float32), tid], axis=-1)
            if add.shape[-1] != cfg.projection_class_embeddings_input_dim:
                raise ValueError(f"UNet: text_embeds {text_embeds.shape} and time_ids {time_ids.shape} give "
                                 f"{add.shape[-1]} features, projection_class_embeddings_input_dim is "
                                 f"{cfg.projection_class_embeddings_input_dim}")
            emb = emb + self.add_embedding(add.astype(dt))
        elif text_embeds is not None or time_ids is not None:
            raise ValueError("UNet: text_embeds / time_ids are only used with addition_embed_type='text_time'")

        context = encoder_hidden_states.astype(dt)
        h = self.conv_in(sample.astype(dt))
        skips = [h]
        for block in self.down_blocks:
            h, res = block(h, emb, context, cfg.remat)
            skips.extend(res)
        if self.mid_block is not None:
            h = self.mid_block(h, emb, context, cfg.remat)
        for block in self.up_blocks:
            k = len(block.resnets)
            res, skips = skips[-k:], skips[:-k]
            size = skips[-1].shape[1:3] if block.upsamplers is not None else None
            h = block(h, res, emb, context, size, cfg.remat)
        h = jax.nn.silu(self.conv_norm_out(h))
        return self.conv_out(h)


def create(cfg: UNetConfig, mesh: jax.sharding.Mesh | None = None, seed: int = 0) -> UNet:
    """`UNet(cfg)` with every parameter created sharded inside jit; without a mesh, on one device."""
    from illume_jax.sharding import make_mesh, use_mesh

    if mesh is None:
        mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    with use_mesh(mesh):
        return nnx.jit(lambda: UNet(cfg, rngs=nnx.Rngs(seed)))()


def abstract(cfg: UNetConfig, mesh: jax.sharding.Mesh | None = None) -> UNet:
    """Shape-only `UNet(cfg)` (nothing allocated; values are ShapeDtypeStructs carrying their
    sharding): for parameter counts, converter checks and loading without a random init."""
    from illume_jax.sharding import make_mesh, use_mesh

    if mesh is None:
        mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    with use_mesh(mesh):
        return nnx.eval_shape(lambda: UNet(cfg, rngs=nnx.Rngs(0)))
