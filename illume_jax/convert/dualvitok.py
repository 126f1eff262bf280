"""Official DualViTok state dicts (spec §6.1) <-> our `DualViTok` variables (Params and the frozen
codebook Buffers), as flat dicts keyed by our '/'-joined variable paths.

Layouts (torch -> ours; `to_official` is the exact inverse, so a round trip is bit-exact):
- `semantic_encoder.model.*` (Qwen2-VL ViT) -> `semantic_encoder/vit/*` via `hf_vit.qwen2vit_from_torch`:
  Conv3d patch embed (D,C,t,p,p) -> (C*t*p*p, D); per-block tensors stacked on a leading 'layers'
  axis; fused qkv (3D,D) -> (D,3,N,H); attn proj (D,D) -> (N,H,D); Linear (out,in) -> (in,out).
- `semantic_{encoder,decoder}.blocks.{i}.*` -> `.../blocks/blocks/*` via `hf_vit.vision_blocks_from_torch`.
- `pixel_{encoder,decoder}.*` -> `pixel_{encoder,decoder}/*` via `convert.movq` (conv OIHW -> HWIO,
  GroupNorm weight -> scale).
- single tensors (`_SINGLE`): 1x1 convs (proj_in, pixel_quant_conv, pixel_post_quant_conv) are our
  Dense layers, (out,in,1,1) -> (in,out); Linears (out,in) -> (in,out); SimVQ `frozen_codebook` (K,D)
  copied as is; `code_transform.weight` transposed; `semantic_decoder.proj_out.{0,1}` are our
  `proj_out` and `norm_out`.
Non-persistent buffers (rotary inv_freq, position_ids) are ignored. Values are read one key at a
time through lazy proxies (the state dict may be a lazy reader over a multi-GB file); every
missing, unexpected and wrong-shape tensor is named in one ValueError (expected vs found).
"""
from __future__ import annotations

import functools
import re
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx

from illume_jax.convert import hf_vit
from illume_jax.convert import movq as conv_movq
from illume_jax.models import dualvitok

# (official key, our path, layout)
_SINGLE = (
    ("semantic_encoder.proj_in.weight", "semantic_encoder/proj_in/kernel", "conv1x1"),
    ("semantic_encoder.proj_in.bias", "semantic_encoder/proj_in/bias", "copy"),
    ("semantic_encoder.proj_out.0.weight", "semantic_encoder/proj_out/kernel", "linear"),
    ("semantic_encoder.proj_out.0.bias", "semantic_encoder/proj_out/bias", "copy"),
    *((f"{q}_quantizer.frozen_codebook", f"{q}_quantizer/frozen_codebook", "copy") for q in ("semantic", "pixel")),
    *((f"{q}_quantizer.code_transform.weight", f"{q}_quantizer/code_transform/kernel", "linear")
      for q in ("semantic", "pixel")),
    *((f"{m}.{leaf}", f"{m}/{'kernel' if leaf == 'weight' else 'bias'}", "conv1x1" if leaf == "weight" else "copy")
      for m in ("pixel_quant_conv", "pixel_post_quant_conv") for leaf in ("weight", "bias")),
    ("semantic_decoder.proj_in.weight", "semantic_decoder/proj_in/kernel", "linear"),
    ("semantic_decoder.proj_in.bias", "semantic_decoder/proj_in/bias", "copy"),
    ("semantic_decoder.proj_out.0.weight", "semantic_decoder/proj_out/kernel", "linear"),
    ("semantic_decoder.proj_out.0.bias", "semantic_decoder/proj_out/bias", "copy"),
    ("semantic_decoder.proj_out.1.weight", "semantic_decoder/norm_out/scale", "copy"),
    ("semantic_decoder.proj_out.1.bias", "semantic_decoder/norm_out/bias", "copy"),
)
_FROM = {"copy": lambda w: w, "linear": lambda w: w.T, "conv1x1": lambda w: w[:, :, 0, 0].T}
_TO = {"copy": lambda w: w, "linear": lambda w: w.T, "conv1x1": lambda w: w.T[:, :, None, None]}

