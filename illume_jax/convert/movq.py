"""PyTorch MoVQ pixel encoder/decoder state dicts (DualViTok `pixel_encoder.*`, `pixel_decoder.*`,
spec §6.1) -> our `MoVQEncoder` / `MoVQDecoder` parameters.

Our attribute names mirror the torch module names, so a key's module path is our path with
'.' -> '/' (list indices become ints); only the leaf name and layout change, and those are the
rows of `_TABLE`. Conv weights go OIHW -> HWIO, 2-D Linear weights (out, in) -> (in, out),
GroupNorm weight -> scale. Every tensor under the prefix must find a parameter and every
parameter a tensor, with the expected shape; errors name the offending keys.
Tensors may be torch tensors or numpy arrays (read checkpoints with safetensors or
`torch.load(weights_only=True)`, never plain pickle).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx

from illume_jax.models import movq

Path = tuple[Any, ...]


def _weight(w: np.ndarray) -> np.ndarray:
    if w.ndim == 4:
        return w.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if w.ndim == 2:
        return w.T  # Linear (out, in) -> (in, out)
    raise ValueError(f"expected a 4-D conv or 2-D linear weight, got shape {w.shape}")


_LAYOUT = {"same": lambda w: w, "weight": _weight}

# (torch key regex, our leaf path (re.sub template, '.'-separated), layout); first match wins.
_TABLE: tuple[tuple[re.Pattern, str, str], ...] = tuple((re.compile(p), t, k) for p, t, k in (
    (r"^(.*\bnorm(?:1|2|_out|_layer)?)\.weight$", r"\1.scale", "same"),  # GroupNorm affine (also in SpatialNorm)
    (r"^(.*)\.weight$", r"\1.kernel", "weight"),                          # Conv2d (1x1 and 3x3)
    (r"^(.*)\.bias$", r"\1.bias", "same"),                                # Conv2d / GroupNorm bias
))


def _to_numpy(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):  # torch.Tensor (bf16/fp16 -> fp32 on the way: numpy has no bf16)
        v = v.detach().cpu()
        if v.is_floating_point():
            v = v.float()
        v = v.numpy()
    return np.asarray(v)


def _path(dotted: str) -> Path:
    return tuple(int(p) if p.isdigit() else p for p in dotted.split("."))


def _fmt(path: Path) -> str:
    return "/".join(str(p) for p in path)


def unwrap_state_dict(sd: Mapping[str, Any]) -> Mapping[str, Any]:
    """A raw state dict, or one nested under 'ema' / 'model' / 'state_dict' (official loaders' order)."""
    for k in ("ema", "model", "state_dict"):
        if k in sd and isinstance(sd[k], Mapping):
            return sd[k]
    return sd


def map_key(key: str) -> tuple[Path, str]:
    """Torch key without prefix (e.g. 'up.4.upsample.conv.weight') -> (our path, layout name)."""
    for pattern, template, layout in _TABLE:
        if pattern.match(key):
            return _path(pattern.sub(template, key)), layout
    raise ValueError(f"no conversion rule for torch key {key!r}")


def check_fit(what: str, prefix: str, missing: list, unexpected: list, mismatched: list) -> None:
    """One error naming every missing, unexpected and wrong-shape tensor (shared by the torch converters)."""
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    if mismatched:
        problems.append(f"shape mismatches {mismatched}")
    if problems:
        raise ValueError(f"{what} state dict (prefix {prefix!r}) does not fit the model: " + "; ".join(problems))


def params_from_torch(state_dict: Mapping[str, Any], prefix: str,
                      expected: Mapping[Path, tuple[int, ...]]) -> dict[Path, np.ndarray]:
    """Torch tensors under `prefix` -> {our path: array}, checked against `expected` shapes.

    Keys outside the prefix are ignored (a whole DualViTok state dict may be passed)."""
    sd = unwrap_state_dict(state_dict)
    out: dict[Path, np.ndarray] = {}
    unexpected, mismatched, seen = [], [], set()
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
        seen.add(path)
        w = _to_numpy(value)
        try:
            new = _LAYOUT[layout](w)
        except ValueError as e:
            mismatched.append(f"{key}: {e}")
            continue
        if tuple(new.shape) != tuple(expected[path]):
            mismatched.append(f"{key} -> {_fmt(path)}: expected {tuple(expected[path])} "
                              f"(torch layout {_torch_shape(tuple(expected[path]), layout)}), found {tuple(w.shape)}")
            continue
        out[path] = new
    missing = [f"{prefix}{_torch_key(p)} (for {_fmt(p)})" for p in expected if p not in seen]
    check_fit("MoVQ", prefix, missing, unexpected, mismatched)
    return out


def _torch_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    if layout == "weight" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if layout == "weight" and len(shape) == 2:
        return (shape[1], shape[0])
    return shape


def _torch_key(path: Path) -> str:
    """Our path -> the torch key it comes from (inverse of `map_key`, for messages and export)."""
    *mod, leaf = (str(p) for p in path)
    leaf = {"scale": "weight", "kernel": "weight"}.get(leaf, leaf)
    return ".".join(mod + [leaf])


def expected_shapes(module: nnx.Module) -> dict[Path, tuple[int, ...]]:
    """{path: shape} of a module's parameters (works on abstract modules from nnx.eval_shape)."""
    flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
    return {tuple(p): tuple(v.get_value().shape) for p, v in flat}


def nest(flat: Mapping[Path, np.ndarray]) -> dict:
    """{(a, 0, b): x} -> {'a': {0: {'b': x}}} (the nested layout of nnx.State)."""
    out: dict = {}
    for path, v in flat.items():
        d = out
        for p in path[:-1]:
            d = d.setdefault(p, {})
        d[path[-1]] = v
    return out


def encoder_params_from_torch(state_dict: Mapping[str, Any], prefix: str = "pixel_encoder.", *,
                              cfg: movq.MoVQConfig | None = None) -> dict:
    """Nested {name: {...: array}} params of `MoVQEncoder(cfg)` (default: the released config)."""
    cfg = cfg or movq.MoVQConfig.official_encoder()
    return nest(params_from_torch(state_dict, prefix, expected_shapes(movq.abstract(movq.MoVQEncoder, cfg))))


def decoder_params_from_torch(state_dict: Mapping[str, Any], prefix: str = "pixel_decoder.", *,
                              cfg: movq.MoVQConfig | None = None) -> dict:
    """Nested params of `MoVQDecoder(cfg)` (default: the released config)."""
    cfg = cfg or movq.MoVQConfig.official_decoder()
    return nest(params_from_torch(state_dict, prefix, expected_shapes(movq.abstract(movq.MoVQDecoder, cfg))))


def _one_device_mesh() -> jax.sharding.Mesh:
    from illume_jax.sharding import make_mesh
    return make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


def load_torch_state(module: nnx.Module, state_dict: Mapping[str, Any], prefix: str = "",
                     mesh: jax.sharding.Mesh | None = None) -> nnx.Module:
    """Copies the torch tensors under `prefix` into `module` (a MoVQEncoder/MoVQDecoder or any
    part of one, e.g. a ResBlock) in place and returns it. Concrete parameters keep their dtype
    and sharding; abstract ones (from `nnx.eval_shape`) get their logical sharding on `mesh`
    (default: one device), so a model can be loaded without running a random init."""
    state = nnx.state(module, nnx.Param)
    flat = {tuple(p): v for p, v in nnx.to_flat_state(state)}
    params = params_from_torch(state_dict, prefix, {p: tuple(v.get_value().shape) for p, v in flat.items()})
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


def create_from_torch(cls: type[nnx.Module], cfg: movq.MoVQConfig, state_dict: Mapping[str, Any],
                      prefix: str = "", mesh: jax.sharding.Mesh | None = None) -> nnx.Module:
    """`cls(cfg)` (MoVQEncoder / MoVQDecoder) built straight from torch tensors, each placed with
    its logical sharding on `mesh` (default: one device); no random init is run or compiled."""
    mesh = mesh or _one_device_mesh()
    return load_torch_state(movq.abstract(cls, cfg, mesh), state_dict, prefix, mesh)


def flat_to_torch(flat: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    """{'/'-joined path: array} of a MoVQ encoder/decoder -> torch-layout arrays under torch keys."""
    out = {}
    for path, w in flat.items():  # numpy, or abstract arrays under jax.eval_shape
        parts = tuple(int(p) if p.isdigit() else p for p in path.split("/"))
        if parts[-1] == "kernel":
            w = w.transpose(3, 2, 0, 1) if w.ndim == 4 else w.T
        out[prefix + _torch_key(parts)] = w
    return out


def params_to_torch(module: nnx.Module, prefix: str = "") -> dict[str, np.ndarray]:
    """Inverse direction: our parameters -> torch-layout numpy arrays under torch key names."""
    return flat_to_torch({_fmt(tuple(p)): np.asarray(jax.device_get(v.get_value()))
                          for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}, prefix)
