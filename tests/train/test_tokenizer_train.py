"""The tokenizer trainer: SigLIP pre-training, then DualViTok / semantic VQ with the GAN switching on,
exact resume after an interruption, evaluation metrics, encode-dataset."""
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from configs import dualvitok as dualvitok_config
from configs import semantic_vq_illume
from illume_jax import config_check
from illume_jax.data.shapecomp import world
from illume_jax.train import tokenizer as tok


def micro_dualvitok(supervision="semantic", **train):
    train = dict(dict(disc_start=2, disc_ndf=4, eval_images=8, eval_edit_pairs=4), **train)
    c = dualvitok_config.get_config(f"size=tiny,steps=4,batch=8,pretrain_steps=2,supervision={supervision}")
    c.model.vit.update(depth=1, embed_dim=16, num_heads=2, hidden_size=32)
    c.model.update(semantic_dim=16, semantic_blocks=1, semantic_heads=2, semantic_mlp_dim=32,
                   semantic_decoder_blocks=1, z_channels=8, semantic_codes=64, pixel_codes=96, quantizer_chunk=64)
    c.model.pixel_encoder.update(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=8, num_groups=4)
    c.model.pixel_decoder.update(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=16, zq_channels=16,
                                 num_groups=4)
    c.vit_pretrain.update(batch_size=8, text_dim=16, text_layers=1, text_heads=2, embed_dim=16)
    c.data.update(num_examples=64, num_eval=8)
    c.train.update(**train)
    c.checkpoint.update(every_steps=2, async_save=False)
    c.log_every = 1
    return c


def micro_tokenizer_config():
    """The micro DualViTok most tests train (no perceptual loss, no ViT pre-training, the GAN from
    step 2). One config everywhere: trainers of one config in one process share their programs."""
    config = micro_dualvitok(perceptual="none")
    config.vit_pretrain.steps = 0  # the pre-training hand-off is covered by the semantic VQ test
    return config


def test_configs_validate():
    for arg in ("size=tiny", "size=official"):
        config_check.validate_tokenizer(dualvitok_config.get_config(arg), training=False)
    config_check.validate_tokenizer(dualvitok_config.get_config("size=tiny"))
    # The official recipe trains with LPIPS-VGG, whose weights the user must supply.
    with pytest.raises(ValueError, match="train.lpips_path"):
        config_check.validate_tokenizer(dualvitok_config.get_config("size=official"))
    config_check.validate_tokenizer(semantic_vq_illume.get_config("size=tiny"))
    bad = dualvitok_config.get_config("size=tiny")
    bad.train.perceptual = "vgg"
    with pytest.raises(ValueError, match="train.perceptual"):
        config_check.validate_tokenizer(bad)


def test_lr_schedule_decays_to_the_configured_end():
    """Adam on a constant gradient steps by exactly the LR, so the updates read the schedule back."""
    t = dualvitok_config.get_config("size=tiny,steps=10").train
    t.update(warmup_steps=1, clip_norm=0.0)

    def updates(schedule):
        t.schedule = schedule
        tx = tok._adam(t)
        params = {"w": np.zeros(2, np.float32)}
        state, out = tx.init(params), []
        for _ in range(11):
            u, state = tx.update({"w": np.ones(2, np.float32)}, state, params)
            out.append(-float(u["w"][0]))
        return np.array(out)
    lr = t.lr
    np.testing.assert_allclose(updates("constant")[1:], lr, rtol=1e-4)
    cosine = updates("cosine")
    np.testing.assert_allclose(cosine[[1, 10]], [lr, lr * t.end_lr_ratio], rtol=1e-4)
    assert np.all(np.diff(cosine[1:]) < 0)
    for bad in (dict(schedule="step"), dict(schedule="cosine", end_lr_ratio=1.5)):
        c = dualvitok_config.get_config("size=tiny")
        c.train.update(**bad)
        with pytest.raises(ValueError, match="train." + list(bad)[-1]):
            config_check.validate_tokenizer(c)


