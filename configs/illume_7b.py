"""The original ILLUME (arXiv 2412.06673): Vicuna-7B + a semantic VQ vocabulary, ILLUME's three stages.

AOT check: python -m illume_jax aot --config=configs/illume_7b.py --topology=v5p:4x4x4
           python -m illume_jax aot --config=configs/illume_7b.py --topology=v5p:2x2x1 --what=decode --batch=8
Train:     python -m illume_jax train --config=configs/illume_7b.py:tokenizer=/path/vicuna/tokenizer.json,vq=RUN \
             --config.data.datasets.pretrain.path=... --workdir=gs://...
           (RUN: a `train-tokenizer --config=configs/semantic_vq_illume.py:size=official` workdir; weights from
           a Vicuna-7B conversion: --config.model_init.weights_from=...)
Args:      seq_len=4096, batch=256, steps=1000 (per stage), grad_accum, data, fsdp, tensor, attention, remat,
           tokenizer (a Vicuna tokenizer.json), vq (the semantic VQ's workdir), vit_from=12
Hardware:  a TPU v5p-128 slice (64 chips, FSDP 64); AOT figures in the README.

What the paper states and what is a choice here (no ILLUME code is public; spec §7):
* LLM: Vicuna-7B (LLaMA: d 4096, 32 layers, 32 heads, MLP 11008, 32,000 text ids, RoPE 10,000, untied
  head). Added ids: ILLUME+'s 7 structure tokens and 32 resolution tags, then the semantic VQ's 16,384
  codes -- the layout ILLUME used is unpublished; rows padded to a multiple of 64.
* Tokenizer: the semantic VQ of configs/semantic_vq_illume.py:size=official (a CLIP ViT-L/14-shaped encoder
  at 224²: 16 x 16 = 256 codes per image, 16,384 codes). Image blocks have one level (models/mllm.py).
* Understanding: the same ViT's features through an adapter (a 2-layer GELU MLP); images larger than one
  view are shown as a global view + up to 9 slices (data/anyres.py), each 256 tokens.
* Stages (the paper's names; learning rates and trainable sets are LLaVA-style choices, not the paper's
  unpublished values): 1 visual embedding initialisation (adapter + new vocabulary rows; image
  reconstruction + captioning), 2 unified image-text alignment (LLM + adapter on mixed understanding and
  generation data), 3 SFT (everything, the ViT from block `vit_from`; instruction, generation, editing).
"""
import ml_collections as mlc

from configs import common
from configs import semantic_vq_illume

VICUNA_TEXT_TOKENS = 32_000
SEMANTIC_CODES = 16_384
ADDED_TOKENS = 7 + 32 + SEMANTIC_CODES   # structure + resolution tags + codes
VICUNA_7B = dict(family="llama", d_model=4096, num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
                 mlp_dim=11008, rope_theta=10_000.0, norm_eps=1e-5, qkv_bias=False, tie_embeddings=False,
                 text_vocab_size=VICUNA_TEXT_TOKENS,
                 vocab_size=-(-(VICUNA_TEXT_TOKENS + ADDED_TOKENS) // 64) * 64)


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    a = common.parse_arg(arg, seq_len=4096, batch=256, steps=1000, grad_accum=1, data=1, fsdp=-1, tensor=1,
                         attention="splash", remat="nothing_saveable", tokenizer="", vq="", vit_from=12)
    c = mlc.ConfigDict()
    c.seed = 0
    c.mesh = common.mesh_config(data=a.data, fsdp=a.fsdp, tensor=a.tensor)
    c.model = common.llm_config(dtype="bfloat16", param_dtype="float32", attention=a.attention, remat=a.remat,
                                **VICUNA_7B)
    tok = semantic_vq_illume.model_config("official")
    assert tok.num_codes == SEMANTIC_CODES
    c.vision = common.vision_config(
        tokenizer_workdir=a.vq, tokenizer_model=tok,
        # 256² inputs (a multiple of the 64-pixel resolution tags); the tower resizes each view to its 224².
        resolution=256,
        # An understanding row holds up to 9 slices + the global view; an edit, the source and the target.
        max_images=10, anyres_max_slices=9, vit_trainable_from=int(a.vit_from))
    c.tokenizer = mlc.ConfigDict(dict(kind="hf", path=a.tokenizer, vocab_size=VICUNA_TEXT_TOKENS,
                                      chat_template="vicuna"))
    c.data = mlc.ConfigDict(dict(
        # User data in the LLaVA-style JSONL of spec §5.3 (a record's `task` decides its image blocks).
        datasets={
            "pretrain": dict(kind="jsonl", path="", image_dir=""),         # captions + reconstruction
            "understanding": dict(kind="jsonl", path="", image_dir=""),
            "text_to_image": dict(kind="jsonl", path="", image_dir=""),
            "editing": dict(kind="jsonl", path="", image_dir=""),
        },
        text_only=False, num_workers=8, shuffle_seed=0, data_dir=""))
    run = dict(seq_len=a.seq_len, global_batch_size=a.batch)
    warmup = max(int(0.03 * a.steps), 1)
    cosine = dict(schedule="cosine", end_lr_ratio=0.0, warmup_steps=warmup)
    c.stages = [
        common.stage_config("visual_embedding_init", steps=a.steps, lr=1e-3, new_vocab_only=True,
                            trainable=("projector/.*", "llm/embed/embedding", "llm/lm_head/kernel"),
                            mixture={"pretrain": 1.0}, **cosine, **run),
        common.stage_config("unified_alignment", steps=a.steps, lr=2e-5, trainable=("llm/.*", "projector/.*"),
                            mixture={"pretrain": 0.3, "understanding": 0.3, "text_to_image": 0.4}, **cosine, **run),
        common.stage_config("sft", steps=a.steps, lr=2e-5, trainable=(".*",), cfg_dropout=0.1,
                            mixture={"understanding": 0.5, "text_to_image": 0.35, "editing": 0.15}, **cosine, **run),
    ]
    c.model_init = common.model_init_config()
    c.optim = common.optim_config(b1=0.9, b2=0.999, weight_decay=0.0, clip_norm=1.0, grad_accum=a.grad_accum)
    c.checkpoint = common.checkpoint_config(every_steps=2000, max_to_keep=3)
    c.log_every = 10
    return c
