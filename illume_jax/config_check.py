"""Validates an experiment config before anything is built or compiled.

Every problem names the config key and what is allowed, so a typo fails in a second at
start-up instead of as an XLA shape error minutes into a run.
"""
from __future__ import annotations

import re
from typing import Any

from configs import common
from illume_jax.models.llm import LLMConfig

SCHEDULES = ("cosine", "linear", "constant")
LOSS_WEIGHTINGS = ("token", "dataset")  # a stage's loss_weighting (train/step.py)
TOKENIZER_KINDS = ("sentencepiece", "hf")
CHAT_TEMPLATES = ("plain", "qwen2", "vicuna")
DATASET_KINDS = ("shapecomp", "jsonl")
MU_DTYPES = ("float32", "bfloat16")


def _fail(key: str, value: Any, expected: str):
    raise ValueError(f"config.{key}={value!r}: expected {expected}")


def _check_keys(prefix: str, section: Any, allowed: set[str]):
    unknown = sorted(set(section.keys()) - allowed)
    if unknown:
        raise ValueError(f"config.{prefix} has unknown keys {unknown}; allowed: {sorted(allowed)}")


def validate(config: Any) -> LLMConfig:
    """Raises ValueError on the first invalid value; returns the parsed LLMConfig."""
    for section in ("model", "mesh", "stages", "optim", "checkpoint", "tokenizer", "data"):
        if section not in config:
            raise ValueError(f"config.{section} is missing")
    llm = LLMConfig.from_config(config.model)

    _check_keys("mesh", config.mesh, {"data", "fsdp", "tensor"})
    if "model_init" in config:
        _check_model_init(config)
    for k, v in config.mesh.items():
        if not isinstance(v, int) or (v < 1 and v != -1):
            _fail(f"mesh.{k}", v, "a positive int or -1 (the remaining devices)")

    _check_keys("optim", config.optim, set(common.optim_config().keys()))
    if config.optim.grad_accum < 1:
        _fail("optim.grad_accum", config.optim.grad_accum, "an int >= 1")
    if config.optim.mu_dtype not in MU_DTYPES:
        _fail("optim.mu_dtype", config.optim.mu_dtype, f"one of {MU_DTYPES}")
    if config.optim.clip_norm < 0:
        _fail("optim.clip_norm", config.optim.clip_norm, ">= 0 (0 disables clipping)")
    _check_keys("checkpoint", config.checkpoint, set(common.checkpoint_config().keys()))
    if config.checkpoint.every_steps < 1 or config.checkpoint.max_to_keep < 1:
        _fail("checkpoint", dict(config.checkpoint), "every_steps >= 1 and max_to_keep >= 1")

    tok = config.tokenizer
    if tok.kind not in TOKENIZER_KINDS:
        _fail("tokenizer.kind", tok.kind, f"one of {TOKENIZER_KINDS}")
    if tok.chat_template not in CHAT_TEMPLATES:
        _fail("tokenizer.chat_template", tok.chat_template, f"one of {CHAT_TEMPLATES}")
    if tok.vocab_size > llm.text_vocab_size:
        _fail("tokenizer.vocab_size", tok.vocab_size, f"<= model.text_vocab_size ({llm.text_vocab_size})")

    datasets = config.data.datasets
    for name, ds in datasets.items():
        if ds.get("kind") not in DATASET_KINDS:
            _fail(f"data.datasets.{name}.kind", ds.get("kind"), f"one of {DATASET_KINDS}")

    if not config.stages:
        _fail("stages", config.stages, "a non-empty list of stages")
    allowed = set(common.stage_config("x").keys())
    names = set()
    for i, st in enumerate(config.stages):
        key = f"stages[{i}]"
        _check_keys(key, st, allowed)
        if st.name in names:
            _fail(f"{key}.name", st.name, "a name unique among stages")
        names.add(st.name)
        for k in ("steps", "seq_len", "global_batch_size"):
            if not isinstance(st[k], int) or st[k] < 1:
                _fail(f"{key}.{k}", st[k], "a positive int")
        if st.global_batch_size % config.optim.grad_accum:
            _fail(f"{key}.global_batch_size", st.global_batch_size,
                  f"a multiple of optim.grad_accum ({config.optim.grad_accum})")
        if st.schedule not in SCHEDULES:
            _fail(f"{key}.schedule", st.schedule, f"one of {SCHEDULES}")
        if st.lr <= 0 or not 0 <= st.end_lr_ratio <= 1 or st.warmup_steps < 0:
            _fail(f"{key}", {"lr": st.lr, "end_lr_ratio": st.end_lr_ratio, "warmup_steps": st.warmup_steps},
                  "lr > 0, 0 <= end_lr_ratio <= 1, warmup_steps >= 0")
        for group in st.lr_multipliers:
            if len(group) != 2 or not isinstance(group[1], (int, float)) or group[1] < 0:
                _fail(f"{key}.lr_multipliers", group, "(regex, multiplier >= 0) pairs")
        for pattern in list(st.trainable) + [g[0] for g in st.lr_multipliers]:
            try:
                re.compile(pattern)
            except re.error as e:
                _fail(f"{key}.trainable", pattern, f"a valid regex ({e})")
        if not st.mixture:
            _fail(f"{key}.mixture", dict(st.mixture), "a non-empty {dataset: weight} mapping")
        for ds, w in st.mixture.items():
            if ds not in datasets:
                _fail(f"{key}.mixture", ds, f"a dataset of config.data.datasets {sorted(datasets.keys())}")
            if w < 0:
                _fail(f"{key}.mixture.{ds}", w, "a weight >= 0")
        if sum(st.mixture.values()) <= 0:
            _fail(f"{key}.mixture", dict(st.mixture), "weights with a positive sum")
        if st.get("loss_weighting", "token") not in LOSS_WEIGHTINGS:
            _fail(f"{key}.loss_weighting", st.loss_weighting, f"one of {LOSS_WEIGHTINGS}")
        if not 0.0 <= st.cfg_dropout < 1.0:
            _fail(f"{key}.cfg_dropout", st.cfg_dropout, "a probability in [0, 1)")
        if st.get("resolution", 0) and "vision" not in config:
            _fail(f"{key}.resolution", st.resolution, "0 in a text-only config (it sizes a multimodal stage's images)")
    if "vision" in config:
        _validate_vision(config)
    if "self_enhance" in config:
        _validate_self_enhance(config)
    return llm


