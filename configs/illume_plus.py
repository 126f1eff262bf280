"""ILLUME+ (Qwen2.5-3B / 7B-Instruct + DualViTok vocabulary): the shared body of the two
size configs. Shapes and vocabulary follow the official release (spec §3.1, §3.2, §5.2).

Train (3B; 7B alike with configs/illume_plus_7b.py):
  python -m illume_jax convert --from=official --kind=llm --src=ckpt/Qwen2.5-3B-Instruct --dst=runs/qwen_3b
  python -m illume_jax train --config=configs/illume_plus_3b.py:tokenizer=runs/qwen_3b/tokenizer.json,\
      dualvitok=runs/official/dualvitok --config.model_init.weights_from=runs/qwen_3b \
      --config.data.datasets.pretrain.path=... --workdir=gs://...
  (to fine-tune the released ILLUME+ instead: --config=configs/converted.py:runs/official/illume_plus_3b)

Args: size, seq_len=4096, batch=256, steps=1000 (per stage), grad_accum, data, fsdp, tensor, attention,
      remat, tokenizer (Qwen2.5's tokenizer.json), dualvitok (the vision tokenizer's workdir: a converted
      `ILLUME-MLLM/dualvitok` or a `train-tokenizer --config=configs/dualvitok.py:size=official` run),
      vit_from=16 (the official stage 3 trains ViT blocks 16-31 and the merger).

The model is the whole MLLM: the DualViTok tower (Qwen2-VL-7B ViT + MoVQ pixel encoder), the two MLP
projectors and the LLM; the frozen DualViTok turns images into target codes inside the train step.
What is released and what is a choice (spec §5.2: only stage 3's config is public):
* stage 3 `sft` is the released config: everything trains (the ViT from block `vit_from`; of the pixel
  encoder, all but its `down` levels), lr 2e-5 cosine, 3% warm-up, wd 0, beta2 0.95, seed 423, 10% text
  dropout for CFG, 4,096-token rows of 256;
* stage 1 `visual_embedding_init` follows the maintainers' word (issue #5): the LLM frozen, the projectors
  and the new vocabulary rows of the embedding and head train. Its data (captions + image reconstruction,
  the original ILLUME's task) and learning rate are ILLUME's recipe carried over, not published values;
* stage 2 `unified_alignment` and 2.5 `alignment_512` (Data.md's stages: 256² images for 1-2, ~512² for 2.5-3)
  train the LLM and projectors on mixed data; their learning rates and mixtures are choices;
* training images are square (256² in stages 1-2, 512² in 2.5-3); the official training crops to the nearest
  of 11 aspect anchors near 512², which the train pipeline does not build. Inference has the anchors
  (`vision.anchors`): editing pads to the nearest, `generate(size=)` draws at any; and understanding images
  keep their aspect there (`vision.understand_pixels`, 32²..768²), which training's square rows do not.
"""
import ml_collections as mlc

from configs import common
from configs import dualvitok

QWEN_TEXT_TOKENS = 151_665     # Qwen2.5 tokenizer length before ILLUME+'s additions
ILLUME_ADDED_TOKENS = 131_111  # 7 structure + 32 resolution tags + 32,768 + 98,304 image tokens

# The 11 aspect anchors of stages 2.5-3 and inference (spec §1.8: models/dualvitok.py ANCHORS, less 256²).
ANCHORS = ((512, 512), (384, 512), (512, 384), (384, 768), (768, 384), (384, 576), (576, 384), (320, 960),
           (960, 320), (256, 1024), (1024, 256))

SIZES = {
    # Rows = the base checkpoint's (padded) embedding rows + the added tokens (spec §3.2).
    "3b": dict(d_model=2048, num_layers=36, num_heads=16, num_kv_heads=2, head_dim=128, mlp_dim=11008,
               vocab_size=151_936 + ILLUME_ADDED_TOKENS,
               # Qwen2.5-3B ties its head, but the ILLUME+ 3B checkpoint appears to store lm_head
               # separately (spec §6.2, unverified); untied is the larger, safer assumption for sizing.
               tie_embeddings=False),
    "7b": dict(d_model=3584, num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, mlp_dim=18944,
               vocab_size=152_064 + ILLUME_ADDED_TOKENS, tie_embeddings=False),
}


