"""`python -m illume_jax convert`: official checkpoints <-> converted-weights folders (convert/weights.py).

    convert --from=official --kind=KIND --src=DIR_OR_FILE --dst=DIR [--tokenizer=DIR] [--config=BASE]
    convert --to=official   --kind=KIND --src=DIR --dst=DIR

Kinds and what `--src` is when reading official files:
  llm           a HF Qwen2 / Qwen2.5 / LLaMA / Vicuna folder (config.json + safetensors or .bin, sharded or
                not; tokenizer.json copied when present). Vocabulary rows come from the embedding's
                shape and the head is tied exactly when the checkpoint has no `lm_head.weight`.
  dualvitok     the DualViTok file or folder (`pytorch_model.bin`, raw or under 'ema'/'model'/'state_dict').
                Its model shape is `--config` (default: configs/dualvitok.py:size=official), checked
                tensor by tensor.
  mllm          an ILLUME+ "origin" folder (IllumeQwen2ForCausalLM save_pretrained: LLM, the stage-3
                fine-tuned vision tower, projectors). `--tokenizer` = the converted `dualvitok` folder:
                its config shapes the tower and its pixel decoder turns generated codes into images.
  sdxl-decoder  the diffusers folder (unet/, vae/, scheduler/). `--tokenizer` = the converted
                `dualvitok` folder whose code maps condition it.
The result is a folder `Illume.load`, the tokenizer / decoder loaders and the training engine read
(`configs/converted.py:DIR` as --config; its `model_init.weights_from` starts training from it).
`--to=official` reads a converted folder or a trained workdir (latest checkpoint; a decoder's UNet
EMA) and writes the official layout (safetensors + config.json / a diffusers folder).
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import ml_collections as mlc
import numpy as np
from flax import nnx

from illume_jax import sharding
from illume_jax.convert import files, hf_llm
from illume_jax.convert import weights as weights_lib


def _mesh():
    return sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


def _abstract(make):
    """The model a factory builds, shapes and logical shardings only (nothing allocated)."""
    with sharding.use_mesh(_mesh()):
        return nnx.eval_shape(make)


def _load_config(arg: str) -> mlc.ConfigDict:
    """`path/to/config.py[:args]` -> its get_config(args) (what --config does on the command line)."""
    import importlib.util
    path, _, cfg_arg = arg.partition(":")
    spec = importlib.util.spec_from_file_location("_convert_base_config", path)
    if spec is None or not os.path.exists(path):
        raise ValueError(f"--config={arg!r}: no such config file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(cfg_arg or None)


def _base(base: mlc.ConfigDict | None, default: str) -> mlc.ConfigDict:
    """A copy of the base config (--config), else the kind's default from the repo's configs/."""
    if base is not None:
        return mlc.ConfigDict(base.to_dict())
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return _load_config(os.path.join(root, "configs", default))


def _init_block(config: mlc.ConfigDict, dst: str) -> None:
    with config.unlocked():
        if "model_init" not in config:
            config.model_init = mlc.ConfigDict()
        config.model_init.weights_from = os.path.abspath(dst)


def _tokenizer_file(src: str) -> str | None:
    folder = src if os.path.isdir(src) else os.path.dirname(src)
    path = os.path.join(folder, "tokenizer.json")
    return path if os.path.exists(path) else None


def _llm_model_block(cfg: hf_llm.LLMConfig, base: mlc.ConfigDict) -> mlc.ConfigDict:
    """config.model for `cfg`: the checkpoint's shapes, the base config's numerics and kernels."""
    block = mlc.ConfigDict(dict(base))
    for field in ("family", "text_vocab_size", "vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim", "mlp_dim", "rope_theta", "norm_eps", "qkv_bias", "tie_embeddings"):
        block[field] = getattr(cfg, field)
    return block


def _read_llm(src: str, hf: dict, reader: files.TensorReader, text_vocab: int | None) -> hf_llm.LLMConfig:
    if "model.embed_tokens.weight" not in reader:
        raise ValueError(f"--src={src!r}: no model.embed_tokens.weight (is this an LLM checkpoint?)")
    rows = reader.shape("model.embed_tokens.weight")[0]
    tied = "lm_head.weight" not in reader  # detected from the file: the config flag is not always right
    return hf_llm.config_from_hf(hf, text_vocab_size=min(text_vocab or rows, rows), vocab_size=rows,
                                 tie_embeddings=tied)


# -- official -> ours ------------------------------------------------------------------------------------

def from_official(kind: str, src: str, dst: str, *, base: mlc.ConfigDict | None = None, tokenizer: str = "",
                  dtype: str | None = None, overwrite: bool = False) -> dict:
    """Converts and writes the folder; returns convert.json's contents."""
    if not os.path.exists(src):
        raise ValueError(f"--src={src!r}: no such file or folder")
    if os.path.exists(dst) and os.listdir(dst) and not overwrite:  # before minutes of reading
        raise ValueError(f"--dst={dst!r} exists and is not empty (pass --overwrite to replace it)")
    if kind == "llm":
        return _llm_from_official(src, dst, base, dtype, overwrite)
    if kind == "dualvitok":
        return _dualvitok_from_official(src, dst, base, dtype, overwrite)
    if kind == "mllm":
        return _mllm_from_official(src, dst, base, tokenizer, dtype, overwrite)
    if kind == "sdxl-decoder":
        return _decoder_from_official(src, dst, base, tokenizer, dtype, overwrite)
    raise ValueError(f"--kind={kind!r}: expected one of {weights_lib.KINDS}")