def _validate_self_enhance(config: Any) -> None:
    from configs import common
    se = config.self_enhance
    _check_keys("self_enhance", se, set(common.self_enhance_config().keys()))
    if se.judge not in ("exact", "model", "http"):
        _fail("self_enhance.judge", se.judge, "'exact', 'model' or 'http'")
    if se.judge == "http" and not str(se.http.url).startswith(("http://", "https://")):
        _fail("self_enhance.http.url", se.http.url, "an http(s):// base URL of an OpenAI-compatible endpoint")
    for k in ("num_scenes", "samples_per_prompt", "chunk", "train_steps"):
        if not isinstance(se[k], int) or se[k] < 1:
            _fail(f"self_enhance.{k}", se[k], "a positive int")
    if not 0.0 <= se.mix_weight < 1.0:
        _fail("self_enhance.mix_weight", se.mix_weight, "a share in [0, 1)")
    names = [st.name for st in config.stages]
    if se.from_stage not in ("", "latest", *names):
        _fail("self_enhance.from_stage", se.from_stage, f"'' (the stage before the last), 'latest' or a stage name {names}")
    if se.from_stage == "" and len(names) < 2:
        _fail("self_enhance.from_stage", se.from_stage, "a stage name or 'latest' (the config has one stage)")


def _validate_vision(config: Any) -> None:
    v = config.vision
    _check_keys("vision", v, set(common.vision_config().keys()))
    if config.data.text_only:
        _fail("data.text_only", config.data.text_only, "False for a multimodal config (config.vision is set)")
    for name, ds in config.data.datasets.items():  # per-dataset text_only: images become scene descriptions
        drawn = set(ds.get("tasks", ())) & {"t2i", "edit", "recon"}
        if ds.get("text_only", False) and drawn:
            _fail(f"data.datasets.{name}.text_only", True, f"only for understanding tasks (caption, qa): {sorted(drawn)} "
                  "answer with an image, which a scene description cannot stand in for")
    if not v.tokenizer_workdir and v.tokenizer_model is None:
        _fail("vision.tokenizer_workdir", v.tokenizer_workdir, "a train-tokenizer workdir (DualViTok or semantic VQ)")
    if v.max_images < 1:
        _fail("vision.max_images", v.max_images, "an int >= 1")
    if v.resolution % v.tag_step or not v.tag_step <= v.resolution <= v.max_side:
        _fail("vision.resolution", v.resolution, f"a multiple of vision.tag_step ({v.tag_step}) up to "
                                                 f"vision.max_side ({v.max_side}): it must have resolution tags")
    for i, st in enumerate(config.stages):
        res = st.get("resolution", 0)
        if isinstance(res, bool) or not isinstance(res, int) or res < 0 or (
                res and (res % v.tag_step or not v.tag_step <= res <= v.max_side)):
            _fail(f"stages[{i}].resolution", res, f"0 (vision.resolution) or a multiple of vision.tag_step "
                                                  f"({v.tag_step}) up to vision.max_side ({v.max_side})")
    for a in v.get("anchors", ()):
        if len(a) != 2 or any(isinstance(x, bool) or not isinstance(x, int) or x % v.tag_step
                              or not v.tag_step <= x <= v.max_side for x in a):
            _fail("vision.anchors", a, f"(height, width) pairs of multiples of vision.tag_step ({v.tag_step}) up to "
                                       f"vision.max_side ({v.max_side})")
    slices = v.get("anyres_max_slices", 0)
    if isinstance(slices, bool) or not isinstance(slices, int) or slices < 0:
        _fail("vision.anyres_max_slices", slices, "an int >= 0 (0: every image is one view; ILLUME: 9)")
    pixels = tuple(v.get("understand_pixels", ()))
    if pixels and (len(pixels) != 2 or not all(isinstance(p, int) and not isinstance(p, bool) for p in pixels)
                   or not 0 <= pixels[0] <= pixels[1] or pixels[1] < 32 * 32 or slices):
        _fail("vision.understand_pixels", pixels, "() or (min_pixels, max_pixels) with 0 <= min <= max and max >= 32², "
                                                  "and no vision.anyres_max_slices (one or the other)")
    if not 0.0 <= float(v.get("code_noise", 0.0)) < 1.0:
        _fail("vision.code_noise", v.code_noise, "a rate in [0, 1) (the share of fed-back codes replaced)")
    from illume_jax.train.state import model_config
    mcfg = model_config(config)  # vocabulary rows, codebooks and grids are checked by MLLMConfig
    if pixels and mcfg.levels == 1:
        _fail("vision.understand_pixels", pixels, "() with a semantic VQ tower (its CLIP ViT reads one fixed size; "
                                                  "ILLUME's high-resolution input is vision.anyres_max_slices)")


