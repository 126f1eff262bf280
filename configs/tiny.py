"""Tiny LLM on ShapeComp text: the built-in default experiment (the demo's training job).

Launch:   python -m illume_jax train --config=configs/tiny.py --workdir=runs/tiny
Args:     --config=configs/tiny.py:steps=120,levels=01,seq_len=128,batch=16,vocab=512,workers=0
Hardware: 2 CPU cores. Two stages (pretrain: all parameters; sft: transformer layers only,
          QA-heavy mixture) of ShapeComp caption + QA text, where each image is replaced by its
          scene description.
Expected: ~1 minute on 2 CPU cores; loss falls from ~6.2 (about ln 512) to ~0.35 over the two stages.
"""
import ml_collections as mlc

from configs import common


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    a = common.parse_arg(arg, steps=120, levels="01", seq_len=128, batch=16, vocab=512, workers=0)
    c = mlc.ConfigDict()
    c.seed = 0
    c.mesh = common.mesh_config()
    # The extra rows stand in for ILLUME's visual/structure tokens (unused by text-only data).
    # attention 'cpu': the per-example kernel, 2.5x the 'xla' one's train step at 4 heads x 512² (bench/attention.py)
    c.model = common.llm_config(text_vocab_size=a.vocab, vocab_size=a.vocab + 64, attention="cpu")
    c.tokenizer = mlc.ConfigDict(dict(
        kind="sentencepiece",    # 'sentencepiece' (trained on the data, cached in the workdir) | 'hf'
        path="",                 # HF tokenizer.json for kind='hf' (Qwen2.5 / LLaMA vocabularies)
        vocab_size=a.vocab,
        chat_template="plain",   # 'plain' | 'qwen2' | 'vicuna'
    ))
    levels = tuple(int(ch) for ch in a.levels)
    c.data = mlc.ConfigDict(dict(
        datasets={
            "shapecomp_caption": dict(kind="shapecomp", levels=levels, tasks=("caption",), num_examples=2000),
            "shapecomp_qa": dict(kind="shapecomp", levels=levels, tasks=("qa",), num_examples=2000),
        },
        text_only=True,          # replace each <image> by the scene description (no vision tower yet)
        num_workers=a.workers,   # Grain worker processes; 0 = in the main process
        shuffle_seed=0,
        data_dir="",             # TFDS data dir; '' = <workdir>/data
    ))
    # Stage 1 learns the language of captions and answers with everything trainable; stage 2
    # fine-tunes on QA with the embeddings frozen and a longer warm-up (an SFT-style stage).
    c.stages = [
        common.stage_config("pretrain", steps=a.steps, seq_len=a.seq_len, global_batch_size=a.batch,
                            lr=3e-3, warmup_steps=10,
                            mixture={"shapecomp_caption": 0.6, "shapecomp_qa": 0.4}),
        common.stage_config("sft", steps=max(a.steps // 2, 1), seq_len=a.seq_len, global_batch_size=a.batch,
                            trainable=("layers/.*", "final_norm/.*"), lr=1e-3, warmup_steps=5,
                            mixture={"shapecomp_caption": 0.2, "shapecomp_qa": 0.8}),
    ]
    c.model_init = common.model_init_config()   # a converted folder or a `train` run to start from
    c.optim = common.optim_config()
    c.checkpoint = common.checkpoint_config(every_steps=25)
    c.log_every = 5
    return c
