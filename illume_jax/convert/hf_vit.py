"""PyTorch state dicts -> our vision transformers (`illume_jax.models.vit`).

Sources: the official Qwen2-VL ViT (`Qwen2VisionTransformerPretrainedModel`: standalone keys
`patch_embed.proj.weight`, `blocks.{i}...`, `merger...`; inside Qwen2-VL `visual.` (transformers
4.x) or `model.visual.` (5.x); inside DualViTok `semantic_encoder.model.`), standalone
2-D-RoPE block stacks (DualViTok's `semantic_encoder.blocks.{i}`) and HF `CLIPVisionModel`
(`vision_model.` prefix). Pick the sub-tree with `prefix`: every key under it must be used
and every expected key found, or the error names them.

The maps are tables of rows (torch name, our path, conversion, torch shape). PyTorch Linear
weights are (out, in); ours are (in, *out). Results are {'/'-joined path: np.ndarray}; load
them with `illume_jax.convert.hf_llm.load_params(module, params)` (which checks shapes
against the module and keeps each parameter's sharding).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import numpy as np

from illume_jax.convert.hf_llm import flat_params, load_params  # noqa: F401  (re-exported)
from illume_jax.models.vit import ClipViTConfig, Qwen2ViTConfig

# Conversions: torch tensor -> ours. `dims` carries the sizes some of them need.
_CONVERT: dict[str, Callable[[np.ndarray, dict], np.ndarray]] = {
    "copy": lambda w, d: w,
    "linear": lambda w, d: w.T,                                              # (out,in) -> (in,out)
    "qkv": lambda w, d: w.T.reshape(w.shape[1], 3, d["N"], d["H"]),          # (3D,D) -> (D,3,N,H)
    "qkv_bias": lambda w, d: w.reshape(3, d["N"], d["H"]),
    "in_heads": lambda w, d: w.T.reshape(w.shape[1], d["N"], d["H"]),        # (D,D) -> (D,N,H)
    "bias_heads": lambda w, d: w.reshape(d["N"], d["H"]),
    "out_heads": lambda w, d: w.T.reshape(d["N"], d["H"], w.shape[0]),       # (D,D) -> (N,H,D)
    "conv3d": lambda w, d: w.reshape(w.shape[0], -1).T,                      # (D,C,t,p,p) -> (C*t*p*p, D)
    "conv2d": lambda w, d: w.transpose(2, 3, 1, 0),                          # (D,C,p,p) -> (p,p,C,D)
}

# Vision block (Qwen2-VL and DualViTok's extra blocks): (torch suffix, our path, kind, torch shape).
_VISION_BLOCK_ROWS = (
    ("norm1.weight", "norm1/scale", "copy", ("D",)),
    ("norm1.bias", "norm1/bias", "copy", ("D",)),
    ("attn.qkv.weight", "attn/qkv/kernel", "qkv", ("3D", "D")),
    ("attn.qkv.bias", "attn/qkv/bias", "qkv_bias", ("3D",)),
    ("attn.proj.weight", "attn/proj/kernel", "out_heads", ("D", "D")),
    ("attn.proj.bias", "attn/proj/bias", "copy", ("D",)),
    ("norm2.weight", "norm2/scale", "copy", ("D",)),
    ("norm2.bias", "norm2/bias", "copy", ("D",)),
    ("mlp.fc1.weight", "mlp/fc1/kernel", "linear", ("F", "D")),
    ("mlp.fc1.bias", "mlp/fc1/bias", "copy", ("F",)),
    ("mlp.fc2.weight", "mlp/fc2/kernel", "linear", ("D", "F")),
    ("mlp.fc2.bias", "mlp/fc2/bias", "copy", ("D",)),
)

_QWEN2VIT_ROWS = (
    ("patch_embed.proj.weight", "patch_embed/kernel", "conv3d", ("D", "C", "t", "p", "p")),
    ("merger.ln_q.weight", "merger/ln_q/scale", "copy", ("D",)),
    ("merger.ln_q.bias", "merger/ln_q/bias", "copy", ("D",)),
    ("merger.mlp.0.weight", "merger/fc1/kernel", "linear", ("M", "M")),
    ("merger.mlp.0.bias", "merger/fc1/bias", "copy", ("M",)),
    ("merger.mlp.2.weight", "merger/fc2/kernel", "linear", ("O", "M")),
    ("merger.mlp.2.bias", "merger/fc2/bias", "copy", ("O",)),
)

_CLIP_BLOCK_ROWS = (
    ("layer_norm1.weight", "layer_norm1/scale", "copy", ("D",)),
    ("layer_norm1.bias", "layer_norm1/bias", "copy", ("D",)),
    *[(f"self_attn.{n}_proj.weight", f"attn/{n}_proj/kernel", "in_heads", ("D", "D")) for n in "qkv"],
    *[(f"self_attn.{n}_proj.bias", f"attn/{n}_proj/bias", "bias_heads", ("D",)) for n in "qkv"],
    ("self_attn.out_proj.weight", "attn/out_proj/kernel", "out_heads", ("D", "D")),
    ("self_attn.out_proj.bias", "attn/out_proj/bias", "copy", ("D",)),
    ("layer_norm2.weight", "layer_norm2/scale", "copy", ("D",)),
    ("layer_norm2.bias", "layer_norm2/bias", "copy", ("D",)),
    ("mlp.fc1.weight", "mlp/fc1/kernel", "linear", ("F", "D")),
    ("mlp.fc1.bias", "mlp/fc1/bias", "copy", ("F",)),
    ("mlp.fc2.weight", "mlp/fc2/kernel", "linear", ("D", "F")),
    ("mlp.fc2.bias", "mlp/fc2/bias", "copy", ("D",)),
)

_CLIP_ROWS = (
    ("embeddings.class_embedding", "class_embedding", "copy", ("D",)),
    ("embeddings.patch_embedding.weight", "patch_embed/kernel", "conv2d", ("D", "C", "p", "p")),
    ("embeddings.position_embedding.weight", "position_embedding", "copy", ("P", "D")),
    ("pre_layrnorm.weight", "pre_layrnorm/scale", "copy", ("D",)),
    ("pre_layrnorm.bias", "pre_layrnorm/bias", "copy", ("D",)),
    ("post_layernorm.weight", "post_layernorm/scale", "copy", ("D",)),
    ("post_layernorm.bias", "post_layernorm/bias", "copy", ("D",)),
)

# Non-persistent buffers some exports still carry; never parameters.
_IGNORED = re.compile(r"(^|\.)(position_ids|inv_freq|original_inv_freq)$")


def _numpy(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):
        v = v.detach().cpu().float().numpy()
    return np.asarray(v)


def _shape(template: tuple[str, ...], dims: Mapping[str, int]) -> tuple[int, ...]:
    return tuple(3 * dims["D"] if t == "3D" else dims[t] for t in template)


class _Reader:
    """The keys of one sub-tree (`prefix`), tracking which were used."""

    def __init__(self, state_dict: Mapping[str, Any], prefix: str, what: str):
        self.what, self.prefix = what, prefix
        self.sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix) and not _IGNORED.search(k)}
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.bad_shapes: list[str] = []

    def take(self, name: str, kind: str, template: tuple[str, ...], dims: Mapping[str, int]) -> np.ndarray | None:
        if name not in self.sd:
            self.missing.append(self.prefix + name)
            return None
        self.used.add(name)
        w = _numpy(self.sd[name])
        want = _shape(template, dims)
        if w.shape != want:
            self.bad_shapes.append(f"{self.prefix + name}: expected {want}, found {tuple(w.shape)}")
            return None
        return _CONVERT[kind](w, dims)

    def finish(self, allow_unused: Callable[[str], bool] = lambda k: False) -> None:
        unexpected = sorted(self.prefix + k for k in set(self.sd) - self.used if not allow_unused(k))
        problems = []
        if self.missing:
            problems.append(f"missing tensors {self.missing[:12]}" + (" ..." if len(self.missing) > 12 else ""))
        if unexpected:
            problems.append(f"unexpected tensors {unexpected[:12]}" + (" ..." if len(unexpected) > 12 else ""))
        if self.bad_shapes:
            problems.append("shape mismatches: " + "; ".join(self.bad_shapes[:12]))
        if problems:
            raise ValueError(f"{self.what} (prefix {self.prefix!r}): " + " | ".join(problems))


def _blocks(reader: _Reader, block_prefix: str, num_blocks: int, rows, dims, out_prefix: str) -> dict:
    out = {}
    for suffix, path, kind, template in rows:
        layers = [reader.take(f"{block_prefix}{i}.{suffix}", kind, template, dims) for i in range(num_blocks)]
        if all(w is not None for w in layers):
            out[f"{out_prefix}{path}"] = np.stack(layers)
    return out


def _vision_dims(dim: int, num_heads: int, mlp_dim: int) -> dict:
    return {"D": dim, "N": num_heads, "H": dim // num_heads, "F": mlp_dim}


def qwen2vit_from_torch(state_dict: Mapping[str, Any], cfg: Qwen2ViTConfig, prefix: str = "") -> dict[str, np.ndarray]:
    """Qwen2-VL ViT weights (keys under `prefix`) -> params for `Qwen2VisionTransformer`.

    prefix: '' (standalone model), 'model.visual.' / 'visual.' (whole Qwen2-VL),
    'semantic_encoder.model.' (DualViTok checkpoint).
    """
    dims = _vision_dims(cfg.embed_dim, cfg.num_heads, cfg.mlp_dim) | {
        "C": cfg.in_channels, "t": cfg.temporal_patch_size, "p": cfg.patch_size,
        "M": cfg.embed_dim * cfg.spatial_merge_size ** 2, "O": cfg.hidden_size}
    reader = _Reader(state_dict, prefix, "Qwen2-VL ViT state dict")
    out = {}
    for name, path, kind, template in _QWEN2VIT_ROWS:
        w = reader.take(name, kind, template, dims)
        if w is not None:
            out[path] = w
    out |= _blocks(reader, "blocks.", cfg.depth, _VISION_BLOCK_ROWS, dims, "blocks/")
    reader.finish()
    return out


def vision_blocks_from_torch(state_dict: Mapping[str, Any], prefix: str, num_blocks: int, *, dim: int,
                             num_heads: int, mlp_dim: int, strict: bool = False) -> dict[str, np.ndarray]:
    """Blocks `{prefix}{i}.*` (e.g. prefix 'semantic_encoder.blocks.') -> params for a
    `VisionBlockStack` (paths 'blocks/...'). Blocks beyond `num_blocks` are an error; with
    strict=True so is any other key starting with `prefix`."""
    dims = _vision_dims(dim, num_heads, mlp_dim)
    reader = _Reader(state_dict, prefix, "vision block stack")
    out = _blocks(reader, "", num_blocks, _VISION_BLOCK_ROWS, dims, "blocks/")
    block_key = re.compile(r"^\d+\.")
    reader.finish(allow_unused=lambda k: not strict and not block_key.match(k))
    return out


def clip_vit_from_torch(state_dict: Mapping[str, Any], cfg: ClipViTConfig, prefix: str | None = None
                        ) -> dict[str, np.ndarray]:
    """HF CLIP vision weights -> params for `ClipVisionTransformer`.

    prefix: 'vision_model.' (CLIPModel checkpoints such as openai/clip-vit-*, and
    CLIPVisionModel in transformers 4.x), '' (CLIPVisionModel.state_dict() in transformers
    5.x); None picks 'vision_model.' when such keys exist, else ''. A CLIPModel's text tower
    and projections lie outside the prefix and are ignored.
    """
    if prefix is None:
        prefix = "vision_model." if any(k.startswith("vision_model.") for k in state_dict) else ""
    dims = _vision_dims(cfg.hidden_size, cfg.num_heads, cfg.mlp_dim) | {
        "C": cfg.in_channels, "p": cfg.patch_size, "P": cfg.num_patches + 1}
    reader = _Reader(state_dict, prefix, "CLIP vision state dict")
    out = {}
    for name, path, kind, template in _CLIP_ROWS:
        w = reader.take(name, kind, template, dims)
        if w is not None:
            out[path] = w
    out |= _blocks(reader, "encoder.layers.", cfg.num_layers, _CLIP_BLOCK_ROWS, dims, "blocks/")
    reader.finish()
    return out


# --- ours -> torch (the export direction) ----------------------------------------------------

_TRANSPOSED = ("linear", "qkv", "in_heads", "out_heads")  # kinds whose forward layout is w.T (+ reshape)


def _to_torch(w: np.ndarray, kind: str, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of `_CONVERT[kind]`, given the torch shape."""
    if kind == "conv3d":
        return w.T.reshape(shape)
    if kind == "conv2d":
        return w.transpose(3, 2, 0, 1)
    if kind in _TRANSPOSED:
        return w.reshape(shape[::-1]).T
    return w.reshape(shape)