TOKENIZER_KINDS_MODEL = ("dualvitok", "semantic_vq")
PERCEPTUAL = ("none", "vit", "lpips_vgg")
IMAGE_SOURCES = ("shapecomp", "dataset")


def is_tokenizer_config(config: Any) -> bool:
    """Vision-tokenizer experiment configs have `model.kind` and a `train` block (no LLM stages)."""
    return "model" in config and "kind" in config.model and "train" in config


def _check_weights_from(config: Any, kinds: tuple[str, ...], expected: str = "") -> None:
    """model_init.weights_from, when set, must be a converted-weights folder of one of `kinds`
    (`expected`: what else the caller accepts, for the error message)."""
    path = config.get("model_init", {}).get("weights_from", "")
    if not path:
        return
    from illume_jax.convert import weights
    if not weights.is_converted(path):
        _fail("model_init.weights_from", path,
              "a folder written by `python -m illume_jax convert --from=official`" + expected)
    weights.check_kind(path, kinds, "config.model_init.weights_from")


def _check_model_init(config: Any) -> None:
    """An LLM / MLLM config's model_init: weights_from is a converted-weights folder, or a `train`
    workdir to fork (then weights_step picks its checkpoint, -1 the latest, and reinit names the
    parameters that start afresh)."""
    from illume_jax.train.state import is_train_run
    init = config.model_init
    _check_keys("model_init", init, {"weights_from", "weights_step", "reinit"})
    path = init.get("weights_from", "")
    forks = bool(path) and is_train_run(path)
    if not forks:
        # An MLLM config starts from a converted MLLM, or from a text LLM (its LLM grafted in: train/state.py).
        _check_weights_from(config, ("mllm", "llm") if "vision" in config else ("llm",),
                            " or a `train` workdir with a checkpoint")
    step, reinit = init.get("weights_step", -1), tuple(init.get("reinit", ()))
    if not isinstance(step, int) or step < -1:
        _fail("model_init.weights_step", step, "a checkpoint step >= 0 of the run in weights_from, or -1 (its latest)")
    if not forks and (step != -1 or reinit):
        _fail("model_init", dict(weights_step=step, reinit=reinit),
              "weights_step and reinit only with weights_from a `train` workdir")
    for pattern in reinit:
        try:
            re.compile(pattern)
        except re.error as e:
            _fail("model_init.reinit", pattern, f"a valid regex ({e})")


