"""Shared pieces of every experiment config (big_vision style: plain functions returning ConfigDicts).

A config is built by `get_config(arg)` where `arg` is the text after the colon in
`--config=configs/NAME.py:key=value,...`; `parse_arg` turns it into a ConfigDict with typed
defaults so that a misspelt or mistyped argument fails at start-up.
"""
from __future__ import annotations

import ml_collections as mlc


def parse_arg(arg: str | None, **defaults) -> mlc.ConfigDict:
    """'steps=20,size=7b,runlocal' -> ConfigDict, typed by `defaults` (a bare key means True)."""
    out = mlc.ConfigDict(defaults)
    if not arg:
        return out
    for item in arg.split(","):
        if not item:
            continue
        key, _, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"config argument {key!r} is unknown; allowed: {sorted(defaults)}")
        default = defaults[key]
        if "=" not in item:
            if not isinstance(default, bool):
                raise ValueError(f"config argument {key!r} needs a value (default {default!r})")
            out[key] = True
        elif isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config argument {key}={value!r}: expected true/false")
            out[key] = value.lower() in ("true", "1")
        else:
            try:
                out[key] = type(default)(value)
            except ValueError as e:
                raise ValueError(f"config argument {key}={value!r}: expected {type(default).__name__}") from e
    return out


def llm_config(**overrides) -> mlc.ConfigDict:
    """The LLM block (`config.model`); keys mirror `illume_jax.models.llm.LLMConfig`."""
    c = mlc.ConfigDict(dict(
        family="qwen2",          # 'qwen2' (Qwen2/2.5: GQA, qkv bias) | 'llama' (LLaMA/Vicuna: no bias)
        text_vocab_size=512,     # rows of the text tokenizer; ids >= this are visual/structure tokens
        vocab_size=512,          # total embedding / head rows (text + extra rows, maybe padded)
        d_model=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        mlp_dim=128,
        rope_theta=1_000_000.0,
        norm_eps=1e-6,
        qkv_bias=True,
        tie_embeddings=True,
        dtype="float32",         # compute dtype: bfloat16 on accelerators; params stay param_dtype
        param_dtype="float32",
        attention="xla",         # 'xla' (reference, any backend) | 'cudnn' (GPU) | 'splash' (TPU Pallas)
                                 # | 'cpu' (per-example loop: the fast one on CPU hosts, unsharded batches)
        remat="nothing_saveable",  # 'none' fastest/most memory ... 'nothing_saveable' least memory
        scan_layers=True,        # scan keeps compile time flat in depth
    ))
    c.update(overrides)
    return c


def mesh_config(data: int = -1, fsdp: int = 1, tensor: int = 1) -> mlc.ConfigDict:
    return mlc.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


def optim_config(**overrides) -> mlc.ConfigDict:
    c = mlc.ConfigDict(dict(
        b1=0.9, b2=0.95, eps=1e-8,
        weight_decay=0.0,
        clip_norm=1.0,           # global-norm clipping; 0 disables
        grad_accum=1,            # micro-batches per update (global batch is split into them)
        mu_dtype="float32",      # bfloat16 halves Adam's first-moment memory (big_vision)
    ))
    c.update(overrides)
    return c


def stage_config(name: str, **overrides) -> mlc.ConfigDict:
    """One training stage. Stage N starts from the parameters stage N-1 ended with."""
    c = mlc.ConfigDict(dict(
        name=name,
        steps=100,
        seq_len=128,
        global_batch_size=16,
        # Regexes over '/'-joined parameter paths (e.g. 'layers/attn/q_proj/kernel').
        # Everything not matched is frozen: no gradient update, no optimizer state.
        trainable=(".*",),
        # (regex, learning-rate multiplier) groups, first match wins, e.g. a lower LR for a
        # vision tower: (("vision_tower/.*", 0.1),). Pairs, not a dict: keys may not hold dots.
        lr_multipliers=(),
        lr=1e-3,
        schedule="cosine",       # 'cosine' | 'linear' | 'constant' (all after linear warmup)
        warmup_steps=10,
        end_lr_ratio=0.1,
        # Only the embedding/head rows >= model.text_vocab_size change (ILLUME stage 1).
        new_vocab_only=False,
        mixture={},              # dataset name (in config.data.datasets) -> sampling weight
        # 'token': the loss is the mean NLL over every trained token (the official recipe);
        # 'dataset': each mixture dataset's mean token NLL x its mixture weight, so an image
        # block's hundreds of tokens do not drown a short answer (train/step.py).
        loss_weighting="token",
        # Multimodal stages: probability that a text-to-image / edit record becomes its
        # unconditional form (CFG training; the official value is 0.1).
        cfg_dropout=0.0,
        # Multimodal stages: the square side of this stage's images (tower input, code grids, resolution
        # tags); 0 = vision.resolution, which is also what inference uses. ILLUME+ trains its early
        # stages on 256² and the later ones at ~512² (spec §5.2).
        resolution=0,
    ))
    c.update(overrides)
    return c


def checkpoint_config(**overrides) -> mlc.ConfigDict:
    # keep_stage_ends: each stage's last checkpoint survives max_to_keep pruning (a later stage can be
    # re-run or forked from it; the self-enhancement round starts from the stage-2 model).
    # directory: '' = <workdir>/checkpoints; on a multi-host pod a bucket URL (gs://...) that every
    # host writes its shards to (launch/tpu_pod.sh sets it). The staged `train` loop reads it.
    c = mlc.ConfigDict(dict(every_steps=50, max_to_keep=3, async_save=True, keep_stage_ends=True, directory=""))
    c.update(overrides)
    return c


