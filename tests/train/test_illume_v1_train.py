"""The original ILLUME's MLLM path (`configs/illume_tiny.py:family=illume`) on micro sizes: a semantic VQ's
one-level 16x16 blocks, its CLIP-style ViT through an adapter, the Vicuna template; ILLUME's stages
through SFT, then generation, editing and understanding through the API."""
import json

import jax
import numpy as np
import pytest
from flax import nnx

from configs import illume_tiny, semantic_vq_illume
from illume_jax import config_check
from illume_jax.data import multimodal, shapecomp
from illume_jax.models import mllm
from illume_jax.train import loop
from tests.train.test_mllm_train import CharTokenizer

RES = 64


@pytest.fixture(scope="module")
def svq_workdir(tmp_path_factory):
    """A micro semantic VQ with a checkpoint (2 steps: the MLLM needs its codes and ViT, not its quality)."""
    from illume_jax.train import tokenizer as tok
    c = semantic_vq_illume.get_config("size=tiny,steps=2,batch=8,pretrain_steps=0")
    c.model.vit.update(num_layers=1, hidden_size=16, num_heads=2, mlp_dim=32)
    c.model.update(z_channels=8, num_codes=64, decoder_dim=16, decoder_blocks=1, decoder_heads=2, decoder_mlp_dim=32)
    c.model.pixel_head.update(ch=8, num_groups=4, z_channels=8, zq_channels=8)
    c.data.update(num_examples=16, num_eval=8)
    c.train.update(eval_images=8, eval_edit_pairs=4, eval_every=1000, dead_code_patience=0, perceptual="none")
    c.checkpoint.update(async_save=False)
    workdir = str(tmp_path_factory.mktemp("svq"))
    tok.train_tokenizer(c, workdir)
    return workdir


def micro_config(tokenizer_workdir, steps=2):
    c = illume_tiny.get_config(f"family=illume,steps={steps},batch=8,tokenizer={tokenizer_workdir},vocab=128")
    c.model.update(d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64)
    for d in c.data.datasets.values():
        d.num_examples = 8
    for st in c.stages:
        st.steps = 2
    c.checkpoint.update(every_steps=1000, async_save=False, max_to_keep=10)
    c.log_every = 1
    return c


def test_the_family_argument_builds_illumes_config():
    c = illume_tiny.get_config("family=illume")
    assert c.vision.tokenizer_model.kind == "semantic_vq" and c.vision.tokenizer_workdir == "runs/svq_tiny"
    assert c.tokenizer.chat_template == "vicuna" and c.model.family == "llama" and not c.model.qkv_bias
    assert [s.name for s in c.stages] == ["base", "embed_init", "align", "sft"]
    # Rows hold the longest ShapeComp record of each kind after the ~100-token Vicuna system prompt.
    assert [s.seq_len for s in c.stages] == [640, 768, 640, 768]
    config_check.validate(c)
    with pytest.raises(ValueError, match="family='illume2'"):
        illume_tiny.get_config("family=illume2")
    with pytest.raises(ValueError, match="pixel_grid / parent_codes are for family=illume_plus"):
        illume_tiny.get_config("family=illume,parent_codes=1")


def test_a_record_holds_one_level_blocks_in_the_vicuna_template(svq_workdir):
    from illume_jax.train.state import model_config

    cfg = model_config(micro_config(svq_workdir))
    assert cfg.levels == 1 and cfg.grids(RES, RES) == ((16, 16), (0, 0))
    # seq_len 1,024: one id per character of the Vicuna system prompt
    ex = multimodal.MultimodalExample(CharTokenizer(), "vicuna", cfg, RES, seq_len=1024, max_images=2)
    turns = [{"from": "human", "value": multimodal.edit_prompt("make it blue")}, {"from": "gpt", "value": "<image>"}]
    img = shapecomp.png_bytes(shapecomp.render(shapecomp.make_scene(1, "train", 0)))
    row = ex({"task": "edit", "conversations": json.dumps(turns), "images": [img, img]}, np.random.default_rng(0))
    assert row is not None, ex.skipped
    slots = np.concatenate([row["token_slots"][:1], row["target_slots"]])
    assert (slots == mllm.SLOT_SEM_IN).sum() == 256 and (slots == mllm.SLOT_SEM_OUT).sum() == 256
    assert not np.isin(slots, [mllm.SLOT_PIX_IN, mllm.SLOT_PIX_OUT]).any()
    ids = np.concatenate([row["tokens"][:1], row["targets"]])
    v = cfg.vocab
    # The target block: SOI SOL0, 16 rows of 16 codes + EOL, EOL0, EOI -- no level-1 part.
    start = int(np.argmax(slots == mllm.SLOT_SEM_OUT)) - 2
    block = ids[start:start + mllm.block_length(cfg.grids(RES, RES))]
    assert block[0] == v.soi and block[1] == v.structure(mllm.SOL0) and block[-2:].tolist() == [
        v.structure(mllm.EOL0), v.eoi]
    assert v.structure(mllm.SOL1) not in ids.tolist()


