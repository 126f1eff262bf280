"""Diffusion decoders: ILLUME+'s SDXL-style decoder (code map concatenated, 2x super-resolution)
and ILLUME's SD-style decoder (reconstructed semantic features as cross-attention context).

Launch:   python -m illume_jax train-decoder --config=configs/diffusion_decoder.py:size=tiny --workdir=runs/decoder_tiny
Args:     size=tiny|official, conditioning=illume_plus|illume, steps, vae_steps, batch,
          tokenizer_workdir (the trained tokenizer whose codes condition the decoder),
          latent_channels (tiny only; default 8), unet_width (tiny illume_plus only: channels of the UNet's
          first level, default TINY_UNET_TOP), prediction=epsilon|v_prediction|sample
          (default: v_prediction for tiny, the SDXL scheduler's epsilon for official)
Hardware: tiny: 2 CPU cores; ShapeComp level 1, 64^2 token images -> 128^2 outputs (VAE factor 4,
          32x32x8 latents; the code map is nearest-resized to the latent grid: 2x for a 16x16
          grid, 1x for the 32x32 DualViTok, as official 32->128 is 4x).
          official: the released shapes (SDXL UNet with 68 input channels, SDXL VAE, 512^2 tokens ->
          1024^2); weights load through the converter; no official training recipe exists.
Expected: tiny: see the README's decoder table (agreement with the 2x render, PSNR, time). The
          measured recipe finishes the VAE phase on whole images: after this config's 1,500 crop
          steps, rerun with --config.vae_train.crop=0 vae_steps=1800 --config.vae_train.schedule=cosine.
"""
import ml_collections as mlc

from configs import common
from configs import dualvitok as dualvitok_config
from configs import semantic_vq_illume as semantic_vq_config

# diffusers' SDXL-base UNet (unet/config.json), with conv_in widened to 4 + 64 code channels (spec §2, §6.4).
SDXL_UNET = dict(
    in_channels=68, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True,
    freq_shift=0, sample_size=128)
# diffusers' SDXL VAE (vae/config.json).
SDXL_VAE = dict(
    in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4,
    norm_num_groups=32, scaling_factor=0.13025, force_upcast=True, sample_size=1024)
# SDXL's scheduler/scheduler_config.json (EulerDiscreteScheduler, epsilon, leading spacing). The
# DDIM-era keys (clip_sample, set_alpha_to_one, ...) mean nothing to Euler but are in the file, and
# matter when another sampler is built from it (eval.sampler='ddim'): DDIM's own default
# clip_sample=True clips x0 to [-1, 1], which wrecks unit-scaled latents (tiny decoder: agreement
# 0.81 -> 0.01).
SDXL_SCHEDULER = dict(
    _class_name="EulerDiscreteScheduler", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
    beta_schedule="scaled_linear", prediction_type="epsilon", timestep_spacing="leading", steps_offset=1,
    interpolation_type="linear", use_karras_sigmas=False, clip_sample=False, set_alpha_to_one=False,
    skip_prk_steps=True, sample_max_value=1.0)


def tiny_vae(latent_channels: int) -> dict:
    # Narrow: at 128^2 XLA:CPU convolutions dominate (a (32, 64, 64) VAE trains at 1.7 images/s on
    # 2 cores, this one at 6.7), and flat-colour scenes need little width. Latent channels cost
    # almost nothing here and decide how much of the 2x render the latent can hold.
    return dict(in_channels=3, out_channels=3, block_out_channels=(16, 32, 32), layers_per_block=1,
                down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                latent_channels=latent_channels, norm_num_groups=8, scaling_factor=1.0, sample_size=128)


# Channels of the tiny UNet's first (32x32-latent) level. At 32 the decoder read 0.85-0.86 agreement
# on the first 128 validation scenes (every miss a small object's shape); 64 learns faster (0.84 at 800
# steps) and, with plain v-MSE over 3,200 steps, reads 0.902 on all 512 scenes (the 5,500-step
# width-32 run: 0.867), the README's recipe for the 0.9 target. It costs twice the step time, so the
# cheaper default stays.
TINY_UNET_TOP = 32


