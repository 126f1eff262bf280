"""Command line: `python -m illume_jax <command> --config=configs/NAME.py[:ARGS] [--config.key=value ...] --workdir=DIR`.

Commands:
  pipeline       a pipeline config's phases in one workdir (illume_jax/pipeline.py): the main job
                 (configs/demo.py: tokenizer, pre-tokenization, MLLM stages 1-2 preempted and resumed, a
                 self-enhancement round with stage 3, diffusion decoder, eval -> report.html) and the
                 ablation configs (configs/ablation_*.py); the config's root= must be --workdir
  summarize      a sweep's runs side by side (--workdir=the sweep's --root) -> summary.md
  train          run the config's training stages (resumes from the workdir's checkpoints)
  data build     build/cache the config's datasets and text tokenizer
  data inspect   print a few decoded examples of a dataset (--dataset=NAME, --num=N)
  aot            compile the train step (LLM configs; --what=decode: the generation decode step) or the
                 tokenizer encode (tokenizer configs) ahead of time for a TPU topology (--topology=v5p:4x4x4)
  train-tokenizer  train a vision tokenizer (configs/dualvitok.py, configs/semantic_vq_illume.py),
                 pre-training its tiny semantic ViT first when configured; resumes from the workdir
  eval-tokenizer score the latest tokenizer checkpoint in --workdir (PSNR, SSIM, codebook usage and, on
                 ShapeComp, the tokenizer and editing ceilings and how many codes an edit leaves in place;
                 --num=N validation images, default config.train.eval_images;
                 --unquantized: also with the quantisers bypassed, to tell a codebook limit from an autoencoder one)
                 -> <workdir>/tokenizer/eval_step<S>.json; re-scores old runs after a scorer change
  encode-dataset pre-tokenize the config's images into codes (ArrayRecord) with the trained
                 tokenizer in --workdir (--split=train, --num=0 means all, --min_size=16)
  train-decoder  train a diffusion decoder (configs/diffusion_decoder.py) on the codes of the trained
                 tokenizer in config.tokenizer_workdir (tiny: its VAE first); resumes from the workdir
  eval-decoder   score the latest diffusion-decoder checkpoint in --workdir (no --config: the run's own)
                 as its training does: decoder agreement and PSNR on --num=N validation scenes (default
                 config.eval.num_images), optionally --guidance=S --sampler_steps=N --sampler=euler|ddim|dpm++2m
                 -> <workdir>/unet/eval_step<S>[_overrides].json

Official weights (no --config needed; see illume_jax/convert/official.py):
  convert        --from=official --kind=llm|dualvitok|mllm|sdxl-decoder --src=FILE_OR_DIR --dst=DIR
                 [--tokenizer=CONVERTED_DUALVITOK_DIR (mllm, sdxl-decoder)] [--config=BASE_CONFIG]
                 [--dtype=bfloat16|float32]; or --to=official --kind=... --src=DIR --dst=DIR

MLLM inference (no --config: the model's own config is read from its checkpoint in --workdir):
  generate       text-to-image: --prompt=TEXT (repeatable) [--size=HxW, e.g. 384x768] -> PNGs + results.json in --out
  understand     --image=PNG --question=TEXT (repeat both, paired) -> answers.json in --out
  edit           --image=PNG --instruction=TEXT (repeat both, paired) -> PNGs at the input size in --out
  eval           held-out ShapeComp GenEval-, POPE- and editing-style scores (--level, --eval_split=test|compositional)
                 -> <workdir>/eval/level<L>_<split>/: metrics.json, report.html, GenEval / POPE-format files
  generate / edit / eval also take --guidance, --temperature, --top_k, --top_p (replacing the official sampling
                 values), --level1_temperature (the pixel codes' own temperature; not an official setting)
                 and --pixel_decoder=TOKENIZER_RUN (a pixel decoder retrained on the model's codes)

Self-enhancement (--config: the MLLM config with its self_enhance block; --workdir: the trained MLLM):
  self-enhance   one round: generate -> judge -> assessment dialogues -> stage 3 with them -> eval,
                 in <workdir>/self_enhance/ (resumable at every step; --rerun_from=STEP redoes from there);
                 --ablation --seeds=0,1,2: the same
                 stage-3 budget with and without the dialogues, per seed

The config is validated before anything is built or compiled.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

COMMANDS = ("pipeline", "summarize", "train", "data", "aot", "train-tokenizer", "eval-tokenizer", "encode-dataset",
            "train-decoder", "eval-decoder", "generate", "understand", "edit", "eval", "convert", "self-enhance")
INFERENCE = ("generate", "understand", "edit", "eval")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config: configs/NAME.py[:key=value,...]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (checkpoints, metrics, tokenizer, data).")
_DATASET = flags.DEFINE_string("dataset", None, "data inspect: dataset name from config.data.datasets.")
_NUM = flags.DEFINE_integer("num", 3, "data inspect: number of examples to show; eval-tokenizer / eval-decoder: "
                            "validation images to score (default: the config's).")
_UNQUANTIZED = flags.DEFINE_bool("unquantized", False, "eval-tokenizer: also score images decoded from the "
                                 "un-quantised latents (unquantized_* figures).")
_TOPOLOGY = flags.DEFINE_string("topology", "v5p:4x4x4", "aot: TPU topology name, e.g. v5p:4x4x4 or v5e:2x2.")
_STAGE = flags.DEFINE_integer("stage", -1, "aot: stage index to compile (-1 = the largest sequence).")
_WHAT = flags.DEFINE_enum("what", "train", ["train", "decode"], "aot (LLM configs): the train step or the "
                          "generation loop's decode step (ILLUME+ 512x512 layout, CFG).")
_BATCH = flags.DEFINE_integer("batch", 8, "aot --what=decode: images per batch (2x rows with CFG).")
_SPLIT = flags.DEFINE_string("split", "train", "encode-dataset: split to encode.")
_MIN_SIZE = flags.DEFINE_integer("min_size", 16, "encode-dataset: skip (and count) images with a side below this.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "generate: a text prompt (repeatable).")
_SIZE = flags.DEFINE_string("size", None, "generate: HEIGHTxWIDTH of the images, e.g. 384x768 (multiples of the "
                            "model's tag step; default: its square resolution). ILLUME+ was trained at 11 anchors.")
_IMAGE = flags.DEFINE_multi_string("image", [], "understand / edit: an image file (repeatable).")
_QUESTION = flags.DEFINE_multi_string("question", [], "understand: a question, paired with --image.")
_INSTRUCTION = flags.DEFINE_multi_string("instruction", [], "edit: an instruction, paired with --image.")
_OUT = flags.DEFINE_string("out", None, "generate / understand / edit: output folder (default <workdir>/outputs); "
                           "eval: (default <workdir>/eval/level<L>_<split>).")
_SEED = flags.DEFINE_integer("seed", 0, "generate / edit / eval: sampling seed.")
_GUIDANCE = flags.DEFINE_float("guidance", None, "generate / edit / eval: CFG scale (default: the official 2.0 / "
                               "1.5); eval-decoder: the decoder's CFG scale (default: its config's).")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "generate / edit / eval: image-token sampling temperature "
                                  "(default: the official 1.0 / 0.7; 0 = greedy).")
_LEVEL1_TEMPERATURE = flags.DEFINE_float(
    "level1_temperature", None, "generate / edit / eval: the pixel (level-1) codes' temperature apart from the "
    "semantic codes' --temperature (not an official setting; default: the same as level 0).")
_TOP_K = flags.DEFINE_integer("top_k", None, "generate / edit / eval: top-k of level 0 (level 1 takes 3x, as the "
                              "official settings; default 2048 / 512; 0 = off).")
_TOP_P = flags.DEFINE_float("top_p", None, "generate / edit / eval: top-p (default: the official 1.0 / 0.8).")
_PIXEL_DECODER = flags.DEFINE_string("pixel_decoder", None, "generate / edit / eval: a train-tokenizer workdir that "
                                     "retrained only the pixel decoder of the model's tokenizer; it draws the images.")
_SAMPLER_STEPS = flags.DEFINE_integer("sampler_steps", None, "eval-decoder: diffusion sampling steps.")
_SAMPLER = flags.DEFINE_enum("sampler", None, ["euler", "ddim", "dpm++2m"], "eval-decoder: the diffusion sampler.")
_DECODER = flags.DEFINE_string("diffusion_decoder", None, "generate / edit / eval: a train-decoder workdir; images are "
                               "decoded by that diffusion decoder (2x) instead of the tokenizer's pixel decoder.")
_LEVEL = flags.DEFINE_integer("level", 1, "eval: ShapeComp level of the held-out set.")
_EVAL_SPLIT = flags.DEFINE_enum("eval_split", "test", ["test", "compositional"], "eval: 'test' (held out) or "
                                "'compositional' (levels >= 3: colour-shape pairs never seen in training).")
_GEN_SCENES = flags.DEFINE_integer("gen_scenes", 32, "eval: scenes whose GenEval-style prompts are generated (0: skip the suite).")
_SAMPLES = flags.DEFINE_integer("samples_per_prompt", 2, "eval: images per GenEval-style prompt.")
_POPE_SCENES = flags.DEFINE_integer("pope_scenes", 50, "eval: scenes per POPE-style split (6 questions each; 0: skip).")
_EDIT_PAIRS = flags.DEFINE_integer("edit_pairs", 48, "eval: editing pairs (0: skip).")
_FROM = flags.DEFINE_enum("from", None, ["official"], "convert: read official checkpoint files (--src).")
_TO = flags.DEFINE_enum("to", None, ["official"], "convert: write official checkpoint files (--dst).")
_KIND = flags.DEFINE_enum("kind", None, ["llm", "dualvitok", "mllm", "sdxl-decoder"], "convert: what is converted.")
_SRC = flags.DEFINE_string("src", None, "convert: source file or folder.")
_DST = flags.DEFINE_string("dst", None, "convert: output folder (written under a temporary name, then renamed).")
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "convert --kind=mllm|sdxl-decoder: the converted DualViTok folder.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["bfloat16", "float32"], "convert: stored dtype of the parameters "
                           "(default: as in the source).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "convert: replace a non-empty --dst.")
_ABLATION = flags.DEFINE_bool("ablation", False, "self-enhance: after the round, the with / without ablation of "
                               "its assessment data over --seeds (align/ablation.py).")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "self-enhance --ablation: training seeds.")
_ARMS = flags.DEFINE_list("arms", ["with", "without"], "self-enhance --ablation: which arms to run.")
_RERUN_FROM = flags.DEFINE_enum("rerun_from", None, ["generate", "judge", "dialogues", "train", "eval"],
                                "self-enhance: discard this step's output and the later steps', then run them again.")
_STOP_AFTER_STAGE = flags.DEFINE_string("stop_after_stage", None, "train: stop when the stage of this name ends "
                                        "(the same command without it continues).")
_RESOLUTION = flags.DEFINE_integer("resolution", 0, "aot (tokenizer configs): image side (0 = 512 official / "
                                   "data.resolution).")


def _usage(msg: str) -> None:
    sys.stderr.write(f"error: {msg}\n\n{__doc__}")
    sys.exit(2)


def _convert() -> None:
    import time

    from illume_jax.convert import official
    if (_FROM.value is None) == (_TO.value is None):
        _usage("convert: give exactly one of --from=official or --to=official")
    for name, flag in (("--kind", _KIND), ("--src", _SRC), ("--dst", _DST)):
        if not flag.value:
            _usage(f"convert: {name} is required")
    t0 = time.perf_counter()
    try:
        if _FROM.value:
            meta = official.from_official(_KIND.value, _SRC.value, _DST.value, base=_CONFIG.value,
                                          tokenizer=_TOKENIZER.value, dtype=_DTYPE.value, overwrite=_OVERWRITE.value)
            print(f"converted {meta['tensors']} tensors ({meta['numbers'] / 1e6:.1f}M numbers, dtype {meta['dtype']}) "
                  f"of {_KIND.value} in {time.perf_counter() - t0:.1f} s -> {os.path.abspath(_DST.value)}\n"
                  f"  load: Illume.load / --config=configs/converted.py:{_DST.value}", flush=True)
        else:
            written = official.to_official(_KIND.value, _SRC.value, _DST.value, overwrite=_OVERWRITE.value)
            print(f"wrote official {_KIND.value} files {written} in {time.perf_counter() - t0:.1f} s -> "
                  f"{os.path.abspath(_DST.value)}", flush=True)
    except ValueError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(1)


def _eval_decoder() -> None:
    if not _WORKDIR.value:
        _usage("eval-decoder needs --workdir (a train-decoder workdir)")
    if _CONFIG.value is not None:
        _usage("eval-decoder reads the run's own config from its checkpoint; drop --config")
    logging.set_verbosity(logging.WARNING)
    from illume_jax.train import decoder
    overrides = {k: f.value for k, f in (("guidance_scale", _GUIDANCE), ("steps", _SAMPLER_STEPS),
                                         ("sampler", _SAMPLER)) if f.value is not None}
    try:
        row, path = decoder.evaluate_checkpoint(_WORKDIR.value, num=_NUM.value if _NUM.present else None,
                                                eval_overrides=overrides)
    except ValueError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(1)
    print("eval-decoder:", ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                     for k, v in sorted(row.items())), f"-> {path}", flush=True)


def main(argv: list[str]) -> None:
    args = argv[1:]
    if not args or args[0] not in COMMANDS:
        _usage(f"expected a command, one of {COMMANDS}; got {args[:1] or 'nothing'}")
    command, rest = args[0], args[1:]
    if command in INFERENCE:
        logging.set_verbosity(logging.WARNING)
        _inference(command)
        return
    if command == "convert":
        logging.set_verbosity(logging.WARNING)
        _convert()
        return
    if command == "eval-decoder":
        _eval_decoder()
        return
    if command == "summarize":
        if not _WORKDIR.value:
            _usage("summarize needs --workdir=ROOT (a sweep's --root)")
        from illume_jax.eval import sweep
        try:
            print(sweep.write_summary(_WORKDIR.value), end="", flush=True)
        except ValueError as e:
            sys.stderr.write(f"error: {e}\n")
            sys.exit(1)
        return
    if _CONFIG.value is None:
        _usage("--config is required")

    from illume_jax import config_check
    # TFDS / Orbax log every file they write at INFO; keep the console to what matters.
    logging.set_verbosity(logging.WARNING)
    config = _CONFIG.value
    decoder_config = config_check.is_decoder_config(config)
    tokenizer_config = not decoder_config and config_check.is_tokenizer_config(config)
    if config.get("kind") == "pipeline":  # configs/demo.py: every phase's config, validated before anything runs
        if command != "pipeline":
            _usage(f"{command!r} does not take a pipeline config; pick a phase with "
                   "--config=configs/demo.py:part=tokenizer|mllm|decoder")
        config_check.validate_tokenizer(config.tokenizer)
        config_check.validate(config.mllm)
        if "decoder" in config:
            config_check.validate_decoder(config.decoder)
    elif decoder_config:  # an AOT compile needs no VAE weights (nothing is loaded)
        config_check.validate_decoder(config, training=command == "train-decoder")
        if command not in ("train-decoder", "aot"):
            _usage(f"{command!r} does not take a diffusion-decoder config; those take train-decoder or aot")
    elif tokenizer_config:
        config_check.validate_tokenizer(config, training=command == "train-tokenizer")
        if command not in ("train-tokenizer", "eval-tokenizer", "encode-dataset", "aot"):
            _usage(f"{command!r} needs an MLLM/LLM config; {_CONFIG.value.model.kind} configs take "
                   "train-tokenizer, eval-tokenizer, encode-dataset or aot")
    else:
        config_check.validate(config)
        if command == "train-decoder":
            _usage("'train-decoder' needs a diffusion-decoder config (configs/diffusion_decoder.py)")
        if command in ("train-tokenizer", "eval-tokenizer", "encode-dataset"):
            _usage(f"{command!r} needs a vision-tokenizer config (configs/dualvitok.py, configs/semantic_vq_illume.py)")

    if command == "aot" and decoder_config:
        from illume_jax import aot
        aot.main_decoder(config, topology=_TOPOLOGY.value, resolution=_RESOLUTION.value)
        return
    if command == "aot" and tokenizer_config:
        from illume_jax import aot
        aot.main_tokenizer(config, topology=_TOPOLOGY.value, resolution=_RESOLUTION.value)
        return
    if command == "aot":
        from illume_jax import aot
        aot.main(config, topology=_TOPOLOGY.value, stage_index=_STAGE.value, what=_WHAT.value, batch=_BATCH.value)
        return

    if not _WORKDIR.value:
        _usage("--workdir is required")
    workdir = os.path.abspath(_WORKDIR.value)
    os.makedirs(workdir, exist_ok=True)

    if command == "self-enhance":
        if "vision" not in config or "self_enhance" not in config:
            _usage("'self-enhance' needs an MLLM config with a self_enhance block (configs/illume_tiny.py)")
        from illume_jax.align import round as round_lib
        summary = round_lib.run_round(config, workdir, rerun_from=_RERUN_FROM.value)
        print(f"self-enhancement round done: {os.path.join(workdir, 'self_enhance', 'summary.json')} "
              f"(eval: {summary['eval']})", flush=True)
        if _ABLATION.value:
            from illume_jax.align import ablation
            res = ablation.run_ablation(config, workdir, [int(s) for s in _SEEDS.value], _ARMS.value)
            for arm, m in res["arms"].items():
                print(f"ablation {arm}: geneval {m['geneval_overall']['mean']:.3f} +- {m['geneval_overall']['std']:.3f}, "
                      f"pope {m['pope_accuracy']['mean']:.3f} +- {m['pope_accuracy']['std']:.3f}", flush=True)
        return
    if command == "pipeline":
        from illume_jax import pipeline
        if config.get("kind") != "pipeline":
            _usage("pipeline needs a pipeline config: --config=configs/demo.py[:scale=quick|full] or "
                   "configs/ablation_*.py")
        overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
        pipeline.run(config, workdir, overrides)
    elif command == "train":
        from illume_jax.sharding import maybe_initialize_distributed
        from illume_jax.train import loop
        maybe_initialize_distributed()
        loop.train(config, workdir, stop_after_stage=_STOP_AFTER_STAGE.value)
    elif command == "train-tokenizer":
        from illume_jax.sharding import maybe_initialize_distributed
        from illume_jax.train import tokenizer
        maybe_initialize_distributed()
        out = tokenizer.train_tokenizer(config, workdir)
        if not out["preempted"]:
            final = {k: v for k, v in out["tokenizer"].items() if isinstance(v, (int, float))}
            print("tokenizer:", ", ".join(f"{k}={v:.4g}" for k, v in sorted(final.items())), flush=True)
    elif command == "train-decoder":
        from illume_jax.sharding import maybe_initialize_distributed
        from illume_jax.train import decoder
        maybe_initialize_distributed()
        out = decoder.train_decoder(config, workdir)
        if not out["preempted"]:
            for phase in ("vae", "unet"):
                final = {k: v for k, v in out.get(phase, {}).items() if isinstance(v, (int, float))}
                if final:
                    print(f"{phase}:", ", ".join(f"{k}={v:.4g}" for k, v in sorted(final.items())), flush=True)
    elif command == "eval-tokenizer":
        from illume_jax.train import tokenizer
        row, path = tokenizer.evaluate_checkpoint(config, workdir, num=_NUM.value if _NUM.present else None,
                                                  unquantized=_UNQUANTIZED.value)
        print("eval-tokenizer:", ", ".join(f"{k}={v:.4g}" for k, v in sorted(row.items())), f"-> {path}", flush=True)
    elif command == "encode-dataset":
        from illume_jax.data.encode import encode_dataset
        summary = encode_dataset(config, workdir, split=_SPLIT.value, limit=_NUM.value if _NUM.present else 0,
                                 min_size=_MIN_SIZE.value)
        print(f"encoded {summary['records']} images ({summary['skipped']} skipped) -> {summary['path']} "
              f"in {summary['seconds']} s", flush=True)
    elif command == "data":
        from illume_jax.data import build
        sub = rest[0] if rest else "build"
        data_dir = config.data.data_dir or os.path.join(workdir, "data")
        if sub == "build":
            from illume_jax.data.tokenizers import load_or_train_tokenizer
            infos = build.build_datasets(config, data_dir)
            tok = load_or_train_tokenizer(config, workdir)
            for name, info in infos.items():
                logging.info("dataset %s: %s", name, info)
                print(f"{name}: {info}")
            print(f"tokenizer: vocab {tok.vocab_size}; data in {data_dir}")
        elif sub == "inspect":
            if not _DATASET.value:
                _usage(f"data inspect needs --dataset, one of {sorted(config.data.datasets.keys())}")
            print(build.inspect_dataset(config, data_dir, _DATASET.value, _NUM.value))
        else:
            _usage(f"data: expected 'build' or 'inspect', got {sub!r}")


def _read_image(path: str):
    import numpy as np
    from PIL import Image
    if not os.path.exists(path):
        _usage(f"--image={path!r} does not exist")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as e:
        _usage(f"--image={path!r} is not a readable image ({e})")


def _inference(command: str) -> None:
    import json

    from illume_jax.infer.illume import Illume
    from illume_jax.infer import interleaved
    if not _WORKDIR.value:
        _usage(f"{command} needs --workdir (a `train` workdir of an MLLM config)")
    workdir = os.path.abspath(_WORKDIR.value)
    out = os.path.abspath(_OUT.value or os.path.join(workdir, "outputs"))
    if command == "generate" and not _PROMPT.value:
        _usage("generate needs at least one --prompt")
    size = None
    if _SIZE.value is not None:
        if command != "generate":
            _usage(f"--size is for generate (edit draws at its source's nearest anchor), not {command}")
        parts = _SIZE.value.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            _usage(f"--size={_SIZE.value!r}: expected HEIGHTxWIDTH, e.g. 384x768")
        size = (int(parts[0]), int(parts[1]))
    if command in ("understand", "edit"):
        paired = _QUESTION.value if command == "understand" else _INSTRUCTION.value
        what = "--question" if command == "understand" else "--instruction"
        if not _IMAGE.value or len(_IMAGE.value) != len(paired):
            _usage(f"{command} needs --image and {what} in pairs (got {len(_IMAGE.value)} and {len(paired)})")
    overrides = dict(temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
                     guidance_scale=_GUIDANCE.value, level1_temperature=_LEVEL1_TEMPERATURE.value)
    if command == "understand" and any(v is not None for v in overrides.values()):
        _usage("understand answers greedily: --guidance / --temperature / --level1_temperature / --top_k / --top_p "
               "are for generate, edit and eval")
    try:
        samplings = {task: interleaved.Sampling.for_task(task, **overrides) for task in ("t2i", "edit")}
    except ValueError as e:
        _usage(str(e))
    model = Illume.load(workdir, diffusion_decoder=_DECODER.value, pixel_decoder=_PIXEL_DECODER.value)
    if command == "eval":
        from illume_jax.eval import mllm as mllm_eval
        results = mllm_eval.evaluate_and_report(
            model, workdir, level=_LEVEL.value, split=_EVAL_SPLIT.value, gen_scenes=_GEN_SCENES.value,
            samples_per_prompt=_SAMPLES.value, pope_scenes=_POPE_SCENES.value, edit_pairs=_EDIT_PAIRS.value,
            seed=_SEED.value, out_dir=_OUT.value, t2i_sampling=samplings["t2i"], edit_sampling=samplings["edit"])
        print(json.dumps(results, indent=1))
        return
    from PIL import Image
    os.makedirs(out, exist_ok=True)
    sampling = samplings.get("t2i" if command == "generate" else command)
    records = []
    if command == "generate":
        if size is not None:
            try:
                model.check_size(size, "--size")   # the model's tag step and largest side
            except ValueError as e:
                _usage(str(e))
        images = model.generate(_PROMPT.value, seed=_SEED.value, sampling=sampling, progress=True, size=size)
        for k, (prompt, img) in enumerate(zip(_PROMPT.value, images)):
            path = os.path.join(out, f"generate_{k:03d}.png")
            Image.fromarray(img).save(path)
            records.append({"prompt": prompt, "image": path})
    elif command == "edit":
        sources = [_read_image(p) for p in _IMAGE.value]
        images = model.edit(sources, _INSTRUCTION.value, seed=_SEED.value, sampling=sampling, progress=True)
        for k, (src, instr, img) in enumerate(zip(_IMAGE.value, _INSTRUCTION.value, images)):
            path = os.path.join(out, f"edit_{k:03d}.png")
            Image.fromarray(img).save(path)
            records.append({"image": src, "instruction": instr, "result": path})
    else:
        answers = model.understand([_read_image(p) for p in _IMAGE.value], _QUESTION.value, progress=True)
        records = [{"image": p, "question": q, "answer": a} for p, q, a in zip(_IMAGE.value, _QUESTION.value, answers)]
    path = os.path.join(out, f"{command}.json")
    with open(path, "w") as f:
        json.dump(records, f, indent=1)
    for r in records:
        print(json.dumps(r))
    print(f"wrote {path}")


def run() -> None:
    # grain/absl: flags must count as parsed even when the library is driven from here.
    app.run(main)
