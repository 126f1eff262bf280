"""Config errors fail at start-up, naming the key and what is allowed."""
import os
import subprocess
import sys

import jax
import pytest

from configs import dualvitok, illume_plus_3b, illume_plus_7b, tiny
from illume_jax import config_check
from illume_jax.config_check import validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_shipped_configs_validate():
    assert validate(tiny.get_config()).num_layers == 2
    assert validate(illume_plus_3b.get_config()).vocab_size == 283_047
    assert validate(illume_plus_7b.get_config()).vocab_size == 283_175


def test_the_illume_plus_configs_are_whole_mllms():
    """ILLUME+ 3B / 7B: the LLM + the official DualViTok tower and projectors, 512² blocks of 18x18 + 32x32 codes
    (1,404 tokens), four stages at 256² then 512², and stage patterns that select what the release trains."""
    from illume_jax import sharding
    from illume_jax.models import mllm
    from illume_jax.train import optim
    from illume_jax.train import state as state_lib
    for module, d_model in ((illume_plus_3b, 2048), (illume_plus_7b, 3584)):
        c = module.get_config()
        m = state_lib.model_config(c)
        assert m.levels == 2 and m.llm.d_model == d_model and m.vocab.end == 282_776
        assert m.grids(512, 512) == ((18, 18), (32, 32)) and mllm.block_length(m.grids(512, 512)) == 1404
        assert [s.name for s in c.stages] == ["visual_embedding_init", "unified_alignment", "alignment_512", "sft"]
        assert [state_lib.stage_resolution(c, i) for i in range(4)] == [256, 256, 512, 512]
        assert c.vision.vit_trainable_from == 16 and c.stages[3].cfg_dropout == 0.1 and c.seed == 423
        from illume_jax.models.dualvitok import ANCHORS
        assert tuple(map(tuple, c.vision.anchors)) == ANCHORS[:11]   # the 11 of stages 2.5-3, not 256²
    mesh = sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1))
    _, params = state_lib.abstract_model(m, mesh)

    def trained(stage):
        frozen = optim.frozen_mask(params, stage)   # fails on a pattern that matches no parameter
        flat = jax.tree_util.tree_flatten_with_path(frozen)[0]
        return {optim.path_str(p) for p, f in flat if not f}

    stage1, sft = trained(c.stages[0]), trained(c.stages[3])
    assert stage1 == {"llm/embed/embedding", "llm/lm_head/kernel"} | {p for p in sft if p.startswith("projector/")}
    pixel = {p for p in sft if p.startswith("vision/pixel_encoder/")}
    assert pixel and not any(p.startswith("vision/pixel_encoder/down/") for p in pixel)
    assert "vision/pixel_encoder/conv_in/kernel" in pixel and "vision/pixel_encoder/mid/attn_1/q/kernel" in pixel
    assert any(p.startswith("vision/vit/merger/") for p in sft) and any(p.startswith("vision/vit/blocks/") for p in sft)
    everything = {optim.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert {p for p in everything if p.startswith(("llm/", "projector/"))} <= sft
    assert all(p in sft for p in trained(c.stages[1]))


def test_the_original_illume_7b_config():
    """Vicuna-7B + the semantic VQ's 16,384 codes after ILLUME+'s 39 structure / tag ids, padded to 64 rows;
    one-level 16x16 blocks, up to 9 slices + a global view per understanding image, 3 stages."""
    from configs import illume_7b
    from illume_jax.train.state import model_config
    c = illume_7b.get_config()
    llm = validate(c)
    assert (llm.d_model, llm.num_layers, llm.num_heads, llm.mlp_dim, llm.family) == (4096, 32, 32, 11008, "llama")
    assert llm.text_vocab_size == 32_000 and llm.vocab_size == 48_448 and not llm.tie_embeddings
    m = model_config(c)
    assert m.levels == 1 and m.vocab.end == 32_000 + 39 + 16_384 and m.grids(256, 256) == ((16, 16), (0, 0))
    assert c.vision.anyres_max_slices == 9 and c.vision.max_images == 10 and c.tokenizer.chat_template == "vicuna"
    assert [s.name for s in c.stages] == ["visual_embedding_init", "unified_alignment", "sft"]
    assert c.stages[0].new_vocab_only and "llm/lm_head/kernel" in c.stages[0].trainable
    bad = illume_7b.get_config()
    bad.vision.anyres_max_slices = -1
    with pytest.raises(ValueError, match="vision.anyres_max_slices"):
        validate(bad)


@pytest.mark.parametrize("arg,match", [
    ("stepz=3", "'stepz' is unknown"), ("steps=abc", "steps='abc': expected int"), ("steps", "needs a value")])
def test_parse_arg_errors(arg, match):
    with pytest.raises(ValueError, match=match):
        tiny.get_config(arg)


def _bad(mutate):
    c = tiny.get_config()
    mutate(c)
    return c


@pytest.mark.parametrize("mutate,match", [
    (lambda c: c.model.update(attention="flash"), r"config.model.attention='flash'"),
    (lambda c: c.mesh.update(data=0), r"config.mesh.data=0"),
    (lambda c: c.stages[0].update(schedule="exp"), r"config.stages\[0\].schedule='exp'"),
    (lambda c: c.stages[1].update(mixture={"nope": 1.0}), r"config.stages\[1\].mixture='nope'"),
    (lambda c: c.stages[0].update(trainable=("(",)), r"config.stages\[0\].trainable"),
    (lambda c: c.stages[0].update(global_batch_size=0), r"global_batch_size=0"),
    (lambda c: c.optim.update(grad_accum=3), r"global_batch_size=16: expected a multiple of optim.grad_accum"),
    (lambda c: c.tokenizer.update(kind="bpe"), r"config.tokenizer.kind='bpe'"),
    (lambda c: c.tokenizer.update(vocab_size=10_000), r"config.tokenizer.vocab_size"),
    (lambda c: c.data.datasets.shapecomp_qa.update(kind="csv"), r"config.data.datasets.shapecomp_qa.kind"),
    (lambda c: c.stages[0].update(bogus=1), r"config.stages\[0\] has unknown keys \['bogus'\]"),
])
def test_validate_names_the_key(mutate, match):
    with pytest.raises(ValueError, match=match):
        validate(_bad(mutate))


def test_cli_rejects_bad_values_before_compiling(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    run = lambda *a: subprocess.run([sys.executable, "-m", "illume_jax", *a], cwd=ROOT, env=env,
                                    capture_output=True, text=True, timeout=120)
    r = run("train", "--config=configs/tiny.py", "--config.model.attention=flash", f"--workdir={tmp_path}")
    assert r.returncode != 0 and "config.model.attention='flash'" in r.stderr
    r = run("train", "--config=configs/tiny.py", "--config.model.nope=1", f"--workdir={tmp_path}")
    assert r.returncode != 0 and "nope" in r.stderr
    r = run("fly", "--config=configs/tiny.py")
    assert r.returncode == 2 and "expected a command" in r.stderr
    # Tokenizer configs take the tokenizer commands only, and the reverse.
    r = run("train", "--config=configs/dualvitok.py:size=tiny", f"--workdir={tmp_path}")
    assert r.returncode == 2 and "train-tokenizer" in r.stderr
    r = run("train-tokenizer", "--config=configs/tiny.py", f"--workdir={tmp_path}")
    assert r.returncode == 2 and "vision-tokenizer config" in r.stderr
    r = run("train-tokenizer", "--config=configs/dualvitok.py:size=official", f"--workdir={tmp_path}")
    assert r.returncode != 0 and "train.lpips_path" in r.stderr
    # `pipeline` takes pipeline configs only, and those configs nothing else.
    r = run("pipeline", "--config=configs/tiny.py", f"--workdir={tmp_path}")
    assert r.returncode == 2 and "pipeline needs a pipeline config" in r.stderr
    r = run("train", "--config=configs/demo.py", f"--workdir={tmp_path}")
    assert r.returncode == 2 and "part=tokenizer|mllm|decoder" in r.stderr
    r = run("pipeline", f"--config=configs/demo.py:root={tmp_path}/other", f"--workdir={tmp_path}")
    assert r.returncode != 0 and "config's root" in r.stderr
    r = run("summarize", f"--workdir={tmp_path}/none")
    assert r.returncode == 1 and "no such folder" in r.stderr
    # eval-decoder reads the run's own config, and needs a trained decoder in --workdir.
    r = run("eval-decoder", "--config=configs/diffusion_decoder.py", f"--workdir={tmp_path}")
    assert r.returncode == 2 and "drop --config" in r.stderr
    r = run("eval-decoder", f"--workdir={tmp_path}")
    assert r.returncode == 1 and "no trained diffusion decoder" in r.stderr
    # Sampling flags and --size are checked before a model loads (the workdir here has none).
    r = run("generate", f"--workdir={tmp_path}", "--prompt=a cat", "--size=384by768")
    assert r.returncode == 2 and "--size='384by768': expected HEIGHTxWIDTH" in r.stderr
    r = run("understand", f"--workdir={tmp_path}", "--image=a.png", "--question=Is it red?", "--temperature=1")
    assert r.returncode == 2 and "understand answers greedily" in r.stderr
    r = run("eval", f"--workdir={tmp_path}", "--top_p=0")
    assert r.returncode == 2 and "Sampling.top_p" in r.stderr


def test_demo_config_every_scale_and_part_validates():
    from configs import demo
    from illume_jax import config_check
    for scale in demo.SIZES:
        c = demo.get_config(f"scale={scale},root=/tmp/d")
        config_check.validate_tokenizer(c.tokenizer)
        config_check.validate(c.mllm)
        config_check.validate_decoder(c.decoder)
        # The phases find each other through root; stage 3 is what the round trains again.
        assert c.mllm.vision.tokenizer_workdir == c.decoder.tokenizer_workdir == "/tmp/d/tokenizer"
        assert [st.name for st in c.mllm.stages] == ["base", "embed_init", "align", "sft"]
        assert demo.get_config(f"scale={scale},part=mllm,root=/tmp/d").to_dict() == c.mllm.to_dict()
    with pytest.raises(ValueError, match="part='vae'"):
        demo.get_config("part=vae")
    with pytest.raises(ValueError, match="scale='huge'"):
        demo.get_config("scale=huge")
    for bad in ("tokenizer=vq", "self_enhance=2", "size=huge"):
        with pytest.raises(ValueError, match=bad.split("=")[0]):
            demo.get_config(bad)


def test_sweep_axes_and_ablation_configs():
    """The sweep axes reach the phase configs they are about, and every ablation arm validates,
    with its child `train` config string rebuilding exactly the in-process MLLM config."""
    from configs import ablation_self_enhance, ablation_tokenizer, demo, illume_tiny
    from illume_jax import config_check
    from illume_jax.pipeline import PHASES, alignment_steps
    sem, pix = demo.get_config("root=/r,tokenizer=semantic"), demo.get_config("root=/r,tokenizer=pixel")
    assert sem.tokenizer.train.loss_weights.semantic_cosine == 1.0 and sem.tokenizer.vit_pretrain.steps > 0
    assert pix.tokenizer.train.loss_weights.semantic_cosine == 0.0 and pix.tokenizer.vit_pretrain.steps == 0
    assert not pix.tokenizer.model.freeze_vit and "semantic_encoder/vit/.*" in pix.tokenizer.train.trainable
    assert pix.tokenizer.train.perceptual == "none"           # no text-aligned network in the pixel arm
    assert demo.get_config("root=/r,self_enhance=0").mllm.self_enhance.mix_weight == 0.0
    assert sem.mllm.self_enhance.mix_weight > 0
    small = demo.get_config("root=/r,size=small").mllm.model
    assert small.d_model == illume_tiny.LLM_SIZES["small"]["d_model"] > sem.mllm.model.d_model
    for module, grid in ((ablation_tokenizer, ("tokenizer=semantic", "tokenizer=pixel")),
                         (ablation_self_enhance, ("self_enhance=1", "self_enhance=0"))):
        for scale in module.SIZES:
            for arm in grid:
                c = module.get_config(f"{arm},scale={scale},root=/r/{arm}")
                assert c.kind == "pipeline" and set(c.phases) <= set(PHASES) and "decoder" not in c
                config_check.validate_tokenizer(c.tokenizer)
                config_check.validate(c.mllm)
                file, args = c.mllm_config.split(":", 1)
                assert file == f"configs/{module.__name__.split('.')[-1]}.py"
                assert module.get_config(args).to_dict() == c.mllm.to_dict()
                assert c.mllm.vision.tokenizer_workdir == f"/r/{arm}/tokenizer"
    c = ablation_tokenizer.get_config("root=/r")
    steps = alignment_steps(c)
    names = [st.name for st in c.mllm.stages]
    assert names[names.index("align") - 1] == "embed_init"
    assert steps[0] == sum(st.steps for st in c.mllm.stages[:2]) and steps[-1] == steps[0] + c.mllm.stages[2].steps
    assert all(s % c.mllm.checkpoint.every_steps == 0 for s in steps[1:-1]) and len(steps) >= 3


def test_tiny_stage_selection_and_pixel_grid():
    """`illume_tiny:stages=...` picks stages by index (what the notebook test uses); the tiny
    DualViTok's `pixel_grid` sets the code grid of a 64² image; bad values name themselves."""
    from configs import dualvitok, illume_tiny
    from illume_jax import config_check
    from illume_jax.models.dualvitok import DualViTokConfig, token_grids
    every = [st.name for st in illume_tiny.get_config().stages]
    assert every == ["base", "embed_init", "align", "sft"]
    only = illume_tiny.get_config("stages=3")
    assert [st.name for st in only.stages] == ["sft"]
    config_check.validate(only)
    assert [st.name for st in illume_tiny.get_config("stages=20").stages] == ["base", "align"]  # in order
    for bad in ("stages=4", "stages=x"):
        with pytest.raises(ValueError, match="stages"):
            illume_tiny.get_config(bad)
    for grid in (16, 32):
        c = dualvitok.get_config(f"pixel_grid={grid}")
        config_check.validate_tokenizer(c)
        assert token_grids(64, 64, DualViTokConfig.from_config(c.model)) == ((8, 8), (grid, grid))
    for bad in ("pixel_grid=8", "size=official,pixel_grid=32"):
        with pytest.raises(ValueError, match="pixel_grid"):
            dualvitok.get_config(bad)


def test_illume_tiny_rows_follow_the_tokenizer_grid():
    """`illume_tiny:pixel_grid=32` sizes every stage's rows for 1,134-token image blocks; a config
    whose rows are too short for its tokenizer's blocks is refused by the data iterator instead of
    skipping every record (which used to hang the first step); device/size/lr_scale apply."""
    from configs import dualvitok, illume_tiny
    from illume_jax import config_check
    from illume_jax.data.multimodal import check_stage_fits_images
    from illume_jax.train.state import model_config
    assert [st.seq_len for st in illume_tiny.get_config().stages] == [512, 768, 512, 768]
    c32 = illume_tiny.get_config("pixel_grid=32,device=gpu,size=medium,lr_scale=0.5,tokenizer=/nonexistent")
    config_check.validate(c32)
    assert [st.seq_len for st in c32.stages] == [1408, 2432, 1408, 2432]
    assert (c32.model.dtype, c32.model.attention, c32.model.d_model) == ("bfloat16", "cudnn", 512)
    assert [st.lr for st in c32.stages] == pytest.approx([1.5e-3, 1.5e-3, 1e-3, 5e-4])
    for i in range(4):
        check_stage_fits_images(c32, i, model_config(c32))
    mismatched = illume_tiny.get_config("tokenizer=/nonexistent")  # rows for 16x16 ...
    mismatched.vision.tokenizer_model = dualvitok.model_config("tiny", 32)  # ... a 32x32 tokenizer
    for i in range(4):
        with pytest.raises(ValueError, match=f"stage '{mismatched.stages[i].name}': seq_len .* 1134 tokens"):
            check_stage_fits_images(mismatched, i, model_config(mismatched))
    with pytest.raises(ValueError, match="device"):
        illume_tiny.get_config("device=tpu")
    # base_steps sets `base` alone (0: steps // 2); the text stage goes first when asked for.
    c = illume_tiny.get_config("steps=400,base_steps=1500,text_steps=1200,tokenizer=/nonexistent")
    assert [(st.name, st.steps) for st in c.stages] == [("scene_text", 1200), ("base", 1500), ("embed_init", 100),
                                                        ("align", 400), ("sft", 400)]
    assert illume_tiny.get_config("steps=400,tokenizer=/nonexistent").stages[0].steps == 200
    with pytest.raises(ValueError, match="base_steps"):
        illume_tiny.get_config("base_steps=-1")
    # text_lr sets the text stage's peak LR alone; lr_scale keeps scaling the others.
    c = illume_tiny.get_config("text_steps=300,text_lr=3e-4,lr_scale=0.5,tokenizer=/nonexistent")
    assert c.stages[0].lr == 3e-4 and c.stages[1].lr == 1.5e-3
    assert illume_tiny.get_config("text_steps=300,lr_scale=0.5,tokenizer=/nonexistent").stages[0].lr == 1.5e-3
    for bad in ("text_lr=3e-4", "text_steps=10,text_lr=-1"):
        with pytest.raises(ValueError, match="text_lr"):
            illume_tiny.get_config(bad)
    # base_text moves that share of base's records to the text datasets, in scene_text's proportions.
    c = illume_tiny.get_config("text_steps=300,base_text=0.5,tokenizer=/nonexistent")
    base = c.stages[1]
    assert base.name == "base" and dict(base.mixture) == pytest.approx(
        {"shapecomp_caption": 0.25, "shapecomp_qa": 0.25, "shapecomp_caption_text": 0.15, "shapecomp_qa_text": 0.35})
    assert all(n in c.data.datasets for n in base.mixture)
    for bad in ("base_text=0.5", "text_steps=10,base_text=1", "text_steps=10,base_text=-0.1",
                "text_steps=10,base_text=0.5,stages=123"):
        with pytest.raises(ValueError, match="base_text"):
            illume_tiny.get_config(bad)


def test_semantic_vq_token_grid():
    """`semantic_vq_illume:grid=32` is a patch-2 ViT: 32x32 codes per 64² image, decoded back to 64²
    by the one-upsample pixel head; bad grids and official-size grids name themselves."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from configs import semantic_vq_illume
    from illume_jax import config_check, sharding
    from illume_jax.models.semantic_vq import SemanticVQ, SemanticVQConfig
    for grid in (16, 32):
        c = semantic_vq_illume.get_config(f"grid={grid}")
        config_check.validate_tokenizer(c)
        cfg = SemanticVQConfig.from_config(c.model)
        assert cfg.grid == grid and cfg.vit.attention == "cpu"
    with sharding.use_mesh(sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1), devices=jax.devices()[:1])):
        model = SemanticVQ(cfg, rngs=nnx.Rngs(0))
        images = jax.random.uniform(jax.random.PRNGKey(0), (2, 64, 64, 3), minval=-1, maxval=1)
        codes = model.encode(images)
        assert codes.shape == (2, 32, 32) and codes.dtype == jnp.int32
        assert model.decode(codes).shape == (2, 64, 64, 3)
    for bad, match in (("grid=8", "grid=8"), ("size=official,grid=32", "size=tiny")):
        with pytest.raises(ValueError, match=match):
            semantic_vq_illume.get_config(bad)


def test_illume_tiny_tower_lr_trains_the_tower_in_the_understanding_stages():
    """`tower_lr=0` (default) keeps the vision tower frozen until SFT; `tower_lr>0` puts it in `base`
    and `align` at that LR multiple, and leaves `embed_init` (LLM frozen) and `sft` as they were."""
    from configs import illume_tiny
    from illume_jax import sharding
    from illume_jax.train import optim, state as state_lib
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])

    def labels(config, stage_index):
        _, abs_params = state_lib.abstract_model(state_lib.model_config(config), mesh, config.seed)
        flat = jax.tree_util.tree_flatten_with_path(optim.param_labels(abs_params, config.stages[stage_index])(
            abs_params))[0]
        groups = {}
        for path, label in flat:
            groups.setdefault(optim.path_str(path).split("/")[0], set()).add(label)
        return groups

    frozen = illume_tiny.get_config("tokenizer=/nonexistent")
    tower = illume_tiny.get_config("tokenizer=/nonexistent,tower_lr=0.25")
    for i in (0, 2):  # base, align
        assert labels(frozen, i)["vision"] == {"frozen"}
        assert labels(tower, i)["vision"] == {"lr1"} and labels(tower, i)["llm"] == {"lr0"}
        assert tower.stages[i].lr_multipliers == (("vision/.*", 0.25),)
    for i in (1, 3):  # embed_init, sft: untouched by the argument
        assert tower.stages[i].to_dict() == frozen.stages[i].to_dict()
    with pytest.raises(ValueError, match="tower_lr"):
        illume_tiny.get_config("tower_lr=-1")


@pytest.mark.parametrize("mutate,match", [
    (lambda c: c.vit_pretrain.update(schedule="exp"), r"config.vit_pretrain.schedule='exp'"),
    (lambda c: c.vit_pretrain.update(end_lr_ratio=2.0), r"config.vit_pretrain.end_lr_ratio=2.0"),
    (lambda c: c.vit_pretrain.update(dense_weight=-1.0), r"config.vit_pretrain.dense_weight=-1.0: expected a weight"),
    (lambda c: c.vit_pretrain.update(siglip_weight=0.0), r"config.vit_pretrain.siglip_weight=0.0: expected > 0 when"),
    (lambda c: c.vit_pretrain.update(dense_weight=1.0, dense_object_weight=0.0), r"dense_object_weight=0.0"),
    (lambda c: c.vit_pretrain.update(dense_weight=1.0) or c.data.update(resolution=68),
     r"config.vit_pretrain.dense_weight=1.0: expected 0 unless the ViT's 8x8 token grid tiles data.resolution=68"),
])
def test_tokenizer_vit_pretrain_losses_are_checked(mutate, match):
    c = dualvitok.get_config("size=tiny")
    config_check.validate_tokenizer(c)
    mutate(c)
    with pytest.raises(ValueError, match=match):
        config_check.validate_tokenizer(c)
