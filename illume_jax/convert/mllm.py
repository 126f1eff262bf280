"""The official ILLUME+ MLLM checkpoint ("origin" format, spec §6.2) <-> our `MLLM` parameters.

The official file is an HF `save_pretrained` of `IllumeQwen2ForCausalLM`; its keys fall into four
groups, each converted by the converter that owns that layout:

  official keys                                   ours                       converter
  model.embed_tokens / model.layers.* / model.norm  llm/...                  hf_llm.hf_to_params
    / lm_head (absent when tied)
  model.vision_tower.semantic_encoder.*           vision/vit/...             hf_vit.qwen2vit_from_torch
    (Qwen2-VL ViT keys without DualViTok's `.model` infix)
  model.vision_tower.pixel_encoder.*              vision/pixel_encoder/...   convert.movq (MoVQ encoder)
  model.mm_projector.projector_{1,2}.{0,2}.*      projector/{semantic,pixel}/fc{1,2}/...   `_PROJECTOR` below

`from_official` returns a flat {'/'-joined param path: array} dict (the paths of
`nnx.to_flat_state(nnx.state(MLLM(cfg), nnx.Param))`), `to_official` is its exact inverse.
Every problem — a key with no place, a missing tensor, a wrong shape, an embedding whose row
count is not `cfg.llm.vocab_size` — is collected into ONE ValueError naming the keys. The input
mapping is read lazily: each sub-converter sees a view of its own keys, so a lazy reader over a
multi-GB file (`convert.files.open_tensors`) is read one tensor at a time. Torch tensors (any
float dtype, bf16 included) become fp32 numpy; numpy arrays keep their dtype.

The tie of the head is read from the checkpoint (`detect_tied`: no `lm_head.weight` = tied), and
`config.json`'s `special_tokens_ids[0]` is where the image vocabulary starts (151665 officially).
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping

import jax
import numpy as np
from flax import nnx

from illume_jax.convert import hf_llm, hf_vit
from illume_jax.convert import movq as conv_movq
from illume_jax.models.llm import LLMConfig
from illume_jax.models.mllm import MLLM, MLLMConfig
from illume_jax.sharding import make_mesh, use_mesh

# Official key prefix -> our path prefix, per group (the LLM's keys have no common prefix).
_VIT = ("model.vision_tower.semantic_encoder.", "vision/vit/")
_PIX = ("model.vision_tower.pixel_encoder.", "vision/pixel_encoder/")
_LLM_KEYS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
_LLM_PREFIXES = ("model.layers.", "model.rotary_emb.")
# MixedProjector: nn.Sequential(Linear, GELU, Linear); projector_1 semantic, projector_2 pixel.
_PROJECTOR = tuple(
    (f"model.mm_projector.projector_{i}.{j}.{leaf}", f"projector/{branch}/fc{k}/{ours}")
    for i, branch in ((1, "semantic"), (2, "pixel")) for j, k in ((0, 1), (2, 2))
    for leaf, ours in (("weight", "kernel"), ("bias", "bias")))
# Our MoVQ leaf names -> torch leaf names (kernels also change layout).


class _View(Mapping):
    """The keys `keys` of `sd`; values are read only when asked for (their shapes are noted)."""

    def __init__(self, sd: Mapping[str, Any], keys: Iterable[str]):
        self._sd, self._keys, self.shapes = sd, dict.fromkeys(keys), {}

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys:
            raise KeyError(key)
        v = self._sd[key]
        self.shapes[key] = tuple(v.shape)
        return v

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _numpy(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):
        v = v.detach().cpu()
        return (v.float() if v.is_floating_point() else v).numpy()
    return np.asarray(v)


def llm_config_from_official(hf_config: Mapping, **overrides) -> LLMConfig:
    """LLMConfig from the official config.json: text ids end where `special_tokens_ids` begin."""
    ids = list(hf_config.get("special_tokens_ids") or [])
    if "text_vocab_size" not in overrides:
        if len(ids) != 7 or ids != list(range(ids[0], ids[0] + 7)):
            raise ValueError(f"config.json special_tokens_ids={ids}: expected the 7 consecutive structure ids "
                             "(<start_of_image> .. <end_of_level1>, spec §3.2)")
        overrides["text_vocab_size"] = ids[0]
    return hf_llm.config_from_hf(dict(hf_config), **overrides)


def detect_tied(keys: Iterable[str], hf_config: Mapping) -> bool:
    """Tied iff the checkpoint has no `lm_head.weight`; config.json's flag must agree."""
    tied = "lm_head.weight" not in set(keys)
    flag = bool(hf_config.get("tie_word_embeddings", False))
    if tied != flag:
        raise ValueError(
            f"config.json says tie_word_embeddings={flag} but the checkpoint "
            f"{'has no' if tied else 'has an'} lm_head.weight (a {'tied' if tied else 'separate'} head): "
            "the checkpoint and its config disagree")
    return tied


def _expected_shapes(cfg: MLLMConfig) -> dict[str, tuple[int, ...]]:
    with use_mesh(make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])):
        abstract = nnx.eval_shape(lambda: MLLM(cfg, rngs=nnx.Rngs(0)))
    return {"/".join(str(p) for p in path): tuple(v.get_value().shape)
            for path, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}