def _llm_from_official(src, dst, base, dtype, overwrite) -> dict:
    from illume_jax.data.tokenizers import HFTokenizer
    from illume_jax.models.llm import LLM
    hf = files.read_json(os.path.join(src if os.path.isdir(src) else os.path.dirname(src), "config.json"),
                         "--kind=llm needs the HF config.json next to the weights")
    reader = files.open_tensors(src)
    tok = _tokenizer_file(src)
    cfg = _read_llm(src, hf, reader, HFTokenizer(tok).vocab_size if tok else None)
    config = _base(base, "tiny.py")
    with config.unlocked():
        config.model = _llm_model_block(cfg, config.model)
        if tok:
            config.tokenizer.kind, config.tokenizer.path = "hf", os.path.join(os.path.abspath(dst), "tokenizer.json")
            config.tokenizer.vocab_size = cfg.text_vocab_size
            config.tokenizer.chat_template = "qwen2" if cfg.family == "qwen2" else "vicuna"
    _init_block(config, dst)
    tensors = hf_llm.hf_to_params(reader, cfg)
    module = _abstract(lambda: LLM(cfg, rngs=nnx.Rngs(0)))
    return weights_lib.save(dst, kind="llm", config=config, module=module, tensors=tensors, dtype=dtype,
                            source=src, extra_files={"tokenizer.json": tok} if tok else {}, overwrite=overwrite)


def _dualvitok_from_official(src, dst, base, dtype, overwrite) -> dict:
    from illume_jax.convert import dualvitok as conv
    from illume_jax.models.dualvitok import DualViTok, DualViTokConfig
    config = _base(base, "dualvitok.py:size=official")
    if config.model.kind != "dualvitok":
        raise ValueError(f"--config: a DualViTok config is needed (config.model.kind={config.model.kind!r})")
    cfg = DualViTokConfig.from_config(config.model)
    # The released file carries the training-only semantic decoder too (spec §6.1); it is kept so
    # the converted tokenizer can be fine-tuned.
    tensors = conv.from_official(files.open_tensors(src), cfg)
    module = _abstract(lambda: DualViTok(cfg, rngs=nnx.Rngs(0)))
    _init_block(config, dst)
    with config.unlocked():
        config.vit_pretrain.steps = 0
    return weights_lib.save(dst, kind="dualvitok", config=config, module=module, tensors=tensors, dtype=dtype,
                            source=src, overwrite=overwrite)


def _converted_tokenizer(path: str, why: str) -> mlc.ConfigDict:
    """The config of the converted DualViTok folder given as --tokenizer (it supplies `why`)."""
    if not weights_lib.is_converted(path):
        raise ValueError(f"--tokenizer={path!r}: give the converted DualViTok folder, for {why} "
                         "(python -m illume_jax convert --from=official --kind=dualvitok ...)")
    weights_lib.check_kind(path, ("dualvitok",), "--tokenizer")
    return weights_lib.read_config(path)