def test_a_large_image_is_shown_as_a_global_view_and_slices(svq_workdir):
    """ILLUME's high-resolution input: a 128x128 image at a 64² base is 2x2 slices + the global view,
    five blocks with LLaVA-UHD's separators between the slices; each view's cells index its own image."""
    from illume_jax.data import anyres
    from illume_jax.train.state import model_config

    cfg = model_config(micro_config(svq_workdir))
    big = np.kron(shapecomp.render(shapecomp.make_scene(1, "train", 3)), np.ones((2, 2, 1), np.uint8))
    turns = [{"from": "human", "value": "<image>\nIs there a red circle?"}, {"from": "gpt", "value": "yes"}]
    rec = {"task": "qa", "conversations": json.dumps(turns), "images": [shapecomp.png_bytes(big)]}
    ex = multimodal.MultimodalExample(CharTokenizer(), "vicuna", cfg, RES, seq_len=2048, max_images=5,
                                      anyres_max_slices=9)
    row = ex(rec, np.random.default_rng(0))
    assert row is not None, ex.skipped
    slots = np.concatenate([row["token_slots"][:1], row["target_slots"]])
    cells = np.concatenate([row["token_cells"][:1], row["target_cells"]])
    sem = slots == mllm.SLOT_SEM_IN
    assert sem.sum() == 5 * 256
    np.testing.assert_array_equal(cells[sem], np.arange(5 * 256))   # views in order, cells in raster order
    views, grid = anyres.image_views(big, RES)
    assert grid == (2, 2)
    np.testing.assert_allclose(row["images"], views / 127.5 - 1.0, atol=1e-6)
    ids = np.concatenate([row["tokens"][:1], row["targets"]])
    ends = np.nonzero(ids == cfg.vocab.eoi)[0]
    assert [int(ids[e + 1]) for e in ends[1:]] == CharTokenizer().encode(",\n,\n")   # after each slice
    # An edit keeps one view per image (as Illume.edit shows its source): no slices, whatever the size.
    edit = [{"from": "human", "value": multimodal.edit_prompt("make it blue")}, {"from": "gpt", "value": "<image>"}]
    erow = ex({"task": "edit", "conversations": json.dumps(edit), "images": [shapecomp.png_bytes(big)] * 2},
              np.random.default_rng(0))
    assert (erow["token_slots"] == mllm.SLOT_SEM_IN).sum() == 256 and not erow["images"][2:].any()
    # Too many views for the row's images: skipped and counted, not truncated.
    small = multimodal.MultimodalExample(CharTokenizer(), "vicuna", cfg, RES, seq_len=2048, max_images=4,
                                         anyres_max_slices=9)
    assert small(rec, np.random.default_rng(0)) is None and small.skipped["too_many_images"] == 1


@pytest.fixture(scope="module")
def trained(svq_workdir, tmp_path_factory):
    config = micro_config(svq_workdir)
    workdir = str(tmp_path_factory.mktemp("illume_v1"))
    return config, workdir, loop.train(config, workdir)