def validate_tokenizer(config: Any, *, training: bool = True):
    """Validates a vision-tokenizer config (configs/dualvitok.py, configs/semantic_vq_illume.py);
    returns the parsed model config. `training=False` (AOT compiles, encoding with a trained model)
    skips what only a training run needs, such as the LPIPS weights file."""
    from configs.dualvitok import tokenizer_data, tokenizer_train_config, vit_pretrain_config
    for section in ("model", "model_init", "mesh", "data", "vit_pretrain", "train", "checkpoint"):
        if section not in config:
            raise ValueError(f"config.{section} is missing")
    kind = config.model.kind
    if kind == "dualvitok":
        from illume_jax.models.dualvitok import DualViTokConfig as cls
    elif kind == "semantic_vq":
        from illume_jax.models.semantic_vq import SemanticVQConfig as cls
    else:
        _fail("model.kind", kind, f"one of {TOKENIZER_KINDS_MODEL}")
    model = cls.from_config(config.model)
    _check_keys("mesh", config.mesh, {"data", "fsdp", "tensor"})
    _check_keys("data", config.data, set(tokenizer_data("1", 64).keys()))
    _check_keys("vit_pretrain", config.vit_pretrain, set(vit_pretrain_config(0).keys()))
    train_keys = set(tokenizer_train_config(steps=1, batch_size=1, lr=1.0, trainable=(), loss_weights={},
                                            perceptual="none", disc_start=-1, disc_ndf=1, disc_layers=1).keys())
    _check_keys("train", config.train, train_keys)
    _check_keys("checkpoint", config.checkpoint, set(common.checkpoint_config().keys()))
    if config.checkpoint.get("directory"):
        _fail("checkpoint.directory", config.checkpoint.directory, "'' (the tokenizer trainer keeps its phases' "
              "checkpoints in the workdir; only the staged `train` loop reads checkpoint.directory)")
    _check_keys("model_init", config.model_init, {"vit_from", "weights_from", "reinit"})
    from illume_jax.train.tokenizer import is_tokenizer_run
    fine_tunes_run = is_tokenizer_run(config.model_init.weights_from)  # its model is compared at start
    reinit = config.model_init.get("reinit", ())
    if reinit and not fine_tunes_run:
        _fail("model_init.reinit", reinit, "() unless model_init.weights_from names a train-tokenizer workdir")
    for pattern in reinit:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as e:
            _fail("model_init.reinit", pattern, f"a valid regex ({e})")
    if not fine_tunes_run:
        _check_weights_from(config, ("dualvitok",) if kind == "dualvitok" else (),
                            " or a train-tokenizer workdir with a tokenizer checkpoint")
    d, t = config.data, config.train
    if d.source not in IMAGE_SOURCES:
        _fail("data.source", d.source, f"one of {IMAGE_SOURCES}")
    if d.source == "shapecomp":
        from illume_jax.data import shapecomp
        for level in d.levels:
            shapecomp.get_level(level)
    elif not (d.dataset and d.dataset_config):
        _fail("data", dict(dataset=d.dataset, dataset_config=d.dataset_config),
              "source='dataset' needs data.dataset and data.dataset_config")
    if kind == "dualvitok":
        from illume_jax.models.dualvitok import token_grids
        token_grids(d.resolution, d.resolution, model)
    for k in ("steps", "batch_size"):
        if not isinstance(t[k], int) or t[k] < 1:
            _fail(f"train.{k}", t[k], "a positive int")
    for k in ("dead_code_patience", "dead_code_until"):
        if not isinstance(t.get(k, 0), int) or t.get(k, 0) < 0:
            _fail(f"train.{k}", t[k], "an int >= 0 (0 = off / until the last step)")
    if t.get("schedule", "constant") not in SCHEDULES:
        _fail("train.schedule", t.schedule, f"one of {SCHEDULES}")
    if not 0 <= t.get("end_lr_ratio", 1.0) <= 1:
        _fail("train.end_lr_ratio", t.end_lr_ratio, "a number in [0, 1]")
    if t.perceptual not in PERCEPTUAL:
        _fail("train.perceptual", t.perceptual, f"one of {PERCEPTUAL}")
    if training and t.perceptual == "lpips_vgg" and not t.lpips_path:
        _fail("train.lpips_path", t.lpips_path, "a converted LPIPS-VGG16 weights file when perceptual='lpips_vgg'")
    pretrains = config.vit_pretrain.steps > 0 and not config.model_init.weights_from  # weights_from skips it
    if t.perceptual == "vit" and not (pretrains or config.model_init.vit_from or fine_tunes_run):
        _fail("train.perceptual", t.perceptual, "'vit' only with a pre-trained ViT (vit_pretrain.steps > 0, "
              "model_init.vit_from, or model_init.weights_from naming a train-tokenizer run)")
    if config.vit_pretrain.steps > 0 and d.source != "shapecomp":
        _fail("vit_pretrain.steps", config.vit_pretrain.steps, "0 unless data.source='shapecomp' (captions needed)")
    vp = config.vit_pretrain
    if vp.schedule not in SCHEDULES:
        _fail("vit_pretrain.schedule", vp.schedule, f"one of {SCHEDULES}")
    if not 0 <= vp.end_lr_ratio <= 1:
        _fail("vit_pretrain.end_lr_ratio", vp.end_lr_ratio, "a number in [0, 1]")
    for key in ("siglip_weight", "caption_weight", "dense_weight"):
        if vp[key] < 0:
            _fail(f"vit_pretrain.{key}", vp[key], "a weight >= 0")
    if vp.siglip_weight + vp.caption_weight + vp.dense_weight == 0:
        _fail("vit_pretrain.siglip_weight", vp.siglip_weight, "> 0 when caption_weight and dense_weight are 0")
    if vp.dense_object_weight <= 0:
        _fail("vit_pretrain.dense_object_weight", vp.dense_object_weight, "> 0")
    if vp.steps > 0 and vp.dense_weight > 0:
        from illume_jax.models.siglip import token_grid
        rows, cols = token_grid(config)
        if d.resolution % rows or d.resolution % cols:
            _fail("vit_pretrain.dense_weight", vp.dense_weight, f"0 unless the ViT's {rows}x{cols} token grid "
                  f"tiles data.resolution={d.resolution} (each token is labelled by its cell of the image)")
    for pattern in t.trainable:
        try:
            re.compile(pattern)
        except re.error as e:
            _fail("train.trainable", pattern, f"a valid regex ({e})")
    for k, w in t.loss_weights.items():
        if not isinstance(w, (int, float)) or w < 0:
            _fail(f"train.loss_weights.{k}", w, "a number >= 0")
    return model


