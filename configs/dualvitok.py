"""DualViTok, the ILLUME+ vision tokenizer (spec §1), and its trainer.

Launch:   python -m illume_jax train-tokenizer --config=configs/dualvitok.py:size=tiny --workdir=runs/dualvitok_tiny
Args:     size=tiny|official, steps, batch, pretrain_steps (tiny SigLIP pre-training of the ViT), levels,
          shape_twins=k (SigLIP batches of scenes each with k one-shape-changed twins, so that the ViT must see shape),
          caption_weight=w (w > 0: a captioning loss beside SigLIP's, the dense caption read off the ViT's tokens),
          pixel_grid=16|32 (tiny only: the pixel code grid of a 64² image; 32 = one fewer down block),
          local_pixels=0|1 (1: a local pixel encoder -- per-position norms, no attention, no mid block --
                     so a pixel code depends only on the pixels in its receptive field; not official.
                     README, "A local pixel encoder"),
          supervision=semantic|pixel  semantic (default): the spec's tokenizer, level-0 codes from a frozen
                     text-aligned ViT trained to reconstruct its features. pixel: the ILLUME tokenizer
                     ablation's control -- the same network and code grids trained on pixel reconstruction
                     only (ViT trainable from random, no SigLIP, no feature loss, no perceptual loss).
Hardware: tiny: 2 CPU cores (ShapeComp level 1, 64² images -> 8x8 semantic + 16x16 pixel codes).
          official: the released shapes (Qwen2-VL-7B ViT, 32,768 + 98,304 codes, 256-512² images);
          official weights load through the converter; training follows spec §5.1 (bs 256, Adam 1e-4,
          betas 0.9/0.95, L2 + LPIPS + PatchGAN hinge from step 20k at 0.5).
Expected: tiny: see the README's tokenizer table (ceiling, usage, PSNR, time).
"""
import ml_collections as mlc

from configs import common


def qwen2_vit(size: str) -> dict:
    if size == "official":  # Qwen2-VL-7B's ViT (Emova-ollm/qwen2vit600m), spec §1.2
        return dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4.0, patch_size=14, temporal_patch_size=2,
                    spatial_merge_size=2, in_channels=3, hidden_size=3584)
    # remat 'none': at this size recomputation costs more than the memory it saves. attention 'cpu':
    # the per-example kernel (modules/attention.py), 2-7x the 'xla' one on CPU (bench/attention.py).
    return dict(depth=3, embed_dim=64, num_heads=4, mlp_ratio=4.0, patch_size=4, temporal_patch_size=2,
                spatial_merge_size=2, in_channels=3, hidden_size=128, remat="none", attention="cpu")


def movq(size: str, part: str, pixel_grid: int = 16) -> dict:
    """MoVQ encoder/decoder shapes. Tiny: 64² images -> a `pixel_grid`² code grid (16: two down
    blocks, 4x4 px per code; 32: one, 2x2 px per code). At 32² the mid blocks keep their attention
    but the level's blocks drop theirs: 1,024-token attention there made a training step 2.0x the
    16² grid's cost instead of 1.4x (fwd+bwd, batch 16, 2 CPU cores)."""
    if size == "official":
        if part == "encoder":
            return dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_levels=(4,), z_channels=32)
        return dict(ch=384, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_levels=(4,), z_channels=64,
                    zq_channels=64)
    mults = {16: (1, 2, 2), 32: (1, 2)}
    if pixel_grid not in mults:
        raise ValueError(f"config argument pixel_grid={pixel_grid}: expected one of {sorted(mults)} (64² images)")
    mult = mults[pixel_grid]
    level_attn = (len(mult) - 1,) if pixel_grid == 16 else ()
    if part == "encoder":
        return dict(ch=16, ch_mult=mult, num_res_blocks=1, attn_levels=level_attn, z_channels=16, num_groups=8)
    return dict(ch=32, ch_mult=mult, num_res_blocks=1, attn_levels=level_attn, z_channels=32, zq_channels=32,
                num_groups=8)


