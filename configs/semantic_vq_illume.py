"""The ILLUME (v1) semantic VQ tokenizer: quantised ViT features with a feature-reconstruction loss.

Launch:   python -m illume_jax train-tokenizer --config=configs/semantic_vq_illume.py:size=tiny --workdir=runs/svq_tiny
Args:     size=tiny|official, steps, batch, pretrain_steps, levels,
          grid=16|32 (tiny only: the token grid of a 64² image; 32 = ViT patch 2, 1,024 tokens per image,
          and a one-upsample pixel head), head_ch (tiny pixel head width, default 32)
Hardware: tiny: 2 CPU cores (ShapeComp level 1, 64² images, patch 4 -> 16x16 = 256 tokens, as the paper's
          256 tokens per image). official: a CLIP-L/14-sized ViT at 224² would give 256 tokens; the
          paper's UNIT encoder is not public, so the width/depth/patch below are a stated choice
          (CLIP ViT-L/14 shapes, 16,384 codes) and the ViT weights come from the user.
Expected: tiny: see the README's tokenizer table.
"""
import ml_collections as mlc

from configs import common
from configs.dualvitok import tokenizer_data, tokenizer_train_config, vit_pretrain_config


GRID_PATCH = {16: 4, 32: 2}  # tiny: token grid of a 64² image -> ViT patch size


def clip_vit(size: str, grid: int = 16) -> dict:
    if size == "official":  # CLIP ViT-L/14 shapes
        return dict(image_size=224, patch_size=14, hidden_size=1024, num_layers=24, num_heads=16, mlp_dim=4096,
                    norm_eps=1e-5)
    if grid not in GRID_PATCH:
        raise ValueError(f"config argument grid={grid}: expected one of {sorted(GRID_PATCH)} (64² images)")
    return dict(image_size=64, patch_size=GRID_PATCH[grid], hidden_size=64, num_layers=3, num_heads=4, mlp_dim=256,
                norm_eps=1e-5, remat="none", attention="cpu")  # per-example kernel: 2-7x on CPU (bench/attention.py)


def pixel_head(grid: int, ch: int) -> dict:
    """The tiny pixel head: the code map up to 64² pixels (16: two upsamples; 32: one, and no
    attention in its blocks -- only the mid block's -- as in configs/dualvitok.py's 32² grid)."""
    if grid == 16:
        return dict(ch=ch, ch_mult=(1, 2, 2), num_res_blocks=1, attn_levels=(2,), z_channels=32, zq_channels=16,
                    num_groups=8)
    return dict(ch=ch, ch_mult=(1, 2), num_res_blocks=1, attn_levels=(), z_channels=32, zq_channels=16, num_groups=8)


def model_config(size: str, grid: int = 16, head_ch: int = 32) -> mlc.ConfigDict:
    if size == "official":
        return mlc.ConfigDict(dict(
            kind="semantic_vq", vit=clip_vit(size), image_size=224, z_channels=32, num_codes=16384,
            l2_normalize=True, ema_decay=0.0, commitment_beta=0.25, decoder_dim=1024, decoder_blocks=4,
            decoder_heads=16, decoder_mlp_dim=4096, feature_loss="cosine", pixel_head=None, pixel_head_grad=False,
            freeze_vit=True, dtype="float32"))
    return mlc.ConfigDict(dict(
        # 256 codes: sized to what level-1 scenes can fill (the official 16,384 at full scale).
        kind="semantic_vq", vit=clip_vit(size, grid), image_size=64, z_channels=16, num_codes=256, l2_normalize=True,
        ema_decay=0.0, commitment_beta=0.25, decoder_dim=64, decoder_blocks=2, decoder_heads=4, decoder_mlp_dim=256,
        feature_loss="cosine",
        # A small MoVQ-style decoder from the code map to 64² pixels (viewing + the ceiling).
        pixel_head=pixel_head(grid, head_ch),
        pixel_head_grad=False, freeze_vit=True, dtype="float32"))


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    a = common.parse_arg(arg, size="tiny", steps=0, batch=0, pretrain_steps=-1, levels="1", workers=0, grid=16,
                         head_ch=32)
    if a.size not in ("tiny", "official"):
        raise ValueError(f"config argument size={a.size!r}: expected 'tiny' or 'official'")
    tiny = a.size == "tiny"
    if not tiny and (a.grid != 16 or a.head_ch != 32):
        raise ValueError("config arguments grid / head_ch are for size=tiny (the official token grid is "
                         "224 / 14 = 16x16 and it has no pixel head)")
    c = mlc.ConfigDict()
    c.seed = 0
    c.mesh = common.mesh_config() if tiny else common.mesh_config(data=1, fsdp=-1)
    c.model = model_config(a.size, a.grid, a.head_ch)
    c.model_init = mlc.ConfigDict(dict(vit_from="", weights_from="", reinit=()))  # as configs/dualvitok.py
    c.data = tokenizer_data(a.levels, resolution=64 if tiny else 224, workers=a.workers)
    c.vit_pretrain = vit_pretrain_config(steps=(400 if tiny else 0) if a.pretrain_steps < 0 else a.pretrain_steps)
    c.train = tokenizer_train_config(
        steps=a.steps or (1200 if tiny else 100_000), batch_size=a.batch or (16 if tiny else 256),
        lr=1e-3 if tiny else 1e-4,
        trainable=("down/.*", "quantizer/.*", "decoder/.*") + (("pixel_in/.*", "pixel_head/.*") if tiny else ()),
        loss_weights=dict(l2=1.0, l1=0.0, perceptual=0.1, gan=0.5, commit=1.0, feature=1.0),
        perceptual="vit" if tiny else "none", disc_start=-1, disc_ndf=16, disc_layers=2)
    if tiny:  # dead-code restarts as in the tiny DualViTok: without them a few dozen codes covered the
        # flat backgrounds and colours (usage 15%, ceiling 0.27); with them 99% at step 300 (README)
        c.train.dead_code_patience = 25
        c.train.dead_code_until = c.train.steps * 5 // 6
    c.checkpoint = common.checkpoint_config(every_steps=250 if tiny else 2000)
    c.train.eval_every = 300 if tiny else 10_000
    c.train.eval_images = 256 if tiny else 512
    c.log_every = 50 if tiny else 100
    return c