# Sub-trees converted by the existing converters: (official prefix, our prefix, converter kind).
_SUBTREES = (
    ("semantic_encoder.model.", "semantic_encoder/vit/", "qwen2vit"),
    ("semantic_encoder.blocks.", "semantic_encoder/blocks/", "blocks"),
    ("semantic_decoder.blocks.", "semantic_decoder/blocks/", "blocks"),
    ("pixel_encoder.", "pixel_encoder/", "movq"),
    ("pixel_decoder.", "pixel_decoder/", "movq"),
)
_IGNORED = re.compile(r"(^|\.)(position_ids|inv_freq|original_inv_freq)$")


def _no_decoder(d: Mapping, sep: str) -> dict:
    return {k: v for k, v in d.items() if not k.startswith("semantic_decoder" + sep)}


_CACHE: dict[tuple[str, str], dict] = {}  # (what, repr(cfg)) -> result (configs may hold lists: no hash)


def _cached(what: str, cfg, make) -> dict:
    key = (what, repr(cfg))
    return dict(_CACHE[key] if key in _CACHE else _CACHE.setdefault(key, make()))


def _abstract_flat(cfg: dualvitok.DualViTokConfig) -> dict[str, jax.ShapeDtypeStruct]:
    """Our variable paths -> shape/dtype, from a shape-only DualViTok (nothing allocated)."""
    def make():
        from illume_jax.sharding import make_mesh, use_mesh
        with use_mesh(make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])):
            model = nnx.eval_shape(lambda: dualvitok.DualViTok(cfg, rngs=nnx.Rngs(0)))
        return {"/".join(str(p) for p in path): jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype)
                for path, v in nnx.to_flat_state(nnx.state(model))}
    return _cached("abstract", cfg, make)


def _to_official(flat: Mapping[str, Any], cfg: dualvitok.DualViTokConfig) -> dict[str, Any]:
    """Ours -> official keys / torch layouts; the sub-trees through the owning converters' inverses."""
    def under(prefix):
        return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}

    out = {key: _TO[kind](flat[path]) for key, path, kind in _SINGLE if path in flat}
    for tprefix, oprefix, kind in _SUBTREES:
        part = under(oprefix)
        if not part:  # a flat dict without the (training-only) semantic decoder
            continue
        if kind == "qwen2vit":
            out |= hf_vit.qwen2vit_to_torch(part, cfg.vit, tprefix)
        elif kind == "blocks":
            n = cfg.semantic_blocks if tprefix.startswith("semantic_encoder") else cfg.semantic_decoder_blocks
            out |= hf_vit.vision_blocks_to_torch(part, tprefix, n, dim=cfg.semantic_dim,
                                                 num_heads=cfg.semantic_heads, mlp_dim=cfg.semantic_mlp_dim)
        else:
            out |= conv_movq.flat_to_torch(part, tprefix)
    return out


def expected_official_shapes(cfg: dualvitok.DualViTokConfig) -> dict[str, tuple[int, ...]]:
    """Official key -> torch shape for `cfg`, computed abstractly (no weights allocated)."""
    def make():
        shapes = jax.eval_shape(functools.partial(_to_official, cfg=cfg), _abstract_flat(cfg))
        return {k: tuple(v.shape) for k, v in shapes.items()}
    return _cached("official", cfg, make)


def to_official(flat: Mapping[str, np.ndarray], cfg: dualvitok.DualViTokConfig) -> dict[str, np.ndarray]:
    """Our flat variables (as from `from_official`, with or without the semantic decoder) ->
    official keys and torch layouts."""
    want = _abstract_flat(cfg)
    missing = sorted(set(want) - set(flat))
    if missing and not (all(p.startswith("semantic_decoder/") for p in missing)
                        and not any(p.startswith("semantic_decoder/") for p in flat)):
        raise ValueError(f"to_official: missing variables {missing}")
    bad = [f"{p}: expected {want[p].shape}, found {np.shape(w)}" for p, w in flat.items()
           if p in want and tuple(np.shape(w)) != tuple(want[p].shape)]
    if bad:
        raise ValueError(f"to_official: shape mismatches {bad}")
    return {k: np.asarray(v) for k, v in _to_official({k: np.asarray(v) for k, v in flat.items()}, cfg).items()}


class _Lazy:
    """A state-dict value read only when a converter asks for it (np.asarray), its shape checked."""

    def __init__(self, loader: "_Loader", key: str):
        self.loader, self.key = loader, key

    def __array__(self, dtype=None, copy=None):
        w = self.loader.load(self.key)
        return w if dtype is None else w.astype(dtype)