def is_decoder_config(config: Any) -> bool:
    """Diffusion-decoder experiment configs (configs/diffusion_decoder.py)."""
    return "model" in config and config.model.get("kind") == "diffusion_decoder"


def validate_decoder(config: Any, *, training: bool = True):
    """Validates a diffusion-decoder config; returns the parsed DecoderConfig. The nested
    tokenizer config is validated as a tokenizer config (not for training). `training=False`
    (AOT compiles) skips what only a training run needs: the VAE weights to start from."""
    import importlib
    from illume_jax.models.diffusion_decoder import DecoderConfig
    reference = importlib.import_module("configs.diffusion_decoder").get_config(
        f"conditioning={config.model.get('conditioning', 'illume_plus')}")
    for section in ("model", "model_init", "mesh", "tokenizer", "scheduler", "data", "vae_train", "train", "eval",
                    "checkpoint"):
        if section not in config:
            raise ValueError(f"config.{section} is missing")
        if section not in ("model", "tokenizer", "scheduler") and hasattr(config[section], "keys"):
            _check_keys(section, config[section], set(reference[section].keys()))
    _check_keys("model", config.model, set(reference.model.keys()))
    if config.checkpoint.get("directory"):
        _fail("checkpoint.directory", config.checkpoint.directory, "'' (the decoder trainer keeps its phases' "
              "checkpoints in the workdir; only the staged `train` loop reads checkpoint.directory)")
    model = DecoderConfig.from_config(config.model)
    validate_tokenizer(config.tokenizer, training=False)
    from illume_jax.infer import diffusion
    diffusion.SchedulerConfig.from_diffusers(dict(config.scheduler))
    if config.eval.sampler:
        diffusion.SchedulerConfig.from_diffusers(dict(config.scheduler), sampler=config.eval.sampler)
    for k in ("steps", "batch_size"):
        if not isinstance(config.train[k], int) or config.train[k] < 1:
            _fail(f"train.{k}", config.train[k], "a positive int")
    if not 0.0 <= config.train.cond_drop < 1.0:
        _fail("train.cond_drop", config.train.cond_drop, "a probability in [0, 1)")
    if not 0.0 <= config.train.ema_decay < 1.0:
        _fail("train.ema_decay", config.train.ema_decay, "a decay in [0, 1) (0 = no EMA)")
    factor = 2 ** (len(config.model.vae.block_out_channels) - 1)
    crop = config.vae_train.get("crop", 0)
    if crop and (not isinstance(crop, int) or crop < 0 or crop % factor):
        _fail("vae_train.crop", crop, f"0 (whole images) or a positive multiple of the VAE's downsampling factor {factor}")
    unet_factor = factor * 2 ** (len(config.model.unet.block_out_channels) - 1)
    crop = config.train.get("crop", 0)
    if crop and (not isinstance(crop, int) or crop < 0 or crop % unet_factor):
        _fail("train.crop", crop, f"0 (whole images) or a positive multiple of {unet_factor} (the VAE's and the "
              "UNet's downsampling together)")
    _check_weights_from(config, ("sdxl-decoder",))
    if training and config.vae_train.steps <= 0 and not (config.model_init.vae_from or
                                                         config.model_init.get("weights_from")):
        _fail("model_init.vae_from", config.model_init.vae_from,
              "a converted VAE folder when vae_train.steps is 0 (nothing would train the VAE), or a converted "
              "decoder in model_init.weights_from")
    if config.data.resolution * model.scale % model.latent_factor:
        _fail("data.resolution", config.data.resolution,
              f"a size whose {model.scale}x output is a multiple of the VAE factor {model.latent_factor}")
    return model
