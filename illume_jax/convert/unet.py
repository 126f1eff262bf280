"""diffusers `UNet2DConditionModel` state dicts <-> our `illume_jax.models.unet.UNet` parameters.

`UNet` names its attributes after diffusers' modules, so a key's module path is our path with
'.' -> '/' (list indices become ints: `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`,
`ff.net.0.proj`, `to_out.0`, `downsamplers.0.conv`); only the leaf name and layout change, and
those are the three rows of `_TABLE`. Layouts: conv weights OIHW -> HWIO; Linear weights
(out, in) -> (in, out), then reshaped into the Dense kernel's multi-axis shape (to_q (D, N, H),
to_out (N, H, D), GEGLU proj (D, 2, F) — torch's row order [hidden; gate] is the (2, F) split);
biases are reshaped likewise; GroupNorm / LayerNorm weight -> scale. Every tensor must find a
parameter and every parameter a tensor of the expected torch shape; errors name the keys.
Tensors may be torch tensors or numpy arrays (load checkpoints with safetensors).
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx

# Key/path helpers shared by every torch converter live in convert/movq.py (the first of them).
from illume_jax.convert.movq import Path, _fmt, _one_device_mesh, _path, _to_numpy, check_fit, nest
from illume_jax.models import unet

# (torch key regex, our leaf path (re.sub template, '.'-separated), layout); first match wins.
_TABLE: tuple[tuple[re.Pattern, str, str], ...] = tuple((re.compile(p), t, k) for p, t, k in (
    (r"^(.*\b(?:norm[123]?|conv_norm_out))\.weight$", r"\1.scale", "same"),  # GroupNorm / LayerNorm affine
    (r"^(.*)\.weight$", r"\1.kernel", "weight"),                             # Conv2d / Linear
    (r"^(.*)\.bias$", r"\1.bias", "bias"),
))


def map_key(key: str) -> tuple[Path, str]:
    """diffusers key (e.g. 'mid_block.attentions.0.proj_in.weight') -> (our path, layout name)."""
    for pattern, template, layout in _TABLE:
        if pattern.match(key):
            return _path(pattern.sub(template, key)), layout
    raise ValueError(f"no conversion rule for diffusers key {key!r}")


def _torch_key(path: Path) -> str:
    """Our path -> the diffusers key it comes from (inverse of `map_key`)."""
    *mod, leaf = (str(p) for p in path)
    leaf = {"scale": "weight", "kernel": "weight"}.get(leaf, leaf)
    return ".".join(mod + [leaf])


def _linear_in_dims(path: Path) -> int:
    """Input axes of a Dense kernel: 2 for attention outputs (heads, head_dim), else 1."""
    return 2 if "to_out" in path else 1


def torch_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The diffusers tensor shape behind our parameter `path` of shape `shape`."""
    if path[-1] == "kernel":
        if len(shape) == 4:
            return (shape[3], shape[2], shape[0], shape[1])
        k = _linear_in_dims(path)
        return (math.prod(shape[k:]), math.prod(shape[:k]))
    if path[-1] == "bias":
        return (math.prod(shape),)
    return tuple(shape)


def _from_torch(w: np.ndarray, path: Path, shape: tuple[int, ...]) -> np.ndarray:
    if path[-1] == "kernel" and len(shape) == 4:
        return w.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if path[-1] == "kernel":
        return w.T.reshape(shape)
    return w.reshape(shape)


def _to_torch(w: np.ndarray, path: Path) -> np.ndarray:
    if path[-1] == "kernel" and w.ndim == 4:
        return w.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    if path[-1] == "kernel":
        k = _linear_in_dims(path)
        return w.reshape(math.prod(w.shape[:k]), math.prod(w.shape[k:])).T
    if path[-1] == "bias":
        return w.reshape(-1)
    return w


def expected_shapes(module: nnx.Module) -> dict[Path, tuple[int, ...]]:
    """{path: shape} of a module's parameters (works on abstract modules from nnx.eval_shape)."""
    flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
    return {tuple(p): tuple(v.get_value().shape) for p, v in flat}


def params_from_torch(state_dict: Mapping[str, Any], expected: Mapping[Path, tuple[int, ...]],
                      prefix: str = "") -> dict[Path, np.ndarray]:
    """diffusers tensors under `prefix` -> {our path: array}, checked against `expected` shapes.
    Keys outside the prefix are ignored."""
    out: dict[Path, np.ndarray] = {}
    unexpected, mismatched, seen = [], [], set()
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        try:
            path, _ = map_key(key[len(prefix):])
        except ValueError:
            unexpected.append(key)
            continue
        if path not in expected:
            unexpected.append(key)
            continue
        seen.add(path)
        w = _to_numpy(value)
        want = torch_shape(path, expected[path])
        if tuple(w.shape) != want:
            mismatched.append(f"{key} -> {_fmt(path)}: expected {want} (ours {tuple(expected[path])}), "
                              f"found {tuple(w.shape)}")
            continue
        out[path] = _from_torch(w, path, tuple(expected[path]))
    missing = [f"{prefix}{_torch_key(p)} (for {_fmt(p)})" for p in expected if p not in seen]
    check_fit("diffusers UNet", prefix, missing, unexpected, mismatched)
    return out


def params_from_diffusers(state_dict: Mapping[str, Any], cfg: unet.UNetConfig, prefix: str = "") -> dict:
    """Nested {name: {...: array}} parameters of `UNet(cfg)` from a diffusers state dict."""
    return nest(params_from_torch(state_dict, expected_shapes(unet.abstract(cfg)), prefix))


def load_diffusers_state(module: nnx.Module, state_dict: Mapping[str, Any], prefix: str = "",
                         mesh: jax.sharding.Mesh | None = None) -> nnx.Module:
    """Copies the diffusers tensors into `module` (a UNet or any part of one, e.g. a
    ResnetBlock2D with the matching sub-dict) in place and returns it. Concrete parameters keep
    their dtype and sharding; abstract ones (from `unet.abstract` / `nnx.eval_shape`) get their
    logical sharding on `mesh` (default: one device), so no random init is run."""
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


def create_from_diffusers(cfg: unet.UNetConfig, state_dict: Mapping[str, Any], prefix: str = "",
                          mesh: jax.sharding.Mesh | None = None) -> unet.UNet:
    """`UNet(cfg)` built straight from diffusers tensors, each placed with its logical sharding on
    `mesh` (default: one device)."""
    mesh = mesh or _one_device_mesh()
    return load_diffusers_state(unet.abstract(cfg, mesh), state_dict, prefix, mesh)


def params_to_diffusers(module: nnx.Module, prefix: str = "") -> dict[str, np.ndarray]:
    """Inverse direction: our parameters -> diffusers-layout numpy arrays under diffusers key names."""
    out = {}
    for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        path = tuple(p)
        out[prefix + _torch_key(path)] = _to_torch(np.asarray(jax.device_get(v.get_value())), path)
    return out
