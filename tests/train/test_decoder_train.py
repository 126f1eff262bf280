"""The diffusion-decoder trainer on micro configs: VAE phase then UNet phase on a micro DualViTok's
codes, exact resume after an interruption, frozen parts, EMA, evaluation by sampling; config checks."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import diffusion_decoder as decoder_config
from illume_jax import config_check
from illume_jax.train import decoder as dec
from illume_jax.train import tokenizer as tok


@pytest.fixture(scope="module")
def tokenizer_workdir(micro_tokenizer_workdir):
    return micro_tokenizer_workdir


def micro_decoder(tokenizer_workdir: str, **train):
    c = decoder_config.get_config(f"size=tiny,steps=4,vae_steps=2,batch=8,tokenizer_workdir={tokenizer_workdir}")
    code_channels = 16  # micro DualViTok: 2 x z_channels 8
    c.model.code_channels = code_channels
    # Two levels (the SDXL block kinds, fewer parameters: init compiles dominate this test's time).
    latent = c.model.vae.latent_channels
    c.model.unet.update(in_channels=latent + code_channels, out_channels=latent, block_out_channels=(8, 16),
                        norm_num_groups=4,
                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 1),
                        attention_head_dim=(1, 2), addition_time_embed_dim=4,
                        projection_class_embeddings_input_dim=6 * 4 + 16)
    c.model.vae.update(block_out_channels=(8, 16, 16), norm_num_groups=4)
    c.vae_train.update(batch_size=8, eval_every=0)  # tiny: L1 + L2 on 64² crops, evaluated on whole 128² images
    c.data.update(num_examples=64, num_eval=8)
    c.train.update(eval_every=0, crop=64, **train)  # crops of the 128² outputs (evaluated whole)
    c.eval.update(num_images=8, batch_size=8, steps=2)
    # Saves only at a stop and at phase ends: each Orbax save costs seconds on 8 fake devices.
    c.checkpoint.update(every_steps=1000, async_save=False)
    c.log_every = 1
    return c


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_configs_validate():
    for arg in ("size=tiny", "size=official", "size=tiny,conditioning=illume", "size=official,conditioning=illume"):
        c = decoder_config.get_config(arg)
        if "official" in arg:
            c.model_init.vae_from = "/converted/sdxl-vae"  # official sizes load the released VAE
        config_check.validate_decoder(c)
    bad = decoder_config.get_config("size=tiny")
    bad.model.unet.in_channels = 5
    with pytest.raises(ValueError, match="in_channels"):
        config_check.validate_decoder(bad)
    bad = decoder_config.get_config("size=official")
    with pytest.raises(ValueError, match="vae_from"):
        config_check.validate_decoder(bad)
    config_check.validate_decoder(bad, training=False)  # `aot` compiles without any weights
    # Wider latents (tiny only): the VAE, the UNet's input (latent + code channels) and output follow.
    c = decoder_config.get_config("size=tiny,latent_channels=16,prediction=epsilon")
    config_check.validate_decoder(c)
    assert c.model.vae.latent_channels == 16 and c.model.unet.out_channels == 16
    assert c.model.unet.in_channels == 16 + c.model.code_channels
    assert c.scheduler.prediction_type == "epsilon"
    assert decoder_config.get_config("size=tiny").scheduler.prediction_type == "v_prediction"
    assert decoder_config.get_config("size=official").scheduler.prediction_type == "epsilon"  # SDXL's
    assert decoder_config.get_config("size=tiny,conditioning=illume,latent_channels=16").model.unet.in_channels == 16
    assert decoder_config.get_config("size=tiny,unet_width=64").model.unet.block_out_channels == (64, 64, 128)
    top = decoder_config.TINY_UNET_TOP
    assert decoder_config.get_config("size=tiny").model.unet.block_out_channels == (top, 64, 128)
    for bad in ("size=tiny,unet_width=40", "size=official,unet_width=64",
                "size=tiny,conditioning=illume,unet_width=64"):
        with pytest.raises(ValueError, match="unet_width"):
            decoder_config.get_config(bad)
    with pytest.raises(ValueError, match="latent_channels"):
        decoder_config.get_config("size=official,latent_channels=8")  # the released VAE has 4
    with pytest.raises(ValueError, match="prediction"):
        decoder_config.get_config("size=tiny,prediction=x0")
    bad = decoder_config.get_config("size=tiny")
    bad.vae_train.crop = 30  # not a multiple of the tiny VAE's factor 4
    with pytest.raises(ValueError, match="vae_train.crop"):
        config_check.validate_decoder(bad)
    bad = decoder_config.get_config("size=tiny")
    bad.train.crop = 40  # not a multiple of 16 (VAE factor 4 x the UNet's 4)
    with pytest.raises(ValueError, match="train.crop"):
        config_check.validate_decoder(bad)
    bad = decoder_config.get_config("size=tiny")
    bad.train.cond_drop = 1.5
    with pytest.raises(ValueError, match="cond_drop"):
        config_check.validate_decoder(bad)


def test_decoder_training_end_to_end_and_exact_resume(tokenizer_workdir, tmp_path):
    config = micro_decoder(tokenizer_workdir)
    config_check.validate_decoder(config)
    full = dec.train_decoder(config, str(tmp_path / "full"))
    assert not full["preempted"]
    # Phase 1 measured the latent scale and saved the VAE beside it.
    scaling = json.load(open(tmp_path / "full" / "vae" / "latent_scaling.json"))["scaling_factor"]
    assert np.isfinite(scaling) and scaling > 0
    assert full["trainer"].cfg.vae.scaling_factor == scaling
    # The VAE phase's evaluation says how the scorer misreads its reconstructions.
    assert {"vae_agreement", "vae_miss_count", "vae_miss_shape"} <= set(full["vae"]), full["vae"].keys()
    for key in ("val_psnr", "decoder_agreement", "decoder_miss_shape"):
        assert key in full["unet"], full["unet"].keys()
    assert 0 <= full["unet"]["decoder_agreement"] <= 1
    rows = [json.loads(l) for l in open(tmp_path / "full" / "unet" / "metrics.jsonl")]
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)

    # The VAE is frozen in the UNet phase: it still equals phase 1's saved weights.
    from flax import nnx
    state, trainer = full["state"], full["trainer"]
    vae_now = _leaves(state.params["vae"])
    model = nnx.merge(trainer.graphdef, state.params)
    dec.load_vae(model.vae, dec.final_vae_path(str(tmp_path / "full")))
    for a, b in zip(vae_now, _leaves(nnx.state(model.vae, nnx.Param))):
        np.testing.assert_array_equal(a, b)
    # The EMA trails the weights.
    assert any(not np.allclose(a, b) for a, b in zip(_leaves(state.ema), _leaves(state.params["unet"])))

    # Reloaded for sampling (what the MLLM's Illume.load(diffusion_decoder=...) does): the code
    # map of 1x codes decodes to 2x images, the same as the trainer's own path from images.
    loaded, loaded_state = dec.load_decoder(str(tmp_path / "full"), trainer.mesh)
    images = np.stack([np.zeros((64, 64, 3), np.float32)] * 8)
    feats = trainer.features(images)
    out = loaded.decode_features(loaded_state, feats, (64, 64), seed=0)
    assert out.shape == (8, 128, 128, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, trainer.decode_images(state, images, seed=0))

    # eval-decoder re-scores the saved checkpoint exactly as the end of training did, and writes
    # the row; sampler overrides are applied and named in the file.
    row, path = dec.evaluate_checkpoint(str(tmp_path / "full"), mesh=trainer.mesh)
    assert row["eval_scenes"] == 8 and row["step"] == config.train.steps
    for key in ("decoder_agreement", "val_psnr", "decoder_miss_shape", "eval_scenes"):
        assert row[key] == pytest.approx(full["unet"][key], abs=1e-6), key
    assert json.load(open(path)) == row and path.endswith("unet/eval_step4.json")
    g1, path1 = dec.evaluate_checkpoint(str(tmp_path / "full"), num=4, mesh=trainer.mesh,
                                        eval_overrides=dict(guidance_scale=1.0, steps=3))
    assert g1["eval_scenes"] == 4 and g1["guidance_scale"] == 1.0 and g1["sampler_steps"] == 3
    assert path1.endswith("eval_step4_guidance_scale1.0_steps3.json")
    with pytest.raises(ValueError, match="num"):
        dec.evaluate_checkpoint(str(tmp_path / "full"), num=0, mesh=trainer.mesh)
    with pytest.raises(ValueError, match="guidence"):  # a misspelt key is named, not ignored
        dec.evaluate_checkpoint(str(tmp_path / "full"), mesh=trainer.mesh, eval_overrides=dict(guidence=2.0))

    # Stopped inside the UNet phase and resumed: the same weights, EMA included. The restarted
    # runs reuse the first run's programs (the same config in one process): nothing recompiles.
    shutil.copytree(tmp_path / "full" / "vae", tmp_path / "resumed" / "vae")  # a finished phase is reused
    part = dec.train_decoder(config, str(tmp_path / "resumed"), stop_after_steps=3)
    assert part["preempted"]
    done = dec.train_decoder(config, str(tmp_path / "resumed"))
    assert not done["preempted"]
    for a, b in zip(_leaves(full["state"].params), _leaves(done["state"].params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(_leaves(full["state"].ema), _leaves(done["state"].ema)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert done["trainer"]._step is full["trainer"]._step and done["trainer"]._step.cache_size() == 1


def test_decoder_needs_a_trained_tokenizer(tmp_path):
    config = micro_decoder(str(tmp_path / "nothing-here"))
    config.vae_train.steps = 0
    config.model_init.vae_from = str(tmp_path / "vae")
    with pytest.raises(ValueError, match="no tokenizer checkpoint"):
        dec.train_decoder(config, str(tmp_path / "run"))


def test_decoder_step_compiles_aot_for_a_tpu_topology(tokenizer_workdir):
    pytest.importorskip("libtpu")
    from illume_jax import aot
    config = micro_decoder(tokenizer_workdir)
    config.tokenizer = tok.saved_config(tokenizer_workdir)
    report = aot.compile_decoder_step(config, "v5p:2x2x1", batch=8)
    assert report.num_devices == 4 and report.latent == (8, 32, 32, config.model.vae.latent_channels)
    assert report.peak_gib > 0 and report.unet_params > 0
    assert "UNet" in report.table()


def test_random_crops_are_windows_of_their_own_image():
    images = jax.random.uniform(jax.random.key(0), (4, 16, 16, 3))
    crops = np.asarray(dec.random_crops(images, 8, jax.random.key(1)))
    assert crops.shape == (4, 8, 8, 3)
    found = []
    for im, cr in zip(np.asarray(images), crops):
        hits = [(y, x) for y in range(9) for x in range(9) if np.array_equal(im[y:y + 8, x:x + 8], cr)]
        assert len(hits) == 1
        found.append(hits[0])
    assert len(set(found)) > 1  # offsets are drawn per image


def test_crops_carry_the_code_cells_under_them():
    # 2x targets whose pixels hold their own (y, x); a code map (cells of 8 output pixels) whose
    # cells hold the (y, x) of their top-left pixel: every cropped code cell must sit under the
    # cropped pixels it conditions.
    B, H, cell = 6, 64, 8
    yy, xx = np.meshgrid(np.arange(H), np.arange(H), indexing="ij")
    target = np.broadcast_to(np.stack([yy, xx, np.zeros_like(yy)], -1), (B, H, H, 3)).astype(np.float32)
    feats = target[:, ::cell, ::cell, :2]
    win, codes = dec.crop_with_codes(jnp.asarray(target), jnp.asarray(feats), 32, 4, jax.random.key(0))
    win, codes = np.asarray(win), np.asarray(codes)
    assert win.shape == (B, 32, 32, 3) and codes.shape == (B, 4, 4, 2)
    np.testing.assert_array_equal(codes, win[:, ::cell, ::cell, :2])
    assert (win[:, 0, 0, :2] % cell == 0).all() and len({tuple(w[0, 0, :2]) for w in win}) > 1
    with pytest.raises(ValueError, match="train.crop"):
        dec.crop_with_codes(jnp.asarray(target), jnp.asarray(feats), 20, 4, jax.random.key(0))
    # A global context (the illume conditioning) is not cropped.
    context = jnp.ones((B, 8, 16))
    w2, c2 = dec.crop_with_codes(jnp.asarray(target), context, 32, 4, jax.random.key(0))
    assert w2.shape == (B, 32, 32, 3) and c2 is context


def test_ema_and_conv_kernels_are_sharded_like_the_unet(tokenizer_workdir):
    """On an fsdp mesh the EMA carries the UNet parameters' shardings (it was replicated: 9.6 GiB
    on every chip at SDXL size) and conv kernels split their input channels over fsdp."""
    from illume_jax import sharding
    mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 1}, devices=jax.devices()[:4])
    trainer = dec.DecoderTrainer(micro_decoder(tokenizer_workdir), "/nonexistent-workdir", mesh, "unet")
    ab = trainer.abstract
    params = {jax.tree_util.keystr(p): x.sharding for p, x in jax.tree_util.tree_flatten_with_path(ab.params["unet"])[0]}
    ema = {jax.tree_util.keystr(p): x.sharding for p, x in jax.tree_util.tree_flatten_with_path(ab.ema)[0]}
    assert ema.keys() == params.keys() and all(ema[k] == params[k] for k in ema)
    P = jax.sharding.PartitionSpec
    conv1 = ab.ema["down_blocks"][1]["resnets"][0]["conv1"]["kernel"]
    assert conv1.sharding.spec == P(None, None, "fsdp", "tensor")
    assert any(s.spec != P() for s in ema.values())