def model_init_config(**overrides) -> mlc.ConfigDict:
    """`config.model_init` of a `train` config: where the first stage's parameters come from."""
    c = mlc.ConfigDict(dict(
        # '' : initialise from config.seed; a folder from `python -m illume_jax convert`: fine-tune those
        # weights; a `train` workdir: fork that run (its text tokenizer must be this run's too).
        weights_from="",
        weights_step=-1,   # a forked run's checkpoint step; -1 its latest
        reinit=(),         # regexes of parameters a fork initialises afresh (a module the run lacks)
    ))
    c.update(overrides)
    return c


def vision_config(**overrides) -> mlc.ConfigDict:
    """`config.vision` of an MLLM config (models/mllm.py): the frozen vision tokenizer and images."""
    c = mlc.ConfigDict(dict(
        tokenizer_workdir="",     # a train-tokenizer workdir (DualViTok or semantic VQ); its codes are the image tokens
        # The tokenizer's model config, used only when the workdir has no checkpoint yet
        # (shape-only tools: AOT, config checks). A trained checkpoint's own config wins.
        tokenizer_model=None,
        resolution=64,            # square image side fed to the tower and the tokenizer
        max_images=2,             # images per training row (an edit has two)
        vit_trainable_from=0,     # ViT blocks below this get no gradient (official stage 3: 16)
        # k > 1: each image token's projector input is the k x k cells around it (zero-padded), not the
        # cell alone (1: the official per-token MixedProjector); models/mllm.py `neighbourhoods`.
        projector_window=1,
        # True: a learned row / column vector per level where an image cell is read or drawn (not
        # official; models/mllm.py `CellEmbedding`).
        cell_embedding=False,
        # True: where a code is drawn, learned vectors of the codes drawn above it (above-left, above,
        # above-right) are added (not official; models/mllm.py `NeighbourCodeEmbedding`).
        neighbour_codes=False,
        # True: where a pixel code is drawn, a learned vector of the semantic code drawn over that cell
        # is added (not official; models/mllm.py `ParentCodeEmbedding`).
        parent_codes=False,
        # True: where a code is drawn after a continuous image of the same conversation (an edit's source),
        # a learned projection of that image's same cell is added (not official; models/mllm.py
        # `SourceCellProjection`).
        source_cells=False,
        # True: where a code is drawn after a continuous image of the same conversation, the logit of that
        # image's own code of the same cell gets a learned bonus -- a copy path (not official; models/mllm.py
        # `SourceCodeCopy`).
        source_copy=False,
        # True (with source_copy): the copy is a mixture -- the source's code gets at least a learned share
        # of the probability -- not a bonus on its logit (not official; models/mllm.py `add_copy_mixture`).
        copy_mixture=False,
        # > 0: in training, each code the model is fed back (a drawn block's inputs) is replaced by a random
        # code of its level with this probability; targets stay true (not official; models/mllm.py
        # `noisy_code_inputs`).
        code_noise=0.0,
        # > 0: an understanding image larger than one view is shown as a global view + up to this many
        # slices, each its own block (the original ILLUME's high-resolution input: 9; data/anyres.py).
        # Every view takes one of max_images.
        anyres_max_slices=0,
        # (h, w) aspect anchors for inference: editing pads its source to the nearest one and draws there;
        # `generate(size=)` may use any. Empty: the square vision.resolution alone (ILLUME+: 11 near 512²).
        anchors=(),
        # (min, max) pixels: at inference an understanding image keeps its aspect, its sides multiples of 16
        # within these bounds (ILLUME+'s stage 3: 32²..768²; a DualViTok tower). Empty: square at resolution.
        understand_pixels=(),
        tag_step=64,              # resolution tags <height_64> ... <height_1024> (spec §3.2)
        max_side=1024,
    ))
    c.update(overrides)
    return c


def self_enhance_config(**overrides) -> mlc.ConfigDict:
    """`config.self_enhance`: one self-enhancement round (illume_jax/align/round.py)."""
    c = mlc.ConfigDict(dict(
        level=1, split="train",   # ShapeComp prompts: every GenEval-style tag of the first num_scenes scenes
        num_scenes=64,
        samples_per_prompt=1,
        # The round starts from the checkpoint at the end of this stage: '' = the stage before the
        # last (ILLUME: the stage-2 model draws and is judged; stage 3 is trained again with the
        # assessments mixed in), a stage name, or 'latest' (the newest checkpoint).
        from_stage="",
        judge="exact",            # 'exact' (ShapeComp scorer) | 'model' (the MLLM itself) | 'http'
        http=dict(url="", model="gpt-4o", api_key_env="OPENAI_API_KEY", timeout_s=60.0, concurrency=4,
                  max_retries=2),
        chunk=16,                 # samples per resumable part of the generate / judge steps
        seed=0,
        mix_weight=0.2,           # share of the stage-3 batch drawn from the assessment dialogues
        train_steps=100,          # stage-3 steps of the round (the ablation compares at equal steps)
        eval=dict(gen_scenes=16, pope_scenes=20, edit_pairs=16),
    ))
    c.update(overrides)
    return c