def get_config(arg: str | None = None, size: str = "7b") -> mlc.ConfigDict:
    a = common.parse_arg(arg, size=size, seq_len=4096, batch=256, steps=1000, grad_accum=1,
                         data=1, fsdp=-1, tensor=1, attention="splash", remat="nothing_saveable",
                         tokenizer="", dualvitok="", vit_from=16)
    if a.size not in SIZES:
        raise ValueError(f"config argument size={a.size!r}: expected one of {sorted(SIZES)}")
    c = mlc.ConfigDict()
    c.seed = 423  # the official stage-3 seed
    c.mesh = common.mesh_config(data=a.data, fsdp=a.fsdp, tensor=a.tensor)
    c.model = common.llm_config(family="qwen2", text_vocab_size=QWEN_TEXT_TOKENS, rope_theta=1_000_000.0,
                                norm_eps=1e-6, qkv_bias=True, dtype="bfloat16", param_dtype="float32",
                                attention=a.attention, remat=a.remat, **SIZES[a.size])
    c.vision = common.vision_config(
        tokenizer_workdir=a.dualvitok, tokenizer_model=dualvitok.model_config("official"),
        # Inference and the later stages: 512² (18x18 semantic + 32x32 pixel codes, a 1,404-token block).
        resolution=512, max_images=2, vit_trainable_from=int(a.vit_from), anchors=ANCHORS,
        understand_pixels=(32 * 32, 768 * 768))   # the released stage 3's tower bounds (spec §5.2)
    c.tokenizer = mlc.ConfigDict(dict(kind="hf", path=a.tokenizer, vocab_size=QWEN_TEXT_TOKENS,
                                      chat_template="qwen2"))
    c.data = mlc.ConfigDict(dict(
        # User data in the official LLaVA-style JSONL (spec §5.3); set the paths to train.
        datasets={
            "pretrain": dict(kind="jsonl", path="", image_dir=""),   # captions + image reconstruction
            "understanding": dict(kind="jsonl", path="", image_dir=""),
            "text_to_image": dict(kind="jsonl", path="", image_dir=""),
            "editing": dict(kind="jsonl", path="", image_dir=""),
        },
        text_only=False,
        num_workers=8,
        shuffle_seed=0,
        data_dir="",
    ))
    run = dict(seq_len=a.seq_len, global_batch_size=a.batch)
    warmup = max(int(0.03 * a.steps), 1)
    cosine = dict(schedule="cosine", end_lr_ratio=0.0, warmup_steps=warmup)
    aligned = dict(trainable=("llm/.*", "projector/.*"), lr=2e-5, **cosine, **run)
    c.stages = [
        # Stage 1 (official issue #5): LLM and tower frozen; the projectors and only the new vocabulary
        # rows of the embedding and head learn (gradient rows < 151,665 zeroed).
        common.stage_config("visual_embedding_init", steps=a.steps, lr=1e-3, new_vocab_only=True, resolution=256,
                            trainable=("projector/.*", "llm/embed/embedding", "llm/lm_head/kernel"),
                            mixture={"pretrain": 1.0}, **cosine, **run),
        common.stage_config("unified_alignment", steps=a.steps, resolution=256,
                            mixture={"pretrain": 0.2, "understanding": 0.4, "text_to_image": 0.4}, **aligned),
        common.stage_config("alignment_512", steps=a.steps,
                            mixture={"understanding": 0.4, "text_to_image": 0.4, "editing": 0.2}, **aligned),
        # Stage 3 as released: everything but the tower's frozen parts trains (no separate tower LR: the
        # config's mm_vision_tower_lr is ignored by the official trainer, spec §5.2).
        common.stage_config("sft", steps=a.steps, lr=2e-5, cfg_dropout=0.1,
                            trainable=("llm/.*", "projector/.*", "vision/vit/.*", "vision/pixel_encoder/(?!down/).*"),
                            mixture={"understanding": 0.5, "text_to_image": 0.4, "editing": 0.1}, **cosine, **run),
    ]
    c.model_init = common.model_init_config()   # a converted folder or a `train` run to start from
    c.optim = common.optim_config(b1=0.9, b2=0.95, weight_decay=0.0, clip_norm=1.0, grad_accum=a.grad_accum)
    c.checkpoint = common.checkpoint_config(every_steps=2000, max_to_keep=3)
    c.log_every = 10
    return c
