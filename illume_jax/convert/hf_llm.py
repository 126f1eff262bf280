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


def _numpy(v: Any) -> np.ndarray:
    """A torch tensor (bf16 -> fp32: numpy has no torch bf16) or array -> numpy."""
    if hasattr(v, "detach"):
        v = v.detach().cpu()
        return (v.float() if v.is_floating_point() else v).numpy()
    return np.asarray(v)


def hf_to_params(state_dict: Mapping[str, Any], cfg: LLMConfig) -> dict[str, np.ndarray]:
    """HF state dict -> {'/'-joined path: array} for our LLM (layers stacked).

    Streaming: tensors are read from the mapping one at a time (it may be a lazy reader over a
    multi-GB checkpoint, `convert.files.open_tensors`) and each layer is written into its
    preallocated stacked array, which keeps the source dtype (a bf16 checkpoint stays bf16).
    Peak host memory is one converted copy plus one tensor."""
    expected = _expected_shapes(cfg)
    out: dict[str, np.ndarray] = {}
    per_layer: dict[str, np.ndarray] = {}
    filled: dict[str, set] = {}
    unused, bad = [], []

    def fits(key: str, path: str, w: np.ndarray, shape: tuple) -> bool:
        if tuple(w.shape) != tuple(shape):
            bad.append(f"{key}: expected {tuple(shape)} (our layout of {path}), found {tuple(w.shape)}")
            return False
        return True

    top = {"model.embed_tokens.weight": ("embed/embedding", lambda w: w),
           "model.norm.weight": ("final_norm/scale", lambda w: w),
           # Contiguous now, while little else is held: a transposed view would be copied at save time.
           "lm_head.weight": ("lm_head/kernel", lambda w: np.ascontiguousarray(w.T))}
    for key in state_dict:
        m = _LAYER_KEY.match(key)
        if m:
            layer, suffix = int(m.group(1)), m.group(2)
            if suffix not in _LAYER_MAP or layer >= cfg.num_layers:
                unused.append(key)
                continue
            path, kind = _LAYER_MAP[suffix]
            shape = expected[f"layers/{path}"][1:]
            raw = _numpy(state_dict[key])
            try:
                w = _convert(kind, raw, cfg)
            except ValueError:  # a reshape that cannot work: report the torch shape
                w = raw
            if not fits(key, path, w, shape):
                continue
            if path not in per_layer:
                per_layer[path] = np.empty((cfg.num_layers, *shape), w.dtype)
            per_layer[path][layer] = w
            filled.setdefault(path, set()).add(layer)
        elif key in top:
            path, layout = top[key]
            if path not in expected:  # lm_head of a tied model: HF drops it, ours has none either
                continue
            w = layout(_numpy(state_dict[key]))
            if fits(key, path, w, expected[path]):
                out[path] = w
        elif not key.endswith("rotary_emb.inv_freq"):
            unused.append(key)
    if unused:
        raise ValueError(f"HF state dict has keys with no place in the LLM: {unused[:8]}")
    if bad:
        raise ValueError(f"HF state dict has tensors of the wrong shape: {bad[:8]}")
    for path, layers in per_layer.items():
        missing = sorted(set(range(cfg.num_layers)) - filled[path])
        if missing:
            raise ValueError(f"HF state dict lacks layers {missing} of {path}")
        out[f"layers/{path}"] = layers
    absent = sorted(set(expected) - set(out))
    if absent:
        raise ValueError(f"HF state dict lacks tensors for {absent[:8]}")
    return out


def _expected_shapes(cfg: LLMConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter shapes for `cfg`, from the abstract model (nothing allocated)."""
    from illume_jax import sharding
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    with sharding.use_mesh(mesh):
        model = nnx.eval_shape(lambda: LLM(cfg, rngs=nnx.Rngs(0)))
    return {"/".join(str(k) for k in path): tuple(v.get_value().shape)
            for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


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