class _Loader:
    def __init__(self, sd: Mapping[str, Any], want: Mapping[str, tuple]):
        self.sd, self.want, self.mismatched = sd, want, {}

    def load(self, key: str) -> np.ndarray:
        w = conv_movq._to_numpy(self.sd[key])
        if key in self.want and tuple(w.shape) != self.want[key]:
            self.mismatched[key] = f"{key}: expected {self.want[key]}, found {tuple(w.shape)}"
        return w


class _View(Mapping):
    """The keys of one sub-tree, values as `_Lazy` proxies."""

    def __init__(self, loader: _Loader, keys: list[str]):
        self.loader, self.keys_, self.set_ = loader, list(keys), set(keys)

    def __getitem__(self, key):
        if key not in self.set_:
            raise KeyError(key)
        return _Lazy(self.loader, key)

    def __iter__(self):
        return iter(self.keys_)

    def __len__(self):
        return len(self.keys_)


def from_official(state_dict: Mapping[str, Any], cfg: dualvitok.DualViTokConfig, *,
                  include_semantic_decoder: bool = True) -> dict[str, np.ndarray]:
    """Official DualViTok state dict (raw or under 'ema' / 'model' / 'state_dict'; torch tensors or
    numpy) -> {our '/'-joined variable path: array}. With include_semantic_decoder=False the
    (training-only) semantic decoder is neither required nor returned."""
    sd = conv_movq.unwrap_state_dict(state_dict)
    want, ours = expected_official_shapes(cfg), _abstract_flat(cfg)
    if not include_semantic_decoder:
        want, ours = _no_decoder(want, "."), _no_decoder(ours, "/")
    keys = [k for k in sd.keys() if not _IGNORED.search(k)
            and (include_semantic_decoder or not k.startswith("semantic_decoder."))]
    loader = _Loader(sd, want)
    singles = {key: (path, kind) for key, path, kind in _SINGLE if path in ours}
    groups: dict[str, list[str]] = {t[0]: [] for t in _SUBTREES}
    out = {}
    for key in keys:
        if key in singles:
            path, kind = singles[key]
            w = loader.load(key)
            if tuple(w.shape) == want[key]:
                out[path] = _FROM[kind](w)
            continue
        prefix = next((t for t in groups if key.startswith(t)), None)
        if prefix is not None:  # anything else is unexpected (named below)
            groups[prefix].append(key)
    sub_errors = []
    for tprefix, oprefix, kind in _SUBTREES:
        if not any(p.startswith(oprefix) for p in ours):
            continue
        view = _View(loader, groups[tprefix])
        try:
            if kind == "qwen2vit":
                part = hf_vit.qwen2vit_from_torch(view, cfg.vit, prefix=tprefix)
            elif kind == "blocks":
                n = cfg.semantic_blocks if tprefix.startswith("semantic_encoder") else cfg.semantic_decoder_blocks
                part = hf_vit.vision_blocks_from_torch(view, tprefix, n, dim=cfg.semantic_dim, strict=True,
                                                       num_heads=cfg.semantic_heads, mlp_dim=cfg.semantic_mlp_dim)
            else:
                shapes = {tuple(int(p) if p.isdigit() else p for p in k[len(oprefix):].split("/")): v.shape
                          for k, v in ours.items() if k.startswith(oprefix)}
                part = {conv_movq._fmt(p): w for p, w in conv_movq.params_from_torch(view, tprefix, shapes).items()}
        except ValueError as e:
            sub_errors.append(str(e))
            continue
        out.update({oprefix + k: v for k, v in part.items()})
    present = set(keys)
    missing = [f"{k} (expected {s})" for k, s in want.items() if k not in present]
    shape_of = sd.shape if callable(getattr(sd, "shape", None)) else lambda k: np.shape(loader.load(k))  # a reader's
    unexpected = [f"{k} (found {tuple(shape_of(k))})" for k in keys if k not in want]  # header, else the value
    mismatched = list(loader.mismatched.values())
    conv_movq.check_fit("DualViTok", "", missing, unexpected, mismatched)
    if sub_errors or set(out) != set(ours):  # cannot happen when the key/shape checks pass
        raise ValueError(f"DualViTok conversion: {sub_errors} {sorted(set(ours) ^ set(out))[:12]}")
    return out