def from_official(state_dict: Mapping[str, Any], cfg: MLLMConfig) -> dict[str, np.ndarray]:
    """Official MLLM state dict (lazy mapping ok) -> {our '/'-joined param path: array}."""
    expected = _expected_shapes(cfg)
    groups: dict[str, list[str]] = {"llm": [], "vit": [], "pix": [], "projector": []}
    unplaced: list[str] = []
    projector = dict(_PROJECTOR)
    for key in state_dict:
        group = ("vit" if key.startswith(_VIT[0]) else "pix" if key.startswith(_PIX[0])
                 else "projector" if key in projector
                 else "llm" if key in _LLM_KEYS or key.startswith(_LLM_PREFIXES) else None)
        (groups[group] if group else unplaced).append(key)
    problems = [f"keys with no place in the MLLM: {unplaced}"] if unplaced else []
    if cfg.llm.tie_embeddings == ("lm_head.weight" in groups["llm"]):
        problems.append(f"lm_head.weight is {'present' if cfg.llm.tie_embeddings else 'missing'} but "
                        f"cfg.llm.tie_embeddings={cfg.llm.tie_embeddings} (see detect_tied)")
    out: dict[str, np.ndarray] = {}
    failed: list[str] = []

    def run(prefix: str, convert):
        try:
            out.update({prefix + k: v for k, v in convert().items()})
        except ValueError as e:
            problems.append(str(e))
            failed.append(prefix)

    pix_shapes = {tuple(int(p) if p.isdigit() else p for p in k[len(_PIX[1]):].split("/")): s
                  for k, s in expected.items() if k.startswith(_PIX[1])}
    llm_view = _View(state_dict, groups["llm"])
    run("llm/", lambda: hf_llm.hf_to_params(llm_view, cfg.llm))
    run(_VIT[1], lambda: hf_vit.qwen2vit_from_torch(_View(state_dict, groups["vit"]), cfg.tokenizer.vit, _VIT[0]))
    run(_PIX[1], lambda: {"/".join(map(str, p)): w for p, w in conv_movq.params_from_torch(
        _View(state_dict, groups["pix"]), _PIX[0], pix_shapes).items()})
    for key, path in _PROJECTOR:
        if key in groups["projector"]:
            w = _numpy(state_dict[key])
            out[path] = w.T if w.ndim == 2 else w
    rows = llm_view.shapes.get(_LLM_KEYS[0], (cfg.llm.vocab_size,))[0]
    if rows != cfg.llm.vocab_size:
        problems.append(f"{_LLM_KEYS[0]} has {rows} rows but config vocab_size is {cfg.llm.vocab_size}")
    official = {path: key for key, path in _PROJECTOR} | {"llm/embed/embedding": _LLM_KEYS[0],
                                                          "llm/final_norm/scale": _LLM_KEYS[1],
                                                          "llm/lm_head/kernel": _LLM_KEYS[2]}
    live = {k: s for k, s in expected.items() if not k.startswith(tuple(failed))}
    missing = [f"{official.get(k, k)} (for {k})" for k in live if k not in out]
    unexpected = [k for k in out if k not in expected]
    shapes = []
    for k, want in live.items():
        if k in out and tuple(out[k].shape) != want:
            f = (lambda s: tuple(s)[::-1]) if k in official and k.endswith("/kernel") else tuple  # torch layout
            shapes.append(f"{official.get(k, k)}: expected {f(want)}, found {f(out[k].shape)}")
    for what, items in (("missing tensors", missing), ("unexpected parameters", unexpected),
                        ("shape mismatches", shapes)):
        if items:
            problems.append(f"{what}: {items}")
    if problems:
        raise ValueError("official MLLM checkpoint does not fit the model:\n  " + "\n  ".join(problems))
    return out


def to_official(flat: Mapping[str, np.ndarray], cfg: MLLMConfig) -> dict[str, np.ndarray]:
    """Inverse of `from_official`: official keys and layouts (no lm_head.weight when tied)."""
    def under(prefix):
        return {k[len(prefix):]: np.asarray(v) for k, v in flat.items() if k.startswith(prefix)}

    out = hf_llm.params_to_hf(under("llm/"), cfg.llm)
    out |= hf_vit.qwen2vit_to_torch(under(_VIT[1]), cfg.tokenizer.vit, _VIT[0])
    out |= conv_movq.flat_to_torch(under(_PIX[1]), _PIX[0])
    for key, path in _PROJECTOR:
        w = np.asarray(flat[path])
        out[key] = w.T if w.ndim == 2 else w
    return out


def official_config_dict(cfg: MLLMConfig) -> dict:
    """A config.json for `to_official`'s state dict (the fields `llm_config_from_official` reads)."""
    c, first = cfg.llm, cfg.vocab.first_id
    return {
        "architectures": ["IllumeQwen2ForCausalLM" if c.family == "qwen2" else "IllumeLlamaForCausalLM"],
        "model_type": "illume_qwen2" if c.family == "qwen2" else "illume_llama",
        "vocab_size": c.vocab_size, "hidden_size": c.d_model, "intermediate_size": c.mlp_dim,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "hidden_act": "silu",
        "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "attention_bias": c.qkv_bias,
        "tie_word_embeddings": c.tie_embeddings, "torch_dtype": c.param_dtype,
        "special_tokens_ids": list(range(first, first + 7)), "text_token_num": first,
        "mm_hidden_size": [cfg.tokenizer.vit.hidden_size, cfg.tokenizer.pixel_encoder.z_channels],
        "vision_tokenizer_levels": 2,
    }