def test_codes_are_counted_by_the_kind_of_cell_they_cover():
    """The evaluation's object / background code counts: a cell is an object cell when it shows any
    pixel other than the canvas colour, and the counts add up over batches."""
    image = np.full((8, 8, 3), 153, np.uint8)
    image[0:2, 6:8] = (255, 0, 0)                          # cell (0, 1) of a 2x2 grid
    codes = np.array([[[3, 7], [3, 5]]])
    by_kind = {("pixel", "object"): np.zeros(8, np.int64), ("pixel", "background"): np.zeros(8, np.int64)}
    tok._count_codes_by_cell_kind(by_kind, "pixel", codes, [image])
    tok._count_codes_by_cell_kind(by_kind, "pixel", codes, [image])
    np.testing.assert_array_equal(by_kind[("pixel", "object")], np.eye(8, dtype=np.int64)[7] * 2)
    np.testing.assert_array_equal(np.nonzero(by_kind[("pixel", "background")])[0], [3, 5])
    assert by_kind[("pixel", "background")][3] == 4


def _params(state):
    return [np.asarray(x) for x in jax.tree.leaves(state.params)]


def test_dualvitok_training_resumes_exactly(tmp_path):
    config = micro_tokenizer_config()
    full = tok.train_tokenizer(config, str(tmp_path / "full"))
    assert not full["preempted"]
    row = full["tokenizer"]
    # Evaluation ran at the end: usage, PSNR/SSIM, and the ShapeComp ceiling are reported.
    for key in ("semantic_usage", "pixel_usage", "val_psnr", "val_ssim", "tokenizer_ceiling"):
        assert key in row, row.keys()
    assert 0 <= row["tokenizer_ceiling"] <= 1 and 0 < row["pixel_usage"] <= 1
    # ... and the editing ceiling: the held-out edit targets round-tripped and graded as edits.
    assert row["edit_pairs"] == 4 and 0 <= row["edit_ceiling"] <= 1
    # ... and how many codes an edit leaves where it left the pixels (a local tokenizer: all of them).
    for book in ("semantic", "pixel"):
        assert 0 <= row[f"edit_kept_{book}"] <= 1
    # ... and the codes of object and of background cells apart: every used code is one or the other.
    for book, size in (("semantic", config.model.semantic_codes), ("pixel", config.model.pixel_codes)):
        used = round(row[f"{book}_usage"] * size)
        obj, bg = row[f"{book}_object_codes"], row[f"{book}_background_codes"]
        assert max(obj, bg) <= used <= obj + bg and bg > 0
        assert 1 <= row[f"{book}_background_perplexity"] <= bg + 1e-6
    # The discriminator switched on at step 2 (its loss is logged from then on).
    lines = [json.loads(l) for l in open(tmp_path / "full" / "tokenizer" / "metrics.jsonl")]
    lines = [l for l in lines if "loss" in l]  # training rows (the last row is the final evaluation)
    assert "disc_loss" not in lines[0] and "disc_loss" in lines[-1]

    part = tok.train_tokenizer(config, str(tmp_path / "resumed"), stop_after_steps=3)
    assert part["preempted"]
    done = tok.train_tokenizer(config, str(tmp_path / "resumed"))
    assert not done["preempted"]
    # The restarted runs reused the first run's programs: each compiled once in this process.
    assert done["trainer"]._steps is full["trainer"]._steps
    assert [f.cache_size() for f in done["trainer"]._steps.values()] == [1, 1]
    for a, b in zip(_params(full["state"]), _params(done["state"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(full["state"].disc_params), jax.tree.leaves(done["state"].disc_params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_fine_tuning_starts_from_a_runs_weights(tmp_path):
    """model_init.weights_from naming a train-tokenizer workdir (a GAN phase after an L2 one, say):
    the new run starts from that run's latest weights with a fresh optimizer and step count, and
    a run of another architecture is refused by name."""
    config = micro_tokenizer_config()
    config.train.steps = 2
    first = tok.train_tokenizer(config, str(tmp_path / "first"))
    tuned = micro_tokenizer_config()
    tuned.model_init.weights_from = str(tmp_path / "first")
    tuned.train.update(steps=3, disc_start=0)
    tuned.train.loss_weights.l1 = 0.5  # the optional L1 pixel term joins the loss when weighted
    config_check.validate_tokenizer(tuned)
    out = tok.train_tokenizer(tuned, str(tmp_path / "tuned"), stop_after_steps=2)
    assert out["preempted"] and int(out["state"].step) == 2
    rows = [json.loads(l) for l in open(tmp_path / "tuned" / "tokenizer" / "metrics.jsonl")]
    assert all("l1" in r and "gan" in r for r in rows if "loss" in r), rows
    assert not any("l1" in r for r in map(json.loads, open(tmp_path / "first" / "tokenizer" / "metrics.jsonl")))
    start = tok.TokenizerTrainer(tuned, str(tmp_path / "tuned"), first["trainer"].mesh).init_state()
    assert int(start.step) == 0
    for a, b in zip(_params(first["state"]), _params(start)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(first["state"].buffers), jax.tree.leaves(start.buffers)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the frozen SimVQ codebooks too
    # ... and the two training steps (the first at warm-up LR 0) moved them (a trainable weight, not the frozen ViT).
    from illume_jax.train.optim import path_str
    after = {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(out["state"].params)[0]}
    before = {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(start.params)[0]}
    assert not np.array_equal(after["pixel_encoder/conv_in/kernel"], before["pixel_encoder/conv_in/kernel"])
    np.testing.assert_array_equal(after["semantic_encoder/vit/patch_embed/kernel"],
                                  before["semantic_encoder/vit/patch_embed/kernel"])

    other = micro_tokenizer_config()
    other.model.pixel_codes = 128
    other.model_init.weights_from = str(tmp_path / "first")
    with pytest.raises(ValueError, match=r"pixel_codes=96 there, 128 here \(model_init.reinit names"):
        tok.TokenizerTrainer(other, str(tmp_path / "other"), first["trainer"].mesh).init_state()
    # The attention kernel says how to compute, not what the weights are: another kernel loads.
    kernel = micro_tokenizer_config()
    kernel.model.vit.attention = "xla" if kernel.model.vit.get("attention") == "cpu" else "cpu"
    kernel.model_init.weights_from = str(tmp_path / "first")
    same = tok.TokenizerTrainer(kernel, str(tmp_path / "kernel"), first["trainer"].mesh).init_state()
    flat = lambda tree: {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    loaded, trained = flat(same.params), flat(first["state"].params)
    assert loaded.keys() == trained.keys()
    for name, x in loaded.items():
        np.testing.assert_array_equal(x, trained[name], err_msg=name)
    # model_init.reinit: a wider pixel decoder on the trained encoder and codebooks.
    wider = micro_tokenizer_config()
    wider.model.pixel_decoder.ch = 16
    wider.model_init.update(weights_from=str(tmp_path / "first"), reinit=("pixel_decoder/",))
    config_check.validate_tokenizer(wider)
    grown = tok.TokenizerTrainer(wider, str(tmp_path / "wider"), first["trainer"].mesh).init_state()
    old = {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(first["state"].params)[0]}
    new = {path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(grown.params)[0]}
    assert new["pixel_decoder/conv_in/kernel"].shape != old["pixel_decoder/conv_in/kernel"].shape
    for name, x in new.items():
        if not name.startswith("pixel_decoder/"):
            np.testing.assert_array_equal(x, old[name], err_msg=name)
    wider.model_init.reinit = ("pixel_decoder/mid",)  # too narrow: the other decoder layers cannot load
    with pytest.raises(ValueError, match=r"pixel_decoder/conv_in/kernel .* in the run"):
        tok.TokenizerTrainer(wider, str(tmp_path / "w1"), first["trainer"].mesh).init_state()

    # A consumer loads the run under a config without dead-code restarts (no code ages to restore).
    plain = micro_tokenizer_config()
    plain.train.update(steps=2, dead_code_patience=0)
    _, _, loaded = tok.load_tokenizer(plain, str(tmp_path / "first"), first["trainer"].mesh)
    assert int(loaded.step) == 2 and loaded.code_age is None

    missing = micro_tokenizer_config()
    missing.model_init.weights_from = str(tmp_path / "nothing")
    with pytest.raises(ValueError, match="train-tokenizer workdir"):
        config_check.validate_tokenizer(missing)


def test_siglip_pretraining_with_shape_twins(tmp_path):
    """shape_twins=k: each record brings k one-shape-changed twins, the step trains on all of them
    (batch_size counts images), and the evaluation says how often the own caption beats the twin's;
    with caption_weight the captioning loss joins the sum and its accuracies the evaluation."""
    from illume_jax.data import images as images_lib
    vocab = images_lib.CaptionVocab((1,))
    it = images_lib.make_image_iterator(images_lib.ShapeCompImages((1,), "train", 16, shape_twins=2),
                                        batch_size=4, resolution=64, seed=0, vocab=vocab)
    batch = next(it)
    assert batch["image"].shape == (4, 64, 64, 3) and batch["twin_image"].shape == (4, 2, 64, 64, 3)
    assert batch["twin_text"].shape == (4, 2, 24)
    assert ((batch["text"][:, None] != batch["twin_text"]).sum(-1) == 1).all()  # one word apart
    assert (np.abs(batch["image"][:, None] - batch["twin_image"]).reshape(8, -1).max(1) > 0).all()
    with pytest.raises(ValueError, match="shape_twins=True"):
        images_lib.ShapeCompImages((1,), "train", 16, shape_twins=True)

    config = micro_dualvitok()   # with the captioning loss too (caption_weight > 0)
    config.vit_pretrain.update(shape_twins=1, steps=2, batch_size=16, caption_weight=0.5, caption_dim=16,
                               caption_heads=2, caption_layers=1)
    mesh = tok.sharding.make_mesh(dict(config.mesh))
    out = tok.pretrain_vit(config, str(tmp_path / "twins"), mesh)
    assert out["step"] == 2 and out["images"] == 16 and np.isfinite(out["loss"])
    assert out["loss"] == pytest.approx(out["siglip_loss"] + 0.5 * out["caption_loss"], rel=1e-4)
    for key in ("val_twin_acc", "val_i2t_acc", "val_caption_acc", "val_caption_shape_acc", "caption_acc"):
        assert 0.0 <= out[key] <= 1.0, key
    assert os.path.exists(tok.pretrained_vit_path(str(tmp_path / "twins")))
    config.vit_pretrain.batch_size = 12   # 6 records: a multiple of 2, not of 8 data-parallel devices
    if tok.sharding.data_parallel_size(mesh) == 8:
        with pytest.raises(ValueError, match="/ 2 \\(shape_twins\\)"):
            tok.pretrain_vit(config, str(tmp_path / "six"), mesh)
    config.vit_pretrain.update(batch_size=16, shape_twins=2)
    with pytest.raises(ValueError, match="multiple of 1 \\+ shape_twins = 3"):
        tok.pretrain_vit(config, str(tmp_path / "odd"), mesh)


def test_siglip_pretraining_with_the_dense_loss(tmp_path):
    """vit_pretrain.dense_weight > 0: the records bring per-cell labels over the ViT's token grid, the
    step adds the weighted dense loss (labelling the scenes, not their shape twins), the evaluation
    reports the heads' shape accuracy on validation scenes, and the saved ViT is what the tokenizer loads."""
    from illume_jax.data import images as images_lib
    it = images_lib.make_image_iterator(images_lib.ShapeCompImages((1,), "train", 16, cell_grid=(8, 8)),
                                        batch_size=4, resolution=64, seed=0)
    batch = next(it)
    assert batch["cell_shape"].shape == batch["cell_color"].shape == (4, 64)
    assert (batch["cell_shape"] < len(world.SHAPES)).any() and (batch["cell_shape"] == len(world.SHAPES)).any()
    with pytest.raises(ValueError, match="cell_grid"):
        images_lib.ShapeCompImages((1,), "train", 16, cell_grid=(0, 8))

    config = micro_dualvitok()
    config.vit_pretrain.update(shape_twins=1, steps=2, batch_size=16, dense_weight=0.5)
    mesh = tok.sharding.make_mesh(dict(config.mesh))
    out = tok.pretrain_vit(config, str(tmp_path / "dense"), mesh)
    assert out["step"] == 2 and out["images"] == 16
    assert out["loss"] == pytest.approx(out["siglip_loss"] + 0.5 * out["dense_loss"], rel=1e-4)
    for key in ("dense_shape_acc", "dense_color_acc", "val_dense_shape_acc", "val_twin_acc"):
        assert 0.0 <= out[key] <= 1.0, key
    from illume_jax.models import siglip
    with tok.sharding.use_mesh(mesh):   # other random weights, replaced by the trained ones
        vit_module = siglip._vit_for(config, nnx.Rngs(1))
        tok.load_pretrained_vit(vit_module, str(tmp_path / "dense"))
    for a, b in zip(jax.tree.leaves(nnx.state(vit_module, nnx.Param)), jax.tree.leaves(out["state"].params["vit"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _moved_after_two_steps(config, workdir):
    """{param path: whether two training steps changed it}, and the buffers before / after."""
    trainer = tok.TokenizerTrainer(config, workdir, tok.sharding.make_mesh(dict(config.mesh)))
    state0 = trainer.init_state()
    snapshot = jax.tree.map(np.asarray, (state0.params, state0.buffers))
    from illume_jax.data import images as images_lib
    it = images_lib.make_image_iterator(images_lib.ShapeCompImages((1,), "train", 16), batch_size=8,
                                        resolution=64, seed=0)
    state = state0
    for i in range(2):
        state, metrics = trainer.step(state, tok.sharding.global_batch(trainer.mesh, next(it)), i)
    from illume_jax.train.optim import path_str
    moved = {path_str(p): not np.array_equal(a, np.asarray(b)) for (p, a), b in
             zip(jax.tree_util.tree_flatten_with_path(snapshot[0])[0], jax.tree.leaves(state.params))}
    return moved, snapshot[1], state.buffers


def test_pixel_supervision_trains_the_vit_and_not_the_feature_decoder(tmp_path):
    """configs/dualvitok.py:supervision=pixel (the tokenizer ablation's control): every code is
    learnt from pixels, the ViT included; the feature-reconstruction head gets no gradient."""
    config = micro_dualvitok("pixel", perceptual="none")
    assert config.vit_pretrain.steps == 0 and config.train.loss_weights.semantic_cosine == 0.0
    moved, _, _ = _moved_after_two_steps(config, str(tmp_path))
    assert moved["semantic_encoder/vit/patch_embed/kernel"]
    assert not any(v for k, v in moved.items() if k.startswith("semantic_decoder/"))
    assert moved["semantic_encoder/proj_out/kernel"] and moved["pixel_encoder/conv_in/kernel"]


def test_frozen_vit_and_codebooks_do_not_move(tmp_path):
    moved, before_b, after_b = _moved_after_two_steps(micro_tokenizer_config(), str(tmp_path))
    assert not any(v for k, v in moved.items() if k.startswith("semantic_encoder/vit/"))
    assert moved["pixel_encoder/conv_in/kernel"] and moved["semantic_quantizer/code_transform/kernel"]
    for a, b in zip(jax.tree.leaves(before_b), jax.tree.leaves(after_b)):
        np.testing.assert_array_equal(a, np.asarray(b))  # frozen SimVQ codebooks are bit-exact


def test_dead_codes_restart_only_while_unused(tmp_path):
    """train.dead_code_patience=1: every code a batch left unused moves (its frozen SimVQ row is
    rewritten onto an encoder output), every used one keeps its row, and the ages restart. The
    step calls `_restart_dead_codes` after its update; it runs eagerly here on the shared micro
    config's trainer, so the test compiles no new training program."""
    import jax.numpy as jnp
    config = micro_tokenizer_config()
    trainer = tok.TokenizerTrainer(config, str(tmp_path), tok.sharding.make_mesh(dict(config.mesh)))
    assert set(trainer.abstract.code_age) == {"semantic", "pixel"}   # on in the tiny config (patience 25)
    off = micro_tokenizer_config()
    off.train.dead_code_patience = 0                # off: the state has no ages (older checkpoints load)
    assert tok.TokenizerTrainer(off, str(tmp_path), trainer.mesh).abstract.code_age is None
    trainer.restart_patience, trainer.restart_until = 1, 4
    state = trainer.init_state()
    state = state.replace(code_age={k: jnp.zeros((n,), jnp.int32) for k, n in trainer.codebook_sizes.items()})
    from illume_jax.data import images as images_lib
    it = images_lib.make_image_iterator(images_lib.ShapeCompImages((1,), "train", 16), batch_size=8,
                                        resolution=64, seed=0)
    model = tok.nnx.merge(trainer.graphdef, state.params, state.buffers)
    out = model(jnp.asarray(next(it)["image"]), train=False)
    # (merged models share the state's variables, so take copies before anything moves)
    books = {name: np.array(q.codebook()) for name, q in model.quantizers.items()}
    buffers = [np.array(x) for x in jax.tree.leaves(state.buffers)]
    late = trainer._restart_dead_codes(state, state.replace(step=jnp.asarray(4, jnp.int32)), out,
                                       jax.random.key(0), {})   # past dead_code_until: nothing moves
    for a, b in zip(jax.tree.leaves(late.buffers), buffers):
        np.testing.assert_array_equal(np.asarray(a), b)
    metrics = {}
    new = trainer._restart_dead_codes(state, state, out, jax.random.key(0), metrics)
    restarted_model = tok.nnx.merge(trainer.graphdef, new.params, new.buffers)
    for name in books:
        used = np.bincount(np.asarray(out.codes[name]).ravel(), minlength=trainer.codebook_sizes[name]) > 0
        before = books[name]
        after = np.asarray(restarted_model.quantizers[name].codebook())
        changed = (np.abs(after - before) > 1e-6).any(-1)
        np.testing.assert_array_equal(changed, ~used)   # exactly the unused codes moved
        assert int(metrics[f"{name}_restarted"]) == (~used).sum() > 0
        # ... onto this batch's encoder outputs
        z = np.asarray(out.latents[name]).reshape(-1, after.shape[1])
        gaps = np.abs(after[changed][:, None] - z[None]).max(-1).min(-1)
        assert gaps.max() < 1e-4, name
        np.testing.assert_array_equal(np.asarray(new.code_age[name]), 0)


def test_semantic_vq_trains_and_encode_dataset_writes_codes(tmp_path):
    c = semantic_vq_illume.get_config("size=tiny,steps=3,batch=8,pretrain_steps=2")
    c.model.vit.update(num_layers=1, hidden_size=16, num_heads=2, mlp_dim=32)
    c.model.update(z_channels=8, num_codes=64, decoder_dim=16, decoder_blocks=1, decoder_heads=2, decoder_mlp_dim=32)
    c.model.pixel_head.update(ch=8, num_groups=4, z_channels=8, zq_channels=8)
    c.vit_pretrain.update(batch_size=8, text_dim=16, text_layers=1, text_heads=2, embed_dim=16)
    c.data.update(num_examples=64, num_eval=8)
    c.train.update(eval_images=8, eval_edit_pairs=4)
    c.checkpoint.update(async_save=False)
    config_check.validate_tokenizer(c)
    out = tok.train_tokenizer(c, str(tmp_path))
    assert {"semantic_usage", "tokenizer_ceiling", "val_psnr"} <= set(out["tokenizer"])
    assert os.path.exists(tok.pretrained_vit_path(str(tmp_path)))
    # Running again finds both phases finished and reports their logged rows without retraining.
    again = tok.train_tokenizer(c, str(tmp_path))
    assert again["tokenizer"]["step"] == 3 and again["tokenizer"]["val_psnr"] == out["tokenizer"]["val_psnr"]
    # eval-tokenizer re-scores the saved checkpoint exactly as the end of training did.
    row, path = tok.evaluate_checkpoint(c, str(tmp_path))
    assert row["step"] == 3 and row["images"] == 8 and json.load(open(path)) == row
    assert row["val_psnr"] == pytest.approx(out["tokenizer"]["val_psnr"], rel=1e-5)
    assert row["tokenizer_ceiling"] == out["tokenizer"]["tokenizer_ceiling"]
    assert row["edit_ceiling"] == out["tokenizer"]["edit_ceiling"] and row["edit_pairs"] == 4
    # --unquantized adds the same figures for the codebook-free images and leaves the others as they were.
    both, _ = tok.evaluate_checkpoint(c, str(tmp_path), unquantized=True)
    assert {k: v for k, v in both.items() if not k.startswith("unquantized_")} == row
    assert 0 <= both["unquantized_tokenizer_ceiling"] <= 1 and both["unquantized_val_psnr"] != row["val_psnr"]

    from illume_jax.data.encode import encode_dataset, read_codes
    summary = encode_dataset(c, str(tmp_path), split="validation", batch_size=4)
    assert summary["records"] == 8 and summary["skipped"] == 0
    src = read_codes(summary["path"])
    rec = src[3]
    assert rec["codes"]["semantic"].shape == (16, 16) and rec["id"] == "shapecomp-L1-validation-3"
    # The stored codes are what the tokenizer produces for that image.
    from illume_jax.data import images as images_lib
    model, trainer, state = tok.load_tokenizer(c, str(tmp_path))
    img = images_lib.ShapeCompImages((1,), "validation", 8)[3]["image"]
    _, codes = trainer.reconstruct(state, images_lib.to_model_range(img)[None])
    np.testing.assert_array_equal(np.asarray(codes["semantic"])[0], rec["codes"]["semantic"])
