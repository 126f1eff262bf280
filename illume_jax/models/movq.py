"""MoVQ pixel encoder and decoder of DualViTok (spec §1.5, §1.7, §1.7b), channels-last.

Encoder: conv_in, per level `num_res_blocks` ResBlocks (each followed by an AttnBlock at the
attention levels) and a DC-AE down block on every level but the last, mid (Res, Attn, Res),
GroupNorm, SiLU, conv_out plus a group-mean shortcut of the activated features. `local=True` (not
official) drops the attention and the mid block and normalises per position.
Decoder: conv_in plus a channel-repeat shortcut, mid, levels last -> 0 with
`num_res_blocks + 1` ResBlocks (attention as above) and a DC-AE up block on every level but
0, norm_out, SiLU, conv_out; every norm is a spatial norm conditioned on the code map zq.

Attribute names mirror the PyTorch state-dict keys (`down[l].block[i].norm1`,
`mid.block_1`, `up[l].upsample.conv`, ...) so `illume_jax.convert.movq` is a table.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from illume_jax.modules.conv import AttnBlock, Conv2d, DCDownBlock2d, DCUpBlock2d, GroupNorm, ResBlock, SpatialNorm


@dataclasses.dataclass(frozen=True)
class MoVQConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2           # per level in the encoder; the decoder uses one more
    attn_levels: tuple[int, ...] = (4,)  # level indices (not pixel sizes) that get attention
    z_channels: int = 32
    in_channels: int = 3
    out_channels: int = 3
    zq_channels: int = 0              # decoder: channels of the code map zq (0: plain GroupNorms)
    num_groups: int = 32
    remat: bool = False               # rematerialise each Res/Attn block in the backward pass
    # Encoder only, not official: every norm a per-position LayerNorm (no whole-image statistics),
    # no attention and no mid block, so that a code depends only on the pixels inside the conv
    # stack's receptive field (`receptive_field`) -- an edit then leaves the codes of cells far from
    # it as they were, and a flat region is one code, not a context-dependent set of synonyms.
    local: bool = False
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(self, "attn_levels", tuple(int(a) for a in self.attn_levels))
        bad = [a for a in self.attn_levels if not 0 <= a < len(self.ch_mult)]
        if bad:
            raise ValueError(f"MoVQConfig.attn_levels {bad} are outside levels 0..{len(self.ch_mult) - 1}")
        widths = [self.ch] + [self.ch * m for m in self.ch_mult]
        odd = sorted({w for w in widths if w % self.num_groups})
        if odd:
            raise ValueError(f"MoVQConfig: widths {odd} are not divisible by num_groups={self.num_groups}")
        if self.local and (self.attn_levels or self.zq_channels):
            raise ValueError(f"MoVQConfig: local=True is an encoder without attention; got attn_levels="
                             f"{self.attn_levels}, zq_channels={self.zq_channels} (expected () and 0)")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def receptive_field(self) -> int:
        """Side in pixels of the input window one encoder output position can see through the
        convolutions (nominal: every 3x3 conv widens it by 2 steps of the grid it runs on). Only
        the whole of it for a local encoder: otherwise norms and attention see the whole image."""
        rf, step = 3, 1  # conv_in
        for level in range(len(self.ch_mult)):
            rf += 4 * step * self.num_res_blocks  # two 3x3 convs per ResBlock
            if level != len(self.ch_mult) - 1:     # DC down block: conv3x3, then 2x2 pixel unshuffle
                rf += 2 * step + step
                step *= 2
        if not self.local:
            rf += 2 * 4 * step  # the mid block's two ResBlocks
        return rf + 2 * step    # conv_out

    @classmethod
    def official_encoder(cls, **overrides) -> "MoVQConfig":
        """The released DualViTok pixel encoder (27.16M parameters)."""
        return cls(**{**dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_levels=(4,), z_channels=32),
                      **overrides})

    @classmethod
    def official_decoder(cls, **overrides) -> "MoVQConfig":
        """The released DualViTok pixel decoder (476.36M parameters)."""
        return cls(**{**dict(ch=384, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_levels=(4,), z_channels=64,
                             zq_channels=64), **overrides})


def _call(block: nnx.Module, remat: bool) -> Callable:
    """block(h, zq) or its rematerialised form."""
    if not remat:
        return block
    return lambda h, zq=None: nnx.remat(lambda m, h, zq: m(h, zq))(block, h, zq)


class EncoderLevel(nnx.Module):
    def __init__(self, cin: int, cout: int, n_blocks: int, attn: bool, downsample: bool, cfg: MoVQConfig,
                 rngs: nnx.Rngs):
        kw = dict(num_groups=1 if cfg.local else cfg.num_groups, dtype=jnp.dtype(cfg.dtype),
                  param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
        self.block = nnx.List([ResBlock(cin if i == 0 else cout, cout, spatial_norm=not cfg.local, **kw)
                               for i in range(n_blocks)])
        self.attn = nnx.List([AttnBlock(cout, **kw) for _ in range(n_blocks)] if attn else [])
        self.downsample = (DCDownBlock2d(cout, dtype=kw["dtype"], param_dtype=kw["param_dtype"], rngs=rngs)
                           if downsample else None)


class DecoderLevel(nnx.Module):
    def __init__(self, cin: int, cout: int, n_blocks: int, attn: bool, upsample: bool, cfg: MoVQConfig,
                 rngs: nnx.Rngs):
        kw = dict(zq_channels=cfg.zq_channels, num_groups=cfg.num_groups, dtype=jnp.dtype(cfg.dtype),
                  param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
        self.block = nnx.List([ResBlock(cin if i == 0 else cout, cout, **kw) for i in range(n_blocks)])
        self.attn = nnx.List([AttnBlock(cout, **kw) for _ in range(n_blocks)] if attn else [])
        self.upsample = (DCUpBlock2d(cout, dtype=kw["dtype"], param_dtype=kw["param_dtype"], rngs=rngs)
                         if upsample else None)


class Mid(nnx.Module):
    def __init__(self, channels: int, cfg: MoVQConfig, rngs: nnx.Rngs):
        kw = dict(zq_channels=cfg.zq_channels, num_groups=cfg.num_groups, dtype=jnp.dtype(cfg.dtype),
                  param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
        self.block_1 = ResBlock(channels, channels, **kw)
        self.attn_1 = AttnBlock(channels, **kw)
        self.block_2 = ResBlock(channels, channels, **kw)

    def __call__(self, h: jax.Array, zq: jax.Array | None, remat: bool) -> jax.Array:
        for m in (self.block_1, self.attn_1, self.block_2):
            h = _call(m, remat)(h, zq)
        return h


class MoVQEncoder(nnx.Module):
    """Images [B,H,W,in_channels] -> z [B,H/16,W/16,z_channels] (for ch_mult of length 5)."""

    def __init__(self, cfg: MoVQConfig, *, rngs: nnx.Rngs):
        if cfg.zq_channels:
            raise ValueError("MoVQEncoder: zq_channels must be 0 (spatial norms are a decoder feature)")
        self.cfg = cfg
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        n = len(cfg.ch_mult)
        top = cfg.ch * cfg.ch_mult[-1]
        if top % cfg.z_channels:
            raise ValueError(f"MoVQEncoder: top width {top} is not a multiple of z_channels={cfg.z_channels} "
                             "(needed by the group-mean output shortcut)")
        self.conv_in = Conv2d(cfg.in_channels, cfg.ch, 3, dtype=dt, param_dtype=pdt, rngs=rngs)
        in_mult = (1,) + cfg.ch_mult
        self.down = nnx.List([
            EncoderLevel(cfg.ch * in_mult[l], cfg.ch * cfg.ch_mult[l], cfg.num_res_blocks, l in cfg.attn_levels,
                         l != n - 1, cfg, rngs) for l in range(n)])
        self.mid = None if cfg.local else Mid(top, cfg, rngs)
        self.norm_out = GroupNorm(top, num_groups=1 if cfg.local else cfg.num_groups, param_dtype=pdt,
                                  spatial=not cfg.local)
        self.conv_out = Conv2d(top, cfg.z_channels, 3, dtype=dt, param_dtype=pdt, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        d = cfg.downsample
        if x.ndim != 4 or x.shape[-1] != cfg.in_channels or x.shape[1] % d or x.shape[2] % d:
            raise ValueError(f"MoVQEncoder: expected [B,H,W,{cfg.in_channels}] with H, W multiples of {d}, "
                             f"got {x.shape}")
        h = self.conv_in(x)
        for level in self.down:
            for i, block in enumerate(level.block):
                h = _call(block, cfg.remat)(h)
                if len(level.attn):
                    h = _call(level.attn[i], cfg.remat)(h)
            if level.downsample is not None:
                h = level.downsample(h)
        if self.mid is not None:
            h = self.mid(h, None, cfg.remat)
        h = jax.nn.silu(self.norm_out(h))
        B, H, W, C = h.shape
        g = C // cfg.z_channels
        shortcut = h.reshape(B, H, W, cfg.z_channels, g).mean(-1, dtype=jnp.float32)
        out = self.conv_out(h)
        return out + shortcut.astype(out.dtype)


class MoVQDecoder(nnx.Module):
    """(z [B,h,w,z_channels], zq [B,h,w,zq_channels]) -> images [B,h*16,w*16,out_channels]."""

    def __init__(self, cfg: MoVQConfig, *, rngs: nnx.Rngs):
        if cfg.local:
            raise ValueError("MoVQDecoder: local=True is an encoder option (the decoder may see the whole code map)")
        self.cfg = cfg
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        n = len(cfg.ch_mult)
        top = cfg.ch * cfg.ch_mult[-1]
        if top % cfg.z_channels:
            raise ValueError(f"MoVQDecoder: top width {top} is not a multiple of z_channels={cfg.z_channels} "
                             "(needed by the channel-repeat input shortcut)")
        self.conv_in = Conv2d(cfg.z_channels, top, 3, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.mid = Mid(top, cfg, rngs)
        # up[l] is built from the top level down (its input is level l+1's output) but indexed by l.
        levels = [None] * n
        cin = top
        for l in reversed(range(n)):
            cout = cfg.ch * cfg.ch_mult[l]
            levels[l] = DecoderLevel(cin, cout, cfg.num_res_blocks + 1, l in cfg.attn_levels, l != 0, cfg, rngs)
            cin = cout
        self.up = nnx.List(levels)
        if cfg.zq_channels:
            self.norm_out = SpatialNorm(cin, cfg.zq_channels, num_groups=cfg.num_groups, dtype=dt, param_dtype=pdt,
                                        rngs=rngs)
        else:
            self.norm_out = GroupNorm(cin, num_groups=cfg.num_groups, param_dtype=pdt)
        self.conv_out = Conv2d(cin, cfg.out_channels, 3, dtype=dt, param_dtype=pdt, out_axis=None, rngs=rngs)

    def __call__(self, z: jax.Array, zq: jax.Array | None = None) -> jax.Array:
        cfg = self.cfg
        if z.ndim != 4 or z.shape[-1] != cfg.z_channels:
            raise ValueError(f"MoVQDecoder: z must be [B,h,w,{cfg.z_channels}], got {z.shape}")
        if cfg.zq_channels and (zq is None or zq.ndim != 4 or zq.shape[-1] != cfg.zq_channels):
            raise ValueError(f"MoVQDecoder: zq must be [B,h,w,{cfg.zq_channels}], got "
                             f"{None if zq is None else zq.shape}")
        if not cfg.zq_channels:
            zq = None
        h = self.conv_in(z)
        h = h + jnp.repeat(z, h.shape[-1] // z.shape[-1], axis=-1).astype(h.dtype)
        h = self.mid(h, zq, cfg.remat)
        for level in reversed(self.up):
            for i, block in enumerate(level.block):
                h = _call(block, cfg.remat)(h, zq)
                if len(level.attn):
                    h = _call(level.attn[i], cfg.remat)(h, zq)
            if level.upsample is not None:
                h = level.upsample(h)
        h = self.norm_out(h, zq) if zq is not None else self.norm_out(h)
        return self.conv_out(jax.nn.silu(h))


def create(cls: type[nnx.Module], cfg: MoVQConfig, mesh: jax.sharding.Mesh | None = None, seed: int = 0):
    """`cls(cfg)` (MoVQEncoder or MoVQDecoder) with every parameter created sharded inside jit;
    without a mesh, on one device (eager sharding needs a mesh)."""
    from illume_jax.sharding import make_mesh, use_mesh

    if mesh is None:
        mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    with use_mesh(mesh):
        return nnx.jit(lambda: cls(cfg, rngs=nnx.Rngs(seed)))()


def abstract(cls: type[nnx.Module], cfg: MoVQConfig, mesh: jax.sharding.Mesh | None = None) -> nnx.Module:
    """Shape-only `cls(cfg)` (nothing allocated; each value a ShapeDtypeStruct carrying its
    sharding): for parameter counts, converter checks and loading without a random init."""
    from illume_jax.sharding import make_mesh, use_mesh

    if mesh is None:
        mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    with use_mesh(mesh):
        return nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