def _rows_to_torch(params: Mapping[str, Any], rows, dims, prefix: str, blocks: int | None,
                   block_prefix: str = "", path_prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for name, path, kind, template in rows:
        w = params[path_prefix + path]  # numpy, or abstract arrays under jax.eval_shape
        shape = _shape(template, dims)
        if blocks is None:
            out[prefix + name] = _to_torch(w, kind, shape)
        else:
            for i in range(blocks):
                out[f"{prefix}{block_prefix}{i}.{name}"] = _to_torch(w[i], kind, shape)
    return out


def qwen2vit_to_torch(params: Mapping[str, Any], cfg: Qwen2ViTConfig, prefix: str = "") -> dict[str, np.ndarray]:
    """Inverse of `qwen2vit_from_torch`: {our path: array} -> torch keys under `prefix`."""
    dims = _vision_dims(cfg.embed_dim, cfg.num_heads, cfg.mlp_dim) | {
        "C": cfg.in_channels, "t": cfg.temporal_patch_size, "p": cfg.patch_size,
        "M": cfg.embed_dim * cfg.spatial_merge_size ** 2, "O": cfg.hidden_size}
    return (_rows_to_torch(params, _QWEN2VIT_ROWS, dims, prefix, None)
            | _rows_to_torch(params, _VISION_BLOCK_ROWS, dims, prefix, cfg.depth, "blocks.", "blocks/"))


def vision_blocks_to_torch(params: Mapping[str, Any], prefix: str, num_blocks: int, *, dim: int, num_heads: int,
                           mlp_dim: int) -> dict[str, np.ndarray]:
    """Inverse of `vision_blocks_from_torch` (params keyed 'blocks/...')."""
    return _rows_to_torch(params, _VISION_BLOCK_ROWS, _vision_dims(dim, num_heads, mlp_dim), prefix, num_blocks,
                          "", "blocks/")


# --- configs from transformers ------------------------------------------------------------

def _as_dict(hf_config: Any) -> dict:
    return dict(hf_config) if isinstance(hf_config, Mapping) else hf_config.to_dict()


def qwen2vit_config_from_hf(hf_config: Any, **overrides) -> Qwen2ViTConfig:
    """From a transformers `Qwen2VLVisionConfig` (or a Qwen2VLConfig's vision_config)."""
    d = _as_dict(hf_config)
    d = d.get("vision_config", d)
    rope = d.get("rope_parameters") or {}
    cfg = dict(depth=d["depth"], embed_dim=d["embed_dim"], num_heads=d["num_heads"], mlp_ratio=d["mlp_ratio"],
               hidden_size=d["hidden_size"], patch_size=d["patch_size"],
               temporal_patch_size=d["temporal_patch_size"], spatial_merge_size=d["spatial_merge_size"],
               in_channels=d.get("in_channels", d.get("in_chans", 3)), act=d.get("hidden_act", "quick_gelu"),
               rope_theta=float(rope.get("rope_theta", 10_000.0)))
    cfg.update(overrides)
    return Qwen2ViTConfig(**cfg)


def clip_config_from_hf(hf_config: Any, **overrides) -> ClipViTConfig:
    """From a transformers `CLIPVisionConfig` (or a CLIPConfig's vision_config)."""
    d = _as_dict(hf_config)
    d = d.get("vision_config", d)
    cfg = dict(image_size=d["image_size"], patch_size=d["patch_size"], hidden_size=d["hidden_size"],
               num_layers=d["num_hidden_layers"], num_heads=d["num_attention_heads"],
               mlp_dim=d["intermediate_size"], in_channels=d.get("num_channels", 3), act=d["hidden_act"],
               norm_eps=d["layer_norm_eps"])
    cfg.update(overrides)
    return ClipViTConfig(**cfg)
