"""ILLUME+ (Qwen2.5-3B / 7B-Instruct + DualViTok vocabulary): the shared body of the two
size configs. Shapes and vocabulary follow the official release (spec §3.1, §3.2, §5.2).

The LLM part is complete here; later issues add the vision tower, projectors, tokenizer
and diffusion decoder to the same configs.
"""
import ml_collections as mlc

from configs import common

QWEN_TEXT_TOKENS = 151_665     # Qwen2.5 tokenizer length before ILLUME+'s additions
ILLUME_ADDED_TOKENS = 131_111  # 7 structure + 32 resolution tags + 32,768 + 98,304 image tokens

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
                         tokenizer="")
    if a.size not in SIZES:
        raise ValueError(f"config argument size={a.size!r}: expected one of {sorted(SIZES)}")
    c = mlc.ConfigDict()
    c.seed = 423  # the official stage-3 seed
    c.mesh = common.mesh_config(data=a.data, fsdp=a.fsdp, tensor=a.tensor)
    c.model = common.llm_config(family="qwen2", text_vocab_size=QWEN_TEXT_TOKENS, rope_theta=1_000_000.0,
                                norm_eps=1e-6, qkv_bias=True, dtype="bfloat16", param_dtype="float32",
                                attention=a.attention, remat=a.remat, **SIZES[a.size])
    c.tokenizer = mlc.ConfigDict(dict(kind="hf", path=a.tokenizer, vocab_size=QWEN_TEXT_TOKENS,
                                      chat_template="qwen2"))
    c.data = mlc.ConfigDict(dict(
        # User data in the official LLaVA-style JSONL (spec §5.3); set the paths to train.
        datasets={
            "understanding": dict(kind="jsonl", path="", image_dir=""),
            "text_to_image": dict(kind="jsonl", path="", image_dir=""),
            "editing": dict(kind="jsonl", path="", image_dir=""),
        },
        text_only=False,
        num_workers=8,
        shuffle_seed=0,
        data_dir="",
    ))
    mixture = {"understanding": 0.5, "text_to_image": 0.4, "editing": 0.1}
    common_stage = dict(seq_len=a.seq_len, global_batch_size=a.batch, mixture=mixture)
    c.stages = [
        # Stage 1 (official issue #5): LLM frozen, only the new vocabulary rows of the
        # embedding and head learn (gradient rows < 151,665 zeroed).
        common.stage_config("visual_embedding_init", steps=a.steps, trainable=("embed/.*", "lm_head/.*"),
                            new_vocab_only=True, lr=1e-3, warmup_steps=max(a.steps // 33, 1),
                            **common_stage),
        # Stage 3 as released: everything trainable, lr 2e-5 cosine, 3% warm-up, wd 0, beta2 0.95.
        common.stage_config("sft", steps=a.steps, lr=2e-5, schedule="cosine", end_lr_ratio=0.0,
                            warmup_steps=max(int(0.03 * a.steps), 1), **common_stage),
    ]
    c.model_init = common.model_init_config()   # a converted folder or a `train` run to start from
    c.optim = common.optim_config(b1=0.9, b2=0.95, weight_decay=0.0, clip_norm=1.0, grad_accum=a.grad_accum)
    c.checkpoint = common.checkpoint_config(every_steps=2000, max_to_keep=3)
    c.log_every = 10
    return c