def _mllm_from_official(src, dst, base, tokenizer, dtype, overwrite) -> dict:
    from illume_jax.convert import mllm as conv
    from illume_jax.data.tokenizers import HFTokenizer
    from illume_jax.models.mllm import MLLM, MLLMConfig
    tok_config = _converted_tokenizer(tokenizer, "the MLLM's tower shapes and detokenizer")
    hf = files.read_json(os.path.join(src, "config.json"), "--kind=mllm needs the config.json of the checkpoint")
    reader = files.open_tensors(src)
    llm_cfg = conv.llm_config_from_official(hf, vocab_size=reader.shape("model.embed_tokens.weight")[0],
                                            tie_embeddings=conv.detect_tied(reader, hf))
    size = "3b" if llm_cfg.d_model <= 2048 else "7b"
    config = _base(base, f"illume_plus_{size}.py")
    tok = _tokenizer_file(src)
    with config.unlocked():
        if base is None:  # the released model has been through every stage: fine-tuning it is its stage 3
            config.stages = [st for st in config.stages if st.name == "sft"]
        config.model = _llm_model_block(llm_cfg, config.model)
        if tok:
            config.tokenizer.kind, config.tokenizer.chat_template = "hf", "qwen2"
            config.tokenizer.path = os.path.join(os.path.abspath(dst), "tokenizer.json")
            config.tokenizer.vocab_size = min(HFTokenizer(tok).vocab_size, llm_cfg.text_vocab_size)
        if "vision" not in config:  # a text-only --config
            from configs import common
            config.vision = common.vision_config(resolution=512, max_images=2, vit_trainable_from=16)
        config.vision.tokenizer_workdir = os.path.abspath(tokenizer)
        config.vision.tokenizer_model = tok_config.model
    _init_block(config, dst)
    cfg = MLLMConfig.create(llm_cfg, tok_config.model, vit_trainable_from=int(config.vision.vit_trainable_from),
                            tag_step=int(config.vision.tag_step), max_side=int(config.vision.max_side))
    tensors = conv.from_official(reader, cfg)
    module = _abstract(lambda: MLLM(cfg, rngs=nnx.Rngs(0)))
    return weights_lib.save(dst, kind="mllm", config=config, module=module, tensors=tensors, dtype=dtype,
                            source=src, extra_files={"tokenizer.json": tok} if tok else {}, overwrite=overwrite)


def _decoder_from_official(src, dst, base, tokenizer, dtype, overwrite) -> dict:
    from illume_jax.convert import sdxl_decoder as conv
    from illume_jax.models import diffusion_decoder as dd
    tok_config = _converted_tokenizer(tokenizer, "the code maps that condition the decoder")
    folder = conv.read_folder_configs(src)
    config = _base(base, "diffusion_decoder.py:size=official")
    with config.unlocked():
        sizes = config.model.resolution_group  # output sizes are not in the diffusers files: the base's
        config.model = conv.model_config_from_diffusers(folder["unet"], folder["vae"])
        config.model.resolution_group = sizes
        config.scheduler = mlc.ConfigDict({k: v for k, v in folder["scheduler"].items() if not k.startswith("_")
                                           or k == "_class_name"})
        config.tokenizer = tok_config
        config.tokenizer_workdir = os.path.abspath(tokenizer)
        config.vae_train.steps = 0
        if "model_init" in config:
            config.model_init.vae_from = ""
    _init_block(config, dst)
    cfg = dd.DecoderConfig.from_config(config.model)
    unet_sd = files.open_tensors(os.path.join(src, "unet"))
    vae_sd = files.open_tensors(os.path.join(src, "vae"))
    tensors = conv.from_diffusers(unet_sd, vae_sd, cfg)
    module = _abstract(lambda: dd.DiffusionDecoder(cfg, rngs=nnx.Rngs(0)))
    return weights_lib.save(dst, kind="sdxl-decoder", config=config, module=module, tensors=tensors, dtype=dtype,
                            source=src, overwrite=overwrite)


# -- ours -> official ------------------------------------------------------------------------------------

def _checkpoint_params(workdir: str, step: int | None = None) -> tuple[mlc.ConfigDict, Any]:
    """(config, params nnx.State) of an LLM/MLLM training workdir's checkpoint `step` (default: latest)."""
    from illume_jax.train import state as state_lib
    config, params, _ = state_lib.checkpoint_params(workdir, step, _mesh(), where=f"--src={workdir!r}")
    return config, params