def test_stages_train_with_the_semantic_vq_tower(trained, svq_workdir):
    config, workdir, out = trained
    assert out["step"] == sum(s.steps for s in config.stages) and np.isfinite(out["loss"]) and out["image_tokens"] > 0
    from illume_jax.infer.illume import Illume
    from illume_jax.train.tokenizer import load_tokenizer, saved_config
    model = Illume.load(workdir, step=config.stages[0].steps)   # after `base`: the tower is still the VQ's ViT
    vq, _, _ = load_tokenizer(saved_config(svq_workdir), svq_workdir)
    for a, b in zip(jax.tree.leaves(nnx.state(model.model.vision.vit, nnx.Param)),
                    jax.tree.leaves(nnx.state(vq.vit, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not hasattr(model.model.vision, "pixel_encoder") and model.model.projector.pixel is None


def test_api_generates_edits_and_answers_with_one_level(trained):
    from illume_jax.infer.illume import Illume
    _, workdir, _ = trained
    model = Illume.load(workdir)
    images = model.generate(["a red circle", "a blue square"], seed=0)
    assert [i.shape for i in images] == [(RES, RES, 3)] * 2 and images[0].dtype == np.uint8
    np.testing.assert_array_equal(model.generate(["a red circle"], seed=0)[0], images[0])
    src = shapecomp.render(shapecomp.make_scene(1, "test", 0))
    wide = np.concatenate([src, src], axis=1)
    edited = model.edit([src, wide], ["make it blue", "remove it"])
    assert edited[0].shape == src.shape and edited[1].shape == wide.shape
    answers = model.understand([src], ["Is there a red circle in the image?"], max_new_tokens=4)
    assert len(answers) == 1 and isinstance(answers[0], str)
    # A large image is read as its global view + 2x3 slices (anyres_max_slices=9), next to a one-view row.
    assert model.anyres_max_slices == 9
    large = np.kron(src, np.ones((2, 3, 1), np.uint8))
    rows, pix = model._question_rows([large, src], ["How many objects?", "How many objects?"])
    assert pix.shape[:2] == (2, 7) and not pix[1, 1:].any()
    assert [(r[1] == mllm.SLOT_SEM_IN).sum() for r in rows] == [7 * 256, 256]
    lp = model.answer_logprobs([large, src], ["Is there a red circle?"] * 2, ("yes", "no"))
    assert lp.shape == (2, 2) and np.isfinite(lp).all()
    # The one-view row scores as it does alone: the padded views of its neighbour change nothing.
    np.testing.assert_allclose(model.answer_logprobs([src], ["Is there a red circle?"], ("yes", "no")), lp[1:],
                               rtol=1e-4, atol=1e-4)


def test_a_one_level_model_draws_through_the_illume_diffusion_decoder(trained, svq_workdir, tmp_path):
    """ILLUME's detokenizer: a decoder trained on the semantic VQ's features (`conditioning=illume`: its codes
    turned back into ViT features, the UNet's cross-attention context), then used by the one-level MLLM's
    `generate` and `edit` at 2x the token resolution."""
    from configs import diffusion_decoder as decoder_config
    from illume_jax.infer.illume import Illume
    from illume_jax.train import decoder as dec
    c = decoder_config.get_config(f"size=tiny,conditioning=illume,steps=2,vae_steps=2,batch=8,"
                                  f"tokenizer_workdir={svq_workdir}")
    c.model.unet.update(cross_attention_dim=16, block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=2,
                        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))   # context: the micro VQ's 16-d ViT
    c.model.vae.update(block_out_channels=(8, 16, 16), norm_num_groups=4)
    c.vae_train.update(batch_size=8, eval_every=0)
    c.data.update(num_examples=16, num_eval=8)
    c.train.update(eval_every=0)
    c.eval.update(num_images=8, batch_size=8, steps=2)
    c.checkpoint.update(every_steps=1000, async_save=False)
    config_check.validate_decoder(c)
    out = dec.train_decoder(c, str(tmp_path / "decoder"))
    assert not out["preempted"] and 0 <= out["unet"]["decoder_agreement"] <= 1
    _, workdir, _ = trained
    model = Illume.load(workdir, diffusion_decoder=str(tmp_path / "decoder"))
    images = model.generate(["a red circle"], seed=0)
    assert images[0].shape == (2 * RES, 2 * RES, 3) and images[0].dtype == np.uint8
    src = shapecomp.render(shapecomp.make_scene(1, "test", 0))
    wide = np.concatenate([src, src], axis=1)
    assert [e.shape for e in model.edit([src, wide], ["make it blue", "remove it"])] == [src.shape, wide.shape]
