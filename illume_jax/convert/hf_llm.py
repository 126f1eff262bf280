"""HF `Qwen2ForCausalLM` / `LlamaForCausalLM` state dicts <-> our LLM parameters.

The name map is data (`_LAYER_MAP`); per-layer tensors are stacked along the leading
'layers' axis our scanned model uses. PyTorch Linear weights are (out, in); ours are
(in, out) with the head axis split out: q_proj (N*H, D) -> (D, N, H), o_proj (D, N*H) ->
(N, H, D). Tensors come in as numpy arrays (read them with safetensors or
`torch.load(weights_only=True)`; never plain pickle).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx

from illume_jax.models.llm import LLM, LLMConfig

# HF per-layer suffix -> (our path under 'layers', kind)
_LAYER_MAP = {
    "input_layernorm.weight": ("input_norm/scale", "vector"),
    "post_attention_layernorm.weight": ("post_attn_norm/scale", "vector"),
    "self_attn.q_proj.weight": ("attn/q_proj/kernel", "in_heads"),
    "self_attn.k_proj.weight": ("attn/k_proj/kernel", "in_kv_heads"),
    "self_attn.v_proj.weight": ("attn/v_proj/kernel", "in_kv_heads"),
    "self_attn.q_proj.bias": ("attn/q_proj/bias", "bias_heads"),
    "self_attn.k_proj.bias": ("attn/k_proj/bias", "bias_kv_heads"),
    "self_attn.v_proj.bias": ("attn/v_proj/bias", "bias_kv_heads"),
    "self_attn.o_proj.weight": ("attn/o_proj/kernel", "out_heads"),
    "mlp.gate_proj.weight": ("mlp/gate_proj/kernel", "linear"),
    "mlp.up_proj.weight": ("mlp/up_proj/kernel", "linear"),
    "mlp.down_proj.weight": ("mlp/down_proj/kernel", "linear"),
}
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def config_from_hf(hf_config: Any, *, text_vocab_size: int | None = None, **overrides) -> LLMConfig:
    """LLMConfig from a transformers Qwen2Config / LlamaConfig (or its to_dict())."""
    d = hf_config if isinstance(hf_config, Mapping) else hf_config.to_dict()
    family = {"qwen2": "qwen2", "llama": "llama", "illume_qwen2": "qwen2", "illume_llama": "llama"}.get(
        d.get("model_type", ""), None)
    if family is None:
        raise ValueError(f"HF config model_type={d.get('model_type')!r}: expected qwen2 or llama")
    heads = d["num_attention_heads"]
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
    if rope.get("rope_type", "default") not in ("default", None):
        raise ValueError(f"HF rope type {rope.get('rope_type')!r} is not supported (only the default RoPE)")
    cfg = dict(
        family=family,
        vocab_size=d["vocab_size"],
        text_vocab_size=text_vocab_size or d["vocab_size"],
        d_model=d["hidden_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // heads,
        mlp_dim=d["intermediate_size"],
        rope_theta=float(theta),
        norm_eps=d["rms_norm_eps"],
        qkv_bias=family == "qwen2" or bool(d.get("attention_bias", False)),
        tie_embeddings=bool(d.get("tie_word_embeddings", False)),
    )
    cfg.update(overrides)
    return LLMConfig(**cfg)


def _convert(kind: str, w: np.ndarray, cfg: LLMConfig) -> np.ndarray:
    D, H = cfg.d_model, cfg.head_dim
    if kind == "vector":
        return w
    if kind == "linear":
        return w.T
    if kind in ("in_heads", "in_kv_heads"):
        return w.T.reshape(D, -1, H)
    if kind in ("bias_heads", "bias_kv_heads"):
        return w.reshape(-1, H)
    if kind == "out_heads":
        return w.T.reshape(-1, H, D)
    raise AssertionError(kind)


def hf_to_params(state_dict: Mapping[str, Any], cfg: LLMConfig) -> dict[str, np.ndarray]:
    """HF state dict -> {'/'-joined path: array} for our LLM (layers stacked)."""
    sd = {k: np.asarray(v.detach().float().numpy() if hasattr(v, "detach") else v) for k, v in state_dict.items()}
    out: dict[str, np.ndarray] = {}
    per_layer: dict[str, list] = {}
    unused = []
    for key, w in sd.items():
        m = _LAYER_KEY.match(key)
        if m:
            layer, suffix = int(m.group(1)), m.group(2)
            if suffix not in _LAYER_MAP:
                unused.append(key)
                continue
            path, kind = _LAYER_MAP[suffix]
            per_layer.setdefault(path, [None] * cfg.num_layers)[layer] = _convert(kind, w, cfg)
        elif key == "model.embed_tokens.weight":
            out["embed/embedding"] = w
        elif key == "model.norm.weight":
            out["final_norm/scale"] = w
        elif key == "lm_head.weight":
            if not cfg.tie_embeddings:
                out["lm_head/kernel"] = w.T
        elif not key.endswith("rotary_emb.inv_freq"):
            unused.append(key)
    if unused:
        raise ValueError(f"HF state dict has keys with no place in the LLM: {unused[:8]}")
    for path, layers in per_layer.items():
        missing = [i for i, w in enumerate(layers) if w is None]
        if missing:
            raise ValueError(f"HF state dict lacks layers {missing} of {path}")
        out[f"layers/{path}"] = np.stack(layers)
    return out


def params_to_hf(params: Mapping[str, np.ndarray], cfg: LLMConfig) -> dict[str, np.ndarray]:
    """Inverse of `hf_to_params` (for exporting fine-tuned weights back to transformers)."""
    out = {"model.embed_tokens.weight": params["embed/embedding"], "model.norm.weight": params["final_norm/scale"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = params["lm_head/kernel"].T
    for suffix, (path, kind) in _LAYER_MAP.items():
        key = f"layers/{path}"
        if key not in params:
            continue
        for i, w in enumerate(np.asarray(params[key])):
            if kind == "linear":
                w = w.T
            elif kind in ("in_heads", "in_kv_heads"):
                w = w.reshape(cfg.d_model, -1).T
            elif kind in ("bias_heads", "bias_kv_heads"):
                w = w.reshape(-1)
            elif kind == "out_heads":
                w = w.reshape(-1, cfg.d_model).T
            out[f"model.layers.{i}.{suffix}"] = w
    return out


def flat_params(model: nnx.Module) -> dict[str, jax.Array]:
    """{'a/b/c': array} view of the model's parameters."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {"/".join(str(k) for k in path): var[...] for path, var in flat}


def load_params(model: LLM, params: Mapping[str, np.ndarray]) -> None:
    """Copies converted arrays into the model in place, keeping each parameter's sharding
    and checking every shape (a mismatch names the parameter)."""
    state = nnx.state(model, nnx.Param)
    flat = dict(nnx.to_flat_state(state))
    expected = {"/".join(str(k) for k in path) for path in flat}
    missing, extra = sorted(expected - set(params)), sorted(set(params) - expected)
    if missing or extra:
        raise ValueError(f"parameter names differ: missing {missing[:8]}, unexpected {extra[:8]}")
    for path, var in flat.items():
        name = "/".join(str(k) for k in path)
        new = np.asarray(params[name])
        old = var[...]
        if new.shape != old.shape:
            raise ValueError(f"parameter {name}: checkpoint shape {new.shape}, model expects {old.shape}")
        var[...] = jax.device_put(new.astype(old.dtype), old.sharding)
    nnx.update(model, state)