def load_ours(kind: str, src: str, step: int | None = None) -> tuple[mlc.ConfigDict, Any, dict[str, np.ndarray]]:
    """(config, model config, {path: numpy}) of a converted folder or a trained workdir of `kind`
    (LLM / MLLM workdirs: checkpoint `step`, default the latest)."""
    from illume_jax.train import state as state_lib
    src = os.path.abspath(src)
    if kind in ("llm", "mllm"):
        if weights_lib.is_converted(src):
            weights_lib.check_kind(src, (kind,), "--src")
            config = weights_lib.read_config(src)
            cfg = state_lib.model_config(config)
            _, abs_params = state_lib.abstract_model(cfg, _mesh())
            params, _ = weights_lib.restore(src, _with_shardings(abs_params))
        else:
            config, params = _checkpoint_params(src, step)
            cfg = state_lib.model_config(config)
        if ("vision" in config) != (kind == "mllm"):
            raise ValueError(f"--src={src!r} holds {'an MLLM' if 'vision' in config else 'a text LLM'}, not --kind={kind}")
        return config, cfg, weights_lib.flat_numpy(params)
    if kind == "dualvitok":
        from illume_jax.train.tokenizer import load_tokenizer, saved_config
        config = saved_config(src)
        if config is None:
            raise ValueError(f"--src={src!r}: no converted or trained tokenizer there")
        model, _, _ = load_tokenizer(config, src, _mesh())
        return config, model.cfg, weights_lib.flat_numpy(model)
    if kind == "sdxl-decoder":
        from illume_jax.train.decoder import load_decoder
        trainer, state = load_decoder(src, _mesh())
        return trainer.config, trainer.cfg, weights_lib.flat_numpy(trainer.eval_params(state))
    raise ValueError(f"--kind={kind!r}: expected one of {weights_lib.KINDS}")


def _with_shardings(abstract):
    mesh = _mesh()
    with sharding.use_mesh(mesh):
        sh = nnx.get_named_sharding(abstract, mesh)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, sh)


def hf_config_dict(cfg: hf_llm.LLMConfig) -> dict:
    """A transformers config.json for our LLM config (Qwen2 or LLaMA)."""
    d = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim,
             num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
             num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps,
             rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu",
             max_position_embeddings=32768, torch_dtype="float32")
    if cfg.family == "qwen2":
        return dict(d, model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    return dict(d, model_type="llama", architectures=["LlamaForCausalLM"], attention_bias=cfg.qkv_bias)


def to_official(kind: str, src: str, dst: str, *, overwrite: bool = False, max_shard_bytes: int = 5 * 2 ** 30) -> list[str]:
    """Writes the official layout of `src` (a converted folder or trained workdir) into `dst`."""
    config, cfg, flat = load_ours(kind, src)
    with weights_lib.writing(dst, overwrite) as tmp:
        if kind == "sdxl-decoder":
            from illume_jax.convert import sdxl_decoder as conv
            unet_cfg, vae_cfg = _diffusers_configs(config)
            conv.write_folder(tmp, flat, cfg, unet_cfg, vae_cfg, dict(config.scheduler))
        else:
            if kind == "llm":
                sd, hf = hf_llm.params_to_hf(flat, cfg), hf_config_dict(cfg)
            elif kind == "mllm":
                from illume_jax.convert import mllm as conv
                sd, hf = conv.to_official(flat, cfg), conv.official_config_dict(cfg)
            else:
                from illume_jax.convert import dualvitok as conv
                sd, hf = conv.to_official(flat, cfg), None
            files.write_safetensors(tmp, sd, max_shard_bytes=max_shard_bytes)
            if hf is not None:
                with open(os.path.join(tmp, "config.json"), "w") as f:
                    json.dump(hf, f, indent=1)
            tok = config.get("tokenizer", {}).get("path", "") if kind in ("llm", "mllm") else ""
            if tok and os.path.exists(tok):
                shutil.copy(tok, os.path.join(tmp, "tokenizer.json"))
    return sorted(os.listdir(dst))


def _diffusers_configs(config: mlc.ConfigDict) -> tuple[dict, dict]:
    unet = {k: list(v) if isinstance(v, tuple) else v for k, v in dict(config.model.unet).items()}
    vae = {k: list(v) if isinstance(v, tuple) else v for k, v in dict(config.model.vae).items()}
    return dict(unet, _class_name="UNet2DConditionModel"), dict(vae, _class_name="AutoencoderKL")