def tiny_unet(conditioning: str, code_channels: int, context_dim: int, pooled_dim: int, latent_channels: int,
              top_channels: int = TINY_UNET_TOP) -> dict:
    if conditioning == "illume_plus":  # SDXL layout in miniature
        return dict(
            in_channels=latent_channels + code_channels, out_channels=latent_channels,
            block_out_channels=(top_channels, 64, 128), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 1), attention_head_dim=(1, 2, 4), cross_attention_dim=context_dim,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + pooled_dim, norm_num_groups=16, norm_eps=1e-5,
            flip_sin_to_cos=True, freq_shift=0, sample_size=32, attention="cpu")
    # SD 1.x layout in miniature: cross-attention on the semantic features at every attention level.
    return dict(
        in_channels=latent_channels, out_channels=latent_channels, block_out_channels=(32, 64, 128), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4, cross_attention_dim=context_dim, use_linear_projection=False, norm_num_groups=16,
        norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, sample_size=32, attention="cpu")


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    a = common.parse_arg(arg, size="tiny", conditioning="illume_plus", steps=0, vae_steps=-1, batch=0,
                         tokenizer_workdir="", workers=0, latent_channels=0, prediction="", unet_width=0)
    if a.size not in ("tiny", "official"):
        raise ValueError(f"config argument size={a.size!r}: expected 'tiny' or 'official'")
    if a.conditioning not in ("illume_plus", "illume"):
        raise ValueError(f"config argument conditioning={a.conditioning!r}: expected 'illume_plus' or 'illume'")
    tiny = a.size == "tiny"
    if a.latent_channels and not tiny:
        raise ValueError(f"config argument latent_channels={a.latent_channels}: official sizes use the released "
                         "4-channel VAE; only size=tiny trains its own")
    if a.unet_width and (not tiny or a.unet_width % 16 or a.conditioning != "illume_plus"):
        raise ValueError(f"config argument unet_width={a.unet_width}: the first level's channels of the tiny "
                         "illume_plus UNet, a multiple of 16 (its GroupNorm groups); official sizes are fixed")
    if a.prediction not in ("", "epsilon", "v_prediction", "sample"):
        raise ValueError(f"config argument prediction={a.prediction!r}: expected 'epsilon', 'v_prediction' or 'sample'")
    plus = a.conditioning == "illume_plus"
    c = mlc.ConfigDict()
    c.seed = 0
    c.mesh = common.mesh_config() if tiny else common.mesh_config(data=1, fsdp=-1)
    # The tokenizer whose codes condition the decoder (frozen; loaded from tokenizer_workdir).
    c.tokenizer = (dualvitok_config if plus else semantic_vq_config).get_config(f"size={a.size}")
    c.tokenizer_workdir = a.tokenizer_workdir or ("runs/dualvitok_tiny" if plus else "runs/semantic_vq_tiny")
    if plus:
        code_channels = 2 * c.tokenizer.model.z_channels
        context_dim, pooled_dim = (16, 16) if tiny else (2048, 1280)
    else:
        code_channels = 0
        context_dim, pooled_dim = c.tokenizer.model.vit.hidden_size, 0
    if tiny:
        latent = a.latent_channels or 8
        unet = tiny_unet(a.conditioning, code_channels, context_dim, pooled_dim, latent,
                         top_channels=a.unet_width or TINY_UNET_TOP)
        vae = tiny_vae(latent)
    elif plus:
        # bf16 compute (fp32 parameters) and per-block rematerialisation, as SDXL is trained (a
        # 1024^2 batch's fp32 activations would not fit a chip). With them the 512^2 train step
        # compiles for v5p on this 24 GiB host (README); the fp32, no-remat step never finished.
        unet, vae = dict(SDXL_UNET, dtype="bfloat16", remat=True), dict(SDXL_VAE)
    else:  # SD 1.x-size UNet with the semantic features (ViT width) as context, SD VAE
        unet = dict(in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=8,
                    cross_attention_dim=context_dim, use_linear_projection=False, norm_num_groups=32,
                    norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0, sample_size=64)
        vae = dict(SDXL_VAE, scaling_factor=0.18215, force_upcast=False)
    c.model = mlc.ConfigDict(dict(
        kind="diffusion_decoder", conditioning=a.conditioning, unet=unet, vae=vae, code_channels=code_channels,
        context_len=8 if tiny else 77, pooled_dim=pooled_dim, scale=2,
        # Output sizes (width, height) the time ids index; official: the released list (spec §2).
        resolution_group=((128, 128),) if tiny else (
            (1024, 1024), (768, 1024), (1024, 768), (512, 2048), (2048, 512), (640, 1920), (1920, 640),
            (768, 1536), (1536, 768), (768, 1152), (1152, 768), (512, 512))))
    c.model_init = mlc.ConfigDict(dict(
        vae_from="",   # Orbax folder of a converted VAE (official sizes); tiny trains its own in phase 1
        weights_from="",  # a converted SDXL decoder folder (`convert --kind=sdxl-decoder`): fine-tune it
    ))
    c.scheduler = mlc.ConfigDict(dict(SDXL_SCHEDULER))
    # Tiny: v-prediction. With codes that pin the image down, the epsilon target carries almost no
    # information about the image at high noise, and a 1,500-step epsilon run plateaued (MSE 0.58).
    prediction = a.prediction or ("v_prediction" if tiny else "")
    if prediction:
        c.scheduler.prediction_type = prediction
    c.data = dualvitok_config.tokenizer_data("1", resolution=c.tokenizer.data.resolution, workers=a.workers)
    c.vae_train = mlc.ConfigDict(dict(
        steps=(1500 if tiny else 0) if a.vae_steps < 0 else a.vae_steps, batch_size=16, lr=1e-3, b1=0.9, b2=0.99,
        clip_norm=1.0, warmup_steps=20, weight_decay=0.0, kl_weight=1e-6,
        schedule="constant", end_lr_ratio=0.0,  # or 'cosine' | 'linear' decay to lr * end_lr_ratio
        l1_weight=1.0 if tiny else 0.0,  # + L1 on pixels (sharper flat-colour edges than L2 alone)
        # > 0: train on random crops of this size (4-5x the images/s at 64 of 128). GroupNorm then
        # sees other statistics than on whole images (small lone objects come out colour-shifted:
        # scorer agreement 0.88); the README's recipe finishes with 300 whole-image steps (1.00).
        crop=64 if tiny else 0,
        # False: decode the posterior mean (the UNet then trains on it too). At init the posterior
        # std is ~1 (logvar ~0) and a 1e-6 KL term barely shrinks it, so sampled latents are mostly
        # noise for a short CPU run (tiny VAE at 1,000 steps: std 0.77 against a mean std of 0.66).
        sample_posterior=not tiny,
        eval_every=250 if tiny else 0))   # 0 = only at the end of the phase
    c.train = mlc.ConfigDict(dict(
        steps=a.steps or (1500 if tiny else 100_000), batch_size=a.batch or (16 if tiny else 256),
        lr=5e-4 if tiny else 1e-4, b1=0.9, b2=0.999, clip_norm=1.0, warmup_steps=50 if tiny else 500,
        weight_decay=0.0, schedule="constant", end_lr_ratio=0.0,
        cond_drop=0.1,          # condition dropout, so CFG has an unconditional model
        crop=0,                 # > 0: train on random crops of the 2x output (and the code cells under them)
        min_snr_gamma=5.0,      # 0 = plain MSE
        ema_decay=0.995 if tiny else 0.9999,
        eval_every=500 if tiny else 10_000))
    c.eval = mlc.ConfigDict(dict(
        sampler="",             # '' = the scheduler's own class; or 'euler' | 'ddim' | 'dpm++2m'
        # Tiny: scorer agreement at 2,000 UNet steps (128 scenes) is 0.67 / 0.77 / 0.79 / 0.79 at
        # CFG 1.5 / 3 / 5 / 7. Official: the release's 1.5 (spec §2: 1.5-2.0). num_images: the
        # first 128 scenes read ~0.035 under all 512 (README); `eval-decoder --num=512` scores a run.
        steps=20, guidance_scale=5.0 if tiny else 1.5, guidance_rescale=0.0, num_images=128 if tiny else 64, batch_size=32))
    c.checkpoint = common.checkpoint_config(every_steps=250 if tiny else 2000)
    c.log_every = 50 if tiny else 100
    return c
