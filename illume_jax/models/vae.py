"""diffusers `AutoencoderKL` (the SD / SDXL / FLUX-style KL VAE) in Flax NNX, channels-last.

Why a port rather than a wrapper: the latent-diffusion paths of the project need the VAE
inside jit/sharding with our parameters, and checkpoints come as diffusers state dicts. The
math follows diffusers exactly (fp32 parity is tested against diffusers itself):

  encoder: conv_in, per level `layers_per_block` ResnetBlock2Ds and (all levels but the
           last) a Downsample2D = zero-pad right/bottom by 1 then a stride-2 3x3 conv with
           no padding; mid (Res, Attn, Res), GroupNorm, SiLU, conv_out -> 2*latent channels;
           then quant_conv (1x1) and the diagonal Gaussian: mean, logvar (clamped to [-30, 20]).
  decoder: post_quant_conv (1x1), conv_in, mid, levels top -> bottom with
           `layers_per_block + 1` ResnetBlock2Ds and (all but the last) nearest x2 upsampling
           plus a 3x3 conv, GroupNorm, SiLU, conv_out.

Every GroupNorm uses eps=1e-6; the mid attention is single-head over all positions with
scale 1/sqrt(C) (diffusers builds it with attention_head_dim = C), a residual and output
rescale 1. We reuse `conv.ResBlock` / `conv.AttnBlock` (same math; diffusers' Linear
to_q/to_k/to_v/to_out.0 become 1x1 convs); attribute names otherwise mirror diffusers'
state-dict keys (`encoder.down_blocks[i].resnets[j]`, `decoder.mid_block.attentions[0]`,
`downsamplers[0].conv`, ...) so `illume_jax.convert.vae` is a short rename table.

Latent scaling convention (what diffusers *pipelines* do around the VAE, not the VAE itself):
  model latents = (z - shift_factor) * scaling_factor                  (shift 0 when None)
  or, when latents_mean/latents_std are set (per channel),
  model latents = (z - latents_mean) * scaling_factor / latents_std
and the exact inverse before decoding. `latents_from_images` / `images_from_latents` apply it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from illume_jax.modules.conv import AttnBlock, Conv2d, GroupNorm, ResBlock

_DOWN_BLOCK = "DownEncoderBlock2D"
_UP_BLOCK = "UpDecoderBlock2D"
_SILU_NAMES = ("silu", "swish")  # diffusers' get_activation maps both to nn.SiLU
_FIELDS_FROM_DIFFUSERS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block",
                          "latent_channels", "norm_num_groups", "sample_size", "scaling_factor", "shift_factor",
                          "latents_mean", "latents_std", "force_upcast", "use_quant_conv", "use_post_quant_conv",
                          "mid_block_add_attention")


def _tuple_or_none(v):
    return None if v is None else tuple(float(x) for x in v)


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Fields named as in a diffusers `AutoencoderKL` config.json (defaults: the SD 1.x VAE
    with diffusers' constructor defaults where SD does not override them).

    `force_upcast` is recorded, not acted on: diffusers pipelines use it to run an fp16 VAE in
    fp32 (SDXL's VAE overflows in fp16); here the compute dtype is `dtype` alone (bf16 has
    fp32's exponent range, fp16 is not used). `sample_size` is only a tiling hint in diffusers
    and unused here."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215          # 0.18215 SD 1.x/2.x, 0.13025 SDXL
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    sample_size: Any = 512
    dtype: str = "float32"                   # compute dtype
    param_dtype: str = "float32"
    remat: bool = False                      # rematerialise each Res/Attn block in the backward pass

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        object.__setattr__(self, "latents_mean", _tuple_or_none(self.latents_mean))
        object.__setattr__(self, "latents_std", _tuple_or_none(self.latents_std))
        if isinstance(self.sample_size, list):
            object.__setattr__(self, "sample_size", tuple(self.sample_size))
        if not self.block_out_channels:
            raise ValueError("VAEConfig.block_out_channels must not be empty")
        if self.layers_per_block < 1:
            raise ValueError(f"VAEConfig.layers_per_block must be >= 1, got {self.layers_per_block}")
        odd = sorted({c for c in self.block_out_channels if c % self.norm_num_groups})
        if odd:
            raise ValueError(f"VAEConfig: block_out_channels {odd} are not divisible by "
                             f"norm_num_groups={self.norm_num_groups}")
        if (self.latents_mean is None) != (self.latents_std is None):
            raise ValueError("VAEConfig: latents_mean and latents_std must be given together")
        if self.latents_mean is not None:
            for name in ("latents_mean", "latents_std"):
                n = len(getattr(self, name))
                if n != self.latent_channels:
                    raise ValueError(f"VAEConfig.{name} has {n} entries, expected latent_channels="
                                     f"{self.latent_channels}")
            if self.shift_factor is not None:
                raise ValueError("VAEConfig: shift_factor and latents_mean/latents_std are both set; diffusers "
                                 "pipelines use one or the other, so the latent scaling would be ambiguous")
        jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)  # fail early on a bad dtype name

    @property
    def downsample(self) -> int:
        """Spatial reduction factor image -> latent (8 for the SD/SDXL VAE)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, cfg: Mapping[str, Any], **overrides) -> "VAEConfig":
        """From a diffusers AutoencoderKL `config.json` dict; keys starting with '_' are metadata.
        Any key or value this port does not implement raises a ValueError naming it;
        `overrides` set our own fields (dtype, param_dtype, remat)."""
        cls_name = cfg.get("_class_name", "AutoencoderKL")
        if cls_name != "AutoencoderKL":
            raise ValueError(f"VAEConfig.from_diffusers: _class_name {cls_name!r} is not supported "
                             "(only 'AutoencoderKL')")
        n = len(cfg.get("block_out_channels", (64,)))
        checks = {
            "down_block_types": lambda v: list(v) == [_DOWN_BLOCK] * n,
            "up_block_types": lambda v: list(v) == [_UP_BLOCK] * n,
            "act_fn": lambda v: v in _SILU_NAMES,
        }
        kwargs: dict[str, Any] = {}
        for key, value in cfg.items():
            if key.startswith("_"):
                continue
            if key in checks:
                if not checks[key](value):
                    want = {"down_block_types": f"{n} x {_DOWN_BLOCK!r}", "up_block_types": f"{n} x {_UP_BLOCK!r}",
                            "act_fn": "'silu'"}[key]
                    raise ValueError(f"VAEConfig.from_diffusers: unsupported {key}={value!r} (supported: {want})")
            elif key in _FIELDS_FROM_DIFFUSERS:
                kwargs[key] = value
            else:
                raise ValueError(f"VAEConfig.from_diffusers: unsupported config key {key!r}={value!r}")
        # diffusers' constructor defaults for keys an (old) config.json may omit
        defaults = dict(block_out_channels=(64,), layers_per_block=1, latent_channels=4, norm_num_groups=32,
                        sample_size=32, scaling_factor=0.18215, force_upcast=True)
        return cls(**{**defaults, **kwargs, **overrides})