def model_config(size: str, pixel_grid: int = 16) -> mlc.ConfigDict:
    if size == "official":
        return mlc.ConfigDict(dict(
            kind="dualvitok", vit=qwen2_vit(size), semantic_dim=1280, semantic_blocks=4, semantic_heads=16,
            semantic_mlp_dim=5120, semantic_decoder_blocks=4, z_channels=32, semantic_codes=32768,
            pixel_encoder=movq(size, "encoder"), pixel_decoder=movq(size, "decoder"), pixel_codes=98304,
            quantizer_chunk=32768, commitment_beta=0.25,
            # The released any-resolution checkpoint trains without noise injection (spec §1.9).
            pixel_drop_rate=0.0, pixel_drop_batch_rate=0.1, pixel_noise_type="random",
            freeze_vit=True, dtype="float32"))
    return mlc.ConfigDict(dict(
        kind="dualvitok", vit=qwen2_vit(size), semantic_dim=64, semantic_blocks=2, semantic_heads=4,
        # 64 semantic / 512 pixel codes: with dead-code restarts (train.dead_code_patience) level-1
        # scenes keep >= 90% of both books in use (README, tokenizer section); 128 pixel codes
        # without restarts settled at 63% used and drew small shapes as blobs.
        semantic_mlp_dim=256, semantic_decoder_blocks=2, z_channels=16, semantic_codes=64,
        pixel_encoder=movq(size, "encoder", pixel_grid), pixel_decoder=movq(size, "decoder", pixel_grid),
        pixel_codes=512,
        quantizer_chunk=32768, commitment_beta=0.25,
        pixel_drop_rate=0.0, pixel_drop_batch_rate=0.1, pixel_noise_type="random", freeze_vit=True,
        dtype="float32"))


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    a = common.parse_arg(arg, size="tiny", steps=0, batch=0, pretrain_steps=-1, levels="1", workers=0,
                         supervision="semantic", pixel_grid=16, shape_twins=0,
                         caption_weight=0.0, dense_weight=0.0, local_pixels=0)
    tiny = a.size == "tiny"
    if a.size not in ("tiny", "official"):
        raise ValueError(f"config argument size={a.size!r}: expected 'tiny' or 'official'")
    if a.supervision not in ("semantic", "pixel"):
        raise ValueError(f"config argument supervision={a.supervision!r}: expected 'semantic' or 'pixel'")
    if a.pixel_grid != 16 and not tiny:
        raise ValueError(f"config argument pixel_grid={a.pixel_grid}: only size=tiny takes it (the official "
                         "grid follows the released MoVQ)")
    pixel_only = a.supervision == "pixel"
    c = mlc.ConfigDict()
    c.seed = 0
    c.mesh = common.mesh_config() if tiny else common.mesh_config(data=1, fsdp=-1)
    c.model = model_config(a.size, a.pixel_grid)
    if str(a.local_pixels) not in ("0", "1"):
        raise ValueError(f"config argument local_pixels={a.local_pixels!r}: expected 0 or 1")
    if str(a.local_pixels) == "1":
        c.model.pixel_encoder.update(local=True, attn_levels=())
    if pixel_only:  # the ViT learns from pixels like the rest of the encoder (a VQGAN-style tokenizer)
        c.model.freeze_vit = False
    c.model_init = mlc.ConfigDict(dict(
        vit_from="",             # folder with a pre-trained ViT ('<workdir>/vit_pretrain/final_vit' layout)
        weights_from="",         # fine-tune: a converted DualViTok folder (`convert --kind=dualvitok`) or a
                                 # train-tokenizer workdir (its latest checkpoint)
        reinit=(),               # with a workdir: regexes of variables left freshly initialised (say
                                 # 'pixel_decoder/.*' for a new decoder on a trained encoder)
    ))
    c.data = tokenizer_data(a.levels, resolution=64 if tiny else 256, workers=a.workers)
    pretrain = (400 if tiny else 0) if a.pretrain_steps < 0 else a.pretrain_steps
    c.vit_pretrain = vit_pretrain_config(steps=0 if pixel_only else pretrain, shape_twins=int(a.shape_twins),
                                         caption_weight=float(a.caption_weight), dense_weight=float(a.dense_weight))
    c.train = tokenizer_train_config(
        steps=a.steps or (1200 if tiny else 200_000), batch_size=a.batch or (16 if tiny else 256), lr=1e-4 * (
            10 if tiny else 1),
        # Trainable: everything but the ViT (which is frozen, spec §5.1).
        trainable=("semantic_encoder/(proj_in|blocks|proj_out)/.*", "semantic_quantizer/.*", "semantic_decoder/.*",
                   "pixel_.*") + (("semantic_encoder/vit/.*",) if pixel_only else ()),
        # l1: off as in the official recipe (L2 only); taming-VQGAN's L1 pixel loss when > 0.
        loss_weights=dict(l2=1.0, l1=0.0, perceptual=1.0 if not tiny else 0.1, gan=0.5, pixel_commit=1.0,
                          semantic_commit=1.0, semantic_cosine=0.0 if pixel_only else 1.0),
        # pixel: no text-aligned network anywhere (the tiny perceptual loss uses the SigLIP ViT's features).
        perceptual="none" if pixel_only else ("vit" if tiny else "lpips_vgg"),
        # Tiny: no GAN (flat-colour scenes; L2 + ViT-perceptual already give sharp edges, and the
        # discriminator would cost ~15% of a CPU step). The switch-on is tested in tests/train.
        disc_start=-1 if tiny else 20_000, disc_ndf=16 if tiny else 64, disc_layers=2 if tiny else 3)
    if tiny:  # restart codes unused for 25 steps (~100k pixel tokens), and hold the book still for
        # the last sixth of training so the decoder settles on it
        c.train.dead_code_patience = 25
        c.train.dead_code_until = c.train.steps * 5 // 6
    c.train.eval_every = 300 if tiny else 10_000
    c.train.eval_images = 256 if tiny else 512
    c.checkpoint = common.checkpoint_config(every_steps=250 if tiny else 2000)
    c.log_every = 50 if tiny else 100
    return c


