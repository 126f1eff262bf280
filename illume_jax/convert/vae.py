"""diffusers `AutoencoderKL` state dicts <-> our `illume_jax.models.vae.AutoencoderKL` parameters.

Our module paths mirror diffusers' key names except where we reuse the shared conv blocks, so
the conversion is a table of renames plus layouts:
  ResnetBlock2D `conv_shortcut`                 -> ResBlock `nin_shortcut`
  Attention `group_norm`, `to_q/k/v`, `to_out.0` -> AttnBlock `norm`, `q/k/v`, `proj_out`
    (also the pre-0.14 names `query/key/value/proj_attn`, read only)
  GroupNorm weight -> scale; Conv2d weight OIHW -> HWIO kernel; attention Linear weight
  (out, in) -> 1x1 HWIO kernel (1, 1, in, out) (same math as AttnBlock's 1x1 convs).
Every tensor under the prefix must find a parameter and every parameter a tensor, with the
expected shape; errors name the offending keys. Export (`params_to_diffusers`) writes the
current diffusers names and is an exact inverse.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx

from illume_jax.convert.movq import (Path, _fmt, _one_device_mesh, _path, _to_numpy, check_fit, expected_shapes,
                                     nest, unwrap_state_dict)
from illume_jax.models import vae


def _conv(w: np.ndarray) -> np.ndarray:
    if w.ndim != 4:
        raise ValueError(f"expected a 4-D conv weight (O, I, kH, kW), got shape {w.shape}")
    return w.transpose(2, 3, 1, 0)


def _linear_1x1(w: np.ndarray) -> np.ndarray:
    if w.ndim == 4 and w.shape[2:] == (1, 1):  # some old checkpoints store these as 1x1 convs
        w = w[:, :, 0, 0]
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D linear weight (out, in), got shape {w.shape}")
    return w.T[None, None]


_LAYOUT = {"same": lambda w: w, "conv": _conv, "linear_1x1": _linear_1x1}
_INVERSE = {"same": lambda w: w, "conv": lambda w: w.transpose(3, 2, 0, 1), "linear_1x1": lambda w: w[0, 0].T}

_ATTN = r"^(.*\.attentions\.\d+)\."
_QKV = {"to_q": "q", "to_k": "k", "to_v": "v", "query": "q", "key": "k", "value": "v"}

# (torch key regex, our leaf path (re.sub template, '.'-separated), layout); first match wins.
_TABLE: tuple[tuple[re.Pattern, str, str], ...] = tuple((re.compile(p), t, k) for p, t, k in (
    (_ATTN + r"group_norm\.weight$", r"\1.norm.scale", "same"),
    (_ATTN + r"group_norm\.bias$", r"\1.norm.bias", "same"),
    (_ATTN + r"(to_q|to_k|to_v|query|key|value)\.weight$", r"\1.<\2>.kernel", "linear_1x1"),
    (_ATTN + r"(to_q|to_k|to_v|query|key|value)\.bias$", r"\1.<\2>.bias", "same"),
    (_ATTN + r"(?:to_out\.0|proj_attn)\.weight$", r"\1.proj_out.kernel", "linear_1x1"),
    (_ATTN + r"(?:to_out\.0|proj_attn)\.bias$", r"\1.proj_out.bias", "same"),
    (r"^(.*)\.conv_shortcut\.weight$", r"\1.nin_shortcut.kernel", "conv"),
    (r"^(.*)\.conv_shortcut\.bias$", r"\1.nin_shortcut.bias", "same"),
    (r"^(.*\b(?:norm1|norm2|conv_norm_out))\.weight$", r"\1.scale", "same"),  # GroupNorm affine
    (r"^(.*)\.weight$", r"\1.kernel", "conv"),                                 # Conv2d (1x1 and 3x3)
    (r"^(.*)\.bias$", r"\1.bias", "same"),                                     # Conv2d / GroupNorm bias
))

# our path (dotted) -> diffusers key, for export and messages; first match wins.
_INVERSE_TABLE: tuple[tuple[re.Pattern, str, str], ...] = tuple((re.compile(p), t, k) for p, t, k in (
    (_ATTN + r"norm\.scale$", r"\1.group_norm.weight", "same"),
    (_ATTN + r"norm\.bias$", r"\1.group_norm.bias", "same"),
    (_ATTN + r"([qkv])\.kernel$", r"\1.to_\2.weight", "linear_1x1"),
    (_ATTN + r"([qkv])\.bias$", r"\1.to_\2.bias", "same"),
    (_ATTN + r"proj_out\.kernel$", r"\1.to_out.0.weight", "linear_1x1"),
    (_ATTN + r"proj_out\.bias$", r"\1.to_out.0.bias", "same"),
    (r"^(.*)\.nin_shortcut\.kernel$", r"\1.conv_shortcut.weight", "conv"),
    (r"^(.*)\.nin_shortcut\.bias$", r"\1.conv_shortcut.bias", "same"),
    (r"^(.*)\.scale$", r"\1.weight", "same"),
    (r"^(.*)\.kernel$", r"\1.weight", "conv"),
    (r"^(.*)\.bias$", r"\1.bias", "same"),
))


def map_key(key: str) -> tuple[Path, str]:
    """diffusers key without prefix (e.g. 'decoder.mid_block.attentions.0.to_q.weight') ->
    (our path, layout name)."""
    for pattern, template, layout in _TABLE:
        m = pattern.match(key)
        if m:
            dotted = m.expand(template)
            dotted = re.sub(r"<(\w+)>", lambda g: _QKV[g.group(1)], dotted)
            return _path(dotted), layout
    raise ValueError(f"no conversion rule for diffusers key {key!r}")


def torch_key(path: Path) -> tuple[str, str]:
    """Our path -> (diffusers key, layout): the inverse of `map_key` for current diffusers names."""
    dotted = ".".join(str(p) for p in path)
    for pattern, template, layout in _INVERSE_TABLE:
        m = pattern.match(dotted)
        if m:
            return m.expand(template), layout
    raise ValueError(f"no diffusers name for parameter {_fmt(path)}")


def _torch_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    if layout == "conv":
        return (shape[3], shape[2], shape[0], shape[1])
    if layout == "linear_1x1":
        return (shape[3], shape[2])
    return shape


def params_from_torch(state_dict: Mapping[str, Any], expected: Mapping[Path, tuple[int, ...]],
                      prefix: str = "") -> dict[Path, np.ndarray]:
    """diffusers tensors under `prefix` -> {our path: array}, checked against `expected` shapes.
    Keys outside the prefix are ignored (e.g. a whole pipeline's state dict with prefix 'vae.')."""
    sd = unwrap_state_dict(state_dict)
    out: dict[Path, np.ndarray] = {}
    unexpected, mismatched, seen = [], [], {}
    for key, value in sd.items():
        if not key.startswith(prefix):
            continue
        sub = key[len(prefix):]
        try:
            path, layout = map_key(sub)
        except ValueError:
            unexpected.append(key)
            continue
        if path not in expected:
            unexpected.append(key)
            continue
        if path in seen:  # e.g. both 'to_q' and the legacy 'query' for one parameter
            unexpected.append(f"{key} (duplicates {seen[path]})")
            continue
        seen[path] = key
        w = _to_numpy(value)
        try:
            new = _LAYOUT[layout](w)
        except ValueError as e:
            mismatched.append(f"{key}: {e}")
            continue
        if tuple(new.shape) != tuple(expected[path]):
            mismatched.append(f"{key} -> {_fmt(path)}: expected {_torch_shape(tuple(expected[path]), layout)} "
                              f"(ours {tuple(expected[path])}), found {tuple(w.shape)}")
            continue
        out[path] = new
    missing = [f"{prefix}{torch_key(p)[0]} (for {_fmt(p)})" for p in expected if p not in seen]
    check_fit("diffusers AutoencoderKL", prefix, missing, unexpected, mismatched)
    return out


def params_from_diffusers(state_dict: Mapping[str, Any], cfg: vae.VAEConfig, prefix: str = "") -> dict:
    """Nested {name: {...: array}} params of `AutoencoderKL(cfg)` (the nnx.State layout)."""
    return nest(params_from_torch(state_dict, expected_shapes(vae.abstract(cfg)), prefix))


def load_diffusers_state(module: nnx.Module, state_dict: Mapping[str, Any], prefix: str = "",
                         mesh: jax.sharding.Mesh | None = None) -> nnx.Module:
    """Copies the diffusers tensors under `prefix` into `module` (an AutoencoderKL, or a part of
    one with the matching key prefix) in place and returns it. Concrete parameters keep their
    dtype and sharding; abstract ones (from `vae.abstract`) get their logical sharding on `mesh`
    (default: one device), so a model is loaded without running a random init."""
    state = nnx.state(module, nnx.Param)
    flat = {tuple(p): v for p, v in nnx.to_flat_state(state)}
    params = params_from_torch(state_dict, {p: tuple(v.get_value().shape) for p, v in flat.items()}, prefix)
    for path, var in flat.items():
        old = var.get_value()
        if isinstance(old, jax.ShapeDtypeStruct):
            mesh = mesh or _one_device_mesh()
            spec = getattr(old.sharding, "spec", None) or jax.sharding.PartitionSpec()
            target = jax.sharding.NamedSharding(mesh, spec)
        else:
            target = old.sharding
        var.set_value(jax.device_put(params[path].astype(old.dtype), target))
    nnx.update(module, state)
    return module


def create_from_diffusers(cfg: vae.VAEConfig, state_dict: Mapping[str, Any], prefix: str = "",
                          mesh: jax.sharding.Mesh | None = None) -> vae.AutoencoderKL:
    """`AutoencoderKL(cfg)` built straight from a diffusers state dict, each parameter placed
    with its logical sharding on `mesh` (default: one device)."""
    mesh = mesh or _one_device_mesh()
    return load_diffusers_state(vae.abstract(cfg, mesh), state_dict, prefix, mesh)


def params_to_diffusers(module: nnx.Module, prefix: str = "") -> dict[str, np.ndarray]:
    """Our parameters -> diffusers-layout numpy arrays under current diffusers key names
    (load into torch with `model.load_state_dict({k: torch.from_numpy(v) ...})`)."""
    out = {}
    for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        key, layout = torch_key(tuple(p))
        out[prefix + key] = np.array(_INVERSE[layout](np.asarray(jax.device_get(v.get_value()))), order="C")
    return out