def _call(block: nnx.Module, remat: bool) -> Callable:
    """block(h), or its rematerialised form."""
    if not remat:
        return block
    return lambda h: nnx.remat(lambda m, h: m(h))(block, h)


class Downsample2D(nnx.Module):
    """diffusers Downsample2D(padding=0): pad (left 0, right 1, top 0, bottom 1), conv3x3 stride 2."""

    def __init__(self, channels: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=0, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample2D(nnx.Module):
    """diffusers Upsample2D(use_conv=True): nearest x2 (each pixel repeated), conv3x3."""

    def __init__(self, channels: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.conv = Conv2d(channels, channels, 3, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class ResBlockStack(nnx.Module):
    """DownEncoderBlock2D / UpDecoderBlock2D: `resnets`, then an optional resampler in a
    one-element list (diffusers' `downsamplers.0` / `upsamplers.0`)."""

    def __init__(self, cin: int, cout: int, n: int, resample: type | None, attr: str, cfg: VAEConfig,
                 rngs: nnx.Rngs):
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.resnets = nnx.List([ResBlock(cin if i == 0 else cout, cout, num_groups=cfg.norm_num_groups, dtype=dt,
                                          param_dtype=pdt, rngs=rngs) for i in range(n)])
        self._attr = attr
        setattr(self, attr, nnx.List([resample(cout, dtype=dt, param_dtype=pdt, rngs=rngs)] if resample else []))

    def __call__(self, h: jax.Array, remat: bool) -> jax.Array:
        for block in self.resnets:
            h = _call(block, remat)(h)
        for r in getattr(self, self._attr):
            h = r(h)
        return h


class MidBlock2D(nnx.Module):
    """UNetMidBlock2D without time embedding: resnets[0], (attentions[0]), resnets[1]."""

    def __init__(self, channels: int, cfg: VAEConfig, rngs: nnx.Rngs):
        kw = dict(num_groups=cfg.norm_num_groups, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                  rngs=rngs)
        self.resnets = nnx.List([ResBlock(channels, channels, **kw) for _ in range(2)])
        self.attentions = nnx.List([AttnBlock(channels, **kw)] if cfg.mid_block_add_attention else [])

    def __call__(self, h: jax.Array, remat: bool) -> jax.Array:
        h = _call(self.resnets[0], remat)(h)
        for attn in self.attentions:
            h = _call(attn, remat)(h)
        return _call(self.resnets[1], remat)(h)


class Encoder(nnx.Module):
    """Images [B,H,W,in_channels] -> moments [B,H/d,W/d,2*latent_channels] (before quant_conv)."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        chs, n = cfg.block_out_channels, len(cfg.block_out_channels)
        self.conv_in = Conv2d(cfg.in_channels, chs[0], 3, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.down_blocks = nnx.List([
            ResBlockStack(chs[max(i - 1, 0)], chs[i], cfg.layers_per_block, Downsample2D if i != n - 1 else None,
                          "downsamplers", cfg, rngs) for i in range(n)])
        self.mid_block = MidBlock2D(chs[-1], cfg, rngs)
        self.conv_norm_out = GroupNorm(chs[-1], num_groups=cfg.norm_num_groups, eps=1e-6, param_dtype=pdt)
        # few output channels (8): left unsharded, like every other small in/out conv here
        self.conv_out = Conv2d(chs[-1], 2 * cfg.latent_channels, 3, dtype=dt, param_dtype=pdt, out_axis=None,
                               rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv_in(x)
        for blk in self.down_blocks:
            h = blk(h, self.cfg.remat)
        h = self.mid_block(h, self.cfg.remat)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))


class Decoder(nnx.Module):
    """Latents z [B,h,w,latent_channels] (after post_quant_conv) -> images [B,h*d,w*d,out_channels]."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        rev, n = cfg.block_out_channels[::-1], len(cfg.block_out_channels)
        self.conv_in = Conv2d(cfg.latent_channels, rev[0], 3, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.mid_block = MidBlock2D(rev[0], cfg, rngs)
        self.up_blocks = nnx.List([
            ResBlockStack(rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, Upsample2D if i != n - 1 else None,
                          "upsamplers", cfg, rngs) for i in range(n)])
        self.conv_norm_out = GroupNorm(rev[-1], num_groups=cfg.norm_num_groups, eps=1e-6, param_dtype=pdt)
        self.conv_out = Conv2d(rev[-1], cfg.out_channels, 3, dtype=dt, param_dtype=pdt, out_axis=None, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        h = self.conv_in(z)
        h = self.mid_block(h, self.cfg.remat)
        for blk in self.up_blocks:
            h = blk(h, self.cfg.remat)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))


class AutoencoderKL(nnx.Module):
    """diffusers AutoencoderKL, NHWC. Images are in [-1, 1]; `encode` gives the posterior
    (mean, logvar) in float32, `decode` images in float32 from *unscaled* VAE latents z.

    Pipeline-scaled ("model space") latents, as diffusers pipelines feed a diffusion model:
      latents_from_images(x, rng) = (z - shift_factor) * scaling_factor          (shift 0 if None)
                                  = (z - latents_mean) * scaling_factor / latents_std  (if set)
    with z the posterior mode (rng None) or a sample mean + exp(logvar/2) * eps,
    eps = jax.random.normal(rng, mean.shape, float32); `images_from_latents` inverts the
    scaling (latents / scaling_factor + shift, or latents * std / scaling_factor + mean) and decodes.
    """

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        lc = cfg.latent_channels
        self.encoder = Encoder(cfg, rngs=rngs)
        self.decoder = Decoder(cfg, rngs=rngs)
        self.quant_conv = (Conv2d(2 * lc, 2 * lc, 1, dtype=dt, param_dtype=pdt, out_axis=None, rngs=rngs)
                           if cfg.use_quant_conv else None)
        self.post_quant_conv = (Conv2d(lc, lc, 1, dtype=dt, param_dtype=pdt, out_axis=None, rngs=rngs)
                                if cfg.use_post_quant_conv else None)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images [B,H,W,in_channels] in [-1, 1] -> (mean, logvar), each [B,H/d,W/d,latent] fp32."""
        cfg = self.cfg
        if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
            raise ValueError(f"AutoencoderKL.encode: expected [B,H,W,{cfg.in_channels}], got {x.shape}")
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        h = h.astype(jnp.float32)
        mean, logvar = h[..., :cfg.latent_channels], h[..., cfg.latent_channels:]
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: jax.Array) -> jax.Array:
        """Unscaled latents [B,h,w,latent_channels] -> images [B,h*d,w*d,out_channels] fp32."""
        cfg = self.cfg
        if z.ndim != 4 or z.shape[-1] != cfg.latent_channels:
            raise ValueError(f"AutoencoderKL.decode: expected [B,h,w,{cfg.latent_channels}], got {z.shape}")
        z = z.astype(jnp.dtype(cfg.dtype))
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    @staticmethod
    def _posterior_draw(mean: jax.Array, logvar: jax.Array, rng: jax.Array | None) -> jax.Array:
        if rng is None:
            return mean
        return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, jnp.float32)

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """Reconstruction: decode(posterior sample with `rng`, or its mode when rng is None)."""
        return self.decode(self._posterior_draw(*self.encode(x), rng))

    def scale_latents(self, z: jax.Array) -> jax.Array:
        """Unscaled VAE latents -> model-space latents (see the class docstring)."""
        cfg = self.cfg
        z = z.astype(jnp.float32)
        if cfg.latents_mean is not None:
            mean, std = jnp.asarray(cfg.latents_mean, jnp.float32), jnp.asarray(cfg.latents_std, jnp.float32)
            return (z - mean) * cfg.scaling_factor / std
        return (z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor

    def unscale_latents(self, latents: jax.Array) -> jax.Array:
        """Inverse of `scale_latents`."""
        cfg = self.cfg
        latents = latents.astype(jnp.float32)
        if cfg.latents_mean is not None:
            mean, std = jnp.asarray(cfg.latents_mean, jnp.float32), jnp.asarray(cfg.latents_std, jnp.float32)
            return latents * std / cfg.scaling_factor + mean
        return latents / cfg.scaling_factor + (cfg.shift_factor or 0.0)

    def latents_from_images(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """Images in [-1, 1] -> model-space latents (posterior mode, or a sample when rng is given)."""
        return self.scale_latents(self._posterior_draw(*self.encode(x), rng))

    def images_from_latents(self, latents: jax.Array) -> jax.Array:
        """Model-space latents -> images in (about) [-1, 1], fp32."""
        return self.decode(self.unscale_latents(latents))


def _one_device_mesh() -> jax.sharding.Mesh:
    from illume_jax.sharding import make_mesh
    return make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


def create(cfg: VAEConfig, mesh: jax.sharding.Mesh | None = None, seed: int = 0) -> AutoencoderKL:
    """`AutoencoderKL(cfg)` with every parameter created sharded inside jit; without a mesh, on
    one device (eager sharding needs a mesh). The init is torch's default conv init, so a
    checkpoint is normally loaded on top (see `illume_jax.convert.vae`)."""
    from illume_jax.sharding import use_mesh

    with use_mesh(mesh or _one_device_mesh()):
        return nnx.jit(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(seed)))()


def abstract(cfg: VAEConfig, mesh: jax.sharding.Mesh | None = None) -> AutoencoderKL:
    """Shape-only `AutoencoderKL(cfg)` (each value a ShapeDtypeStruct carrying its sharding):
    for parameter counts, converter checks and loading without a random init."""
    from illume_jax.sharding import use_mesh

    with use_mesh(mesh or _one_device_mesh()):
        return nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