def tokenizer_data(levels: str, resolution: int, workers: int = 0) -> mlc.ConfigDict:
    return mlc.ConfigDict(dict(
        source="shapecomp",     # 'shapecomp' (rendered on the fly) | 'dataset' (a built TFDS dataset)
        levels=tuple(int(ch) for ch in levels),
        num_examples=20_000,     # training scenes per level (rendered on access, never stored)
        num_eval=512,            # validation scenes per level
        resolution=resolution,   # training images are resized / centre-cropped to this square size
        dataset="",              # source='dataset': name in dataset_config.data.datasets
        dataset_config="",       # source='dataset': path of the experiment config that defines it
        data_dir="",
        num_workers=workers,
    ))


def vit_pretrain_config(steps: int, shape_twins: int = 0, caption_weight: float = 0.0,
                        dense_weight: float = 0.0) -> mlc.ConfigDict:
    return mlc.ConfigDict(dict(
        steps=steps, batch_size=64, lr=1e-3, b1=0.9, b2=0.95, clip_norm=1.0, warmup_steps=20, weight_decay=0.0,
        schedule="constant",     # after warm-up: 'constant' | 'cosine' | 'linear' decay to lr * end_lr_ratio
        end_lr_ratio=1.0,
        text_len=24, text_dim=64, text_layers=2, text_heads=4, embed_dim=64,
        # k > 0: every scene of a batch comes with k shape twins (one object's shape changed, captions
        # differing in that word; batch_size still counts images, 1 + k per scene). ShapeComp
        # captions are otherwise told apart by colour alone, and the ViT learns little shape.
        shape_twins=shape_twins,
        # Loss = siglip_weight * sigmoid contrastive + caption_weight * captioning (a causal decoder
        # cross-attending to the ViT's tokens predicts the dense caption: CapPa-style, so each object's
        # shape must be readable where it is; with caption_weight > 0 every caption is the dense one).
        siglip_weight=1.0, caption_weight=caption_weight, caption_dim=64, caption_layers=2, caption_heads=4,
        # + dense_weight * per-token cross-entropy: linear heads on every token of the ViT's grid name the
        # shape and colour of the object under its cell (`shapecomp.cell_labels`), object cells counting
        # dense_object_weight x background ones. The multimodal LLM reads tokens one at a time; pooled and
        # caption losses leave single tokens' shape near chance (README, "Told the shape ...").
        dense_weight=dense_weight, dense_object_weight=4.0))


def tokenizer_train_config(*, steps: int, batch_size: int, lr: float, trainable, loss_weights, perceptual: str,
                           disc_start: int, disc_ndf: int, disc_layers: int) -> mlc.ConfigDict:
    return mlc.ConfigDict(dict(
        steps=steps, batch_size=batch_size, lr=lr, b1=0.9, b2=0.95, clip_norm=1.0, warmup_steps=20,
        schedule="constant",     # after warm-up: 'constant' (spec §5.1) | 'cosine' | 'linear' decay ...
        end_lr_ratio=0.1,        # ... to lr * end_lr_ratio at `steps` (cosine / linear only)
        weight_decay=0.0, trainable=tuple(trainable), loss_weights=loss_weights,
        perceptual=perceptual,   # 'vit' (phase-1 ViT features; offline default) | 'lpips_vgg' | 'none'
        lpips_path="",           # 'lpips_vgg': converted LPIPS-VGG16 weights (.npz / .safetensors)
        # The PatchGAN hinge loss switches on at this step (-1 = no discriminator); its weight d_w,
        # on the generator's and the discriminator's side alike, is loss_weights.gan.
        disc_start=disc_start, disc_ndf=disc_ndf, disc_layers=disc_layers,
        dead_code_patience=0,    # > 0: a code unused for this many steps is restarted on an encoder output
        dead_code_until=0,       # last step that restarts (0 = train.steps)
        eval_every=0,            # validation during training (0: only at the end)
        eval_images=512,
        # ShapeComp: the editing suite's held-out pairs per level whose targets are round-tripped and
        # graded as edits (`edit_ceiling`: what a perfect editor of these codes would score; 0: skip).
        eval_edit_pairs=48,
    ))
