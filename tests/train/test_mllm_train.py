"""The MLLM's data assembly (spec §3.3-§3.5, §5.3), codes filled in the step by the frozen
tokenizer, the staged training of configs/illume_tiny.py on micro sizes with an exact resume,
and the inference API / evaluation on the trained micro model."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import dualvitok as dualvitok_config
from configs import illume_tiny
from illume_jax import config_check
from illume_jax.data import multimodal, shapecomp
from illume_jax.infer import interleaved as il
from illume_jax.models import mllm
from illume_jax.train import loop

RES = 64


class CharTokenizer:
    """A stand-in text tokenizer: one id per character (3..), BOS 1, EOS 2."""
    bos_id, eos_id, vocab_size = 1, 2, 100

    def encode(self, text):
        return [3 + (ord(c) % 90) for c in text]

    def decode(self, ids):
        return "".join(chr(i - 3) for i in ids)


def _cfg(text_vocab=100):
    tok = dualvitok_config.model_config("tiny")
    added = 7 + 32 + tok.semantic_codes + tok.pixel_codes
    from configs import common
    return mllm.MLLMConfig.create(common.llm_config(text_vocab_size=text_vocab, vocab_size=text_vocab + added), tok)


def _record(task, turns, n_images):
    img = shapecomp.png_bytes(shapecomp.render(shapecomp.make_scene(1, "train", 0)))
    return {"task": task, "conversations": json.dumps(turns), "images": [img] * n_images}


def test_t2i_record_is_tags_plus_a_discrete_block_in_the_assistant_turn():
    cfg = _cfg()
    ex = multimodal.MultimodalExample(CharTokenizer(), "plain", cfg, RES, seq_len=512, max_images=2)
    turns = [{"from": "human", "value": multimodal.t2i_prompt("a red circle")}, {"from": "gpt", "value": "<image>"}]
    row = ex(_record("t2i", turns, 1), np.random.default_rng(0))
    ids = np.concatenate([row["tokens"][:1], row["targets"]])
    v = cfg.vocab
    tags = [v.height_tag(64), v.width_tag(64)]
    # The user turn's {resolution_tag} is the tag pair too (spec §3.5 wording).
    starts = [i for i in range(len(ids) - 1) if list(ids[i:i + 2]) == tags]
    assert len(starts) == 2
    gpt = starts[1]
    block = mllm.block_template(cfg.grids(RES, RES), v, continuous=False)
    seg = slice(gpt + 2, gpt + 2 + len(block))
    target_slots = np.concatenate([[0], row["target_slots"]])
    np.testing.assert_array_equal(target_slots[seg], block.slots)
    fixed = block.slots == mllm.SLOT_TEXT
    np.testing.assert_array_equal(ids[seg][fixed], block.ids[fixed])
    # Loss: exactly the assistant turn (tags, block, EOS), nothing of the prompt.
    mask = np.concatenate([[0], row["loss_mask"]])
    assert mask[:gpt].sum() == 0 and mask[gpt:seg.stop].all()
    assert ids[seg.stop] == CharTokenizer.eos_id and mask[seg.stop] == 1
    assert mask.sum() == 2 + len(block) + 1
    assert not (row["token_slots"] == mllm.SLOT_SEM_IN).any()  # no continuous input in T2I
    assert row["images"].shape == (2, RES, RES, 3) and np.abs(row["images"][1]).sum() == 0


def test_edit_record_has_a_tagged_continuous_source_and_a_discrete_target():
    cfg = _cfg()
    ex = multimodal.MultimodalExample(CharTokenizer(), "plain", cfg, RES, seq_len=1024, max_images=2)
    turns = [{"from": "human", "value": "<image>\nPlease edit the image according to the instruction: remove it\n"},
             {"from": "gpt", "value": "<image>"}]
    row = ex(_record("edit", turns, 2), np.random.default_rng(0))
    n0, n1 = cfg.cells_per_image(RES, RES)
    slots, cells = row["token_slots"], row["token_cells"]
    assert (slots == mllm.SLOT_SEM_IN).sum() == n0 and (slots == mllm.SLOT_PIX_IN).sum() == n1
    # Image 0 (source) feeds the features; image 1 (target) the codes.
    assert cells[slots == mllm.SLOT_SEM_IN].max() == n0 - 1
    tcells, tslots = row["target_cells"], row["target_slots"]
    assert tcells[tslots == mllm.SLOT_SEM_OUT].min() == n0 and tcells[tslots == mllm.SLOT_PIX_OUT].min() == n1
    first_in = int(np.argmax(slots == mllm.SLOT_SEM_IN))
    v = cfg.vocab
    # The source block sits behind its resolution tags: tags, SOI, SOL0, features.
    assert list(row["tokens"][first_in - 4:first_in - 2]) == [v.height_tag(64), v.width_tag(64)]
    assert row["loss_mask"][row["target_slots"] == mllm.SLOT_PIX_IN].sum() == 0  # features are never targets


def test_cfg_dropout_forms_are_the_official_unconditional_prompts():
    turns = [{"from": "human", "value": multimodal.t2i_prompt("a red circle")}, {"from": "gpt", "value": "<image>"}]
    t, to_source = multimodal.cfg_dropout_turns("t2i", turns)
    assert t[0]["value"] == "Generate a random image of {resolution_tag}\n" and not to_source
    t, to_source = multimodal.cfg_dropout_turns("edit", turns)
    assert t[0]["value"].startswith("{resolution_tag}<image>\nReconstruct the image") and to_source
    cfg = _cfg()
    ex = multimodal.MultimodalExample(CharTokenizer(), "plain", cfg, RES, seq_len=1024, max_images=2, cfg_dropout=0.5)
    rec = _record("t2i", turns, 1)
    lengths = {int(ex(rec, np.random.default_rng(s))["segment_ids"].sum()) for s in range(20)}
    assert len(lengths) == 2  # both forms occur


def test_records_that_do_not_fit_are_skipped_and_counted():
    cfg = _cfg()
    ex = multimodal.MultimodalExample(CharTokenizer(), "plain", cfg, RES, seq_len=64, max_images=1)
    turns = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "ok"}]
    assert ex(_record("caption", turns, 1), np.random.default_rng(0)) is None
    assert ex.skipped["too_long"] == 1
    two = [{"from": "human", "value": "<image><image>\nDescribe."}, {"from": "gpt", "value": "ok"}]
    assert ex(_record("caption", two, 2), np.random.default_rng(0)) is None
    assert ex.skipped["too_many_images"] == 1


def test_text_only_datasets_describe_the_scene_instead_of_showing_it():
    """A multimodal config's `text_only` dataset: the human turn's image becomes "Scene: <context>"
    (no image slot, no pixels), the answer is still the trained part; a record whose answer is an
    image cannot be described and is skipped; a stage of only such data needs no room for a block."""
    from illume_jax.data.multimodal import check_stage_fits_images
    from illume_jax.data.pipeline import scene_as_text
    cfg = _cfg()
    ex = multimodal.MultimodalExample(CharTokenizer(), "plain", cfg, RES, seq_len=128, max_images=1)
    turns = [{"from": "human", "value": "<image>\nIs there a red circle?"}, {"from": "gpt", "value": "yes"}]
    rec = {**_record("qa", turns, 1), "context": b"a red circle"}
    row = ex(scene_as_text(rec), np.random.default_rng(0))   # far too short for an image block
    assert row is not None and not (row["token_slots"] != mllm.SLOT_TEXT).any() and not row["images"].any()
    ids = np.concatenate([row["tokens"][:1], row["targets"]])
    has = lambda s: any(list(ids[i:i + len(s)]) == CharTokenizer().encode(s) for i in range(len(ids)))  # noqa: E731
    assert has("Scene: a red circle\nIs there a red circle?") and not has("<image>")
    mask = np.concatenate([[0], row["loss_mask"]])
    assert list(ids[mask > 0]) == CharTokenizer().encode("yes") + [CharTokenizer.eos_id]
    t2i = [{"from": "human", "value": multimodal.t2i_prompt("a red circle")}, {"from": "gpt", "value": "<image>"}]
    assert ex(scene_as_text({**_record("t2i", t2i, 1), "context": b"x"}), np.random.default_rng(0)) is None
    assert ex.skipped["too_many_images"] == 1
    config = illume_tiny.get_config("text_steps=5,tokenizer=/nonexistent")
    assert config.stages[0].name == "scene_text" and config.stages[0].seq_len < mllm.block_length(cfg.grids(RES, RES))
    config_check.validate(config)
    check_stage_fits_images(config, 0, cfg)   # no image rows: nothing to fit
    config.stages[0].mixture = {"shapecomp_qa_text": 0.5, "shapecomp_qa": 0.5}
    with pytest.raises(ValueError, match="scene_text.*cannot hold 1 image block"):
        check_stage_fits_images(config, 0, cfg)


# -- training on micro sizes ------------------------------------------------------------------

def micro_config(tokenizer_workdir, steps=4, arg=""):
    extra = f",{arg}" if arg else ""
    c = illume_tiny.get_config(f"steps={steps},batch=8,tokenizer={tokenizer_workdir},vocab=128{extra}")
    c.model.update(d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64)
    # Resolution tags every 32 pixels up to 512 (the same 32 tag rows as 64 up to 1024): a stage may then
    # train on 32² images, a quarter of the default's cost.
    c.vision.update(tag_step=32, max_side=512)
    for d in c.data.datasets.values():
        d.num_examples = 16
    # Saves only at stage ends and stops (each Orbax save costs seconds on 8 fake devices);
    # all kept, so tests can load the model as every stage left it.
    c.checkpoint.update(every_steps=1000, async_save=False, max_to_keep=10)
    c.log_every = 1
    return c


def test_config_validates_and_names_bad_vision_values(micro_tokenizer_workdir):
    config_check.validate(illume_tiny.get_config("tokenizer=/no/tokenizer/yet"))  # falls back to the tiny model config
    c = micro_config(micro_tokenizer_workdir)
    config_check.validate(c)
    bad = micro_config(micro_tokenizer_workdir)
    bad.vision.resolution = 72
    with pytest.raises(ValueError, match="vision.resolution"):
        config_check.validate(bad)
    bad = micro_config(micro_tokenizer_workdir)
    bad.model.vocab_size = 200
    with pytest.raises(ValueError, match="vocab_size=200 is too small"):
        config_check.validate(bad)
    bad = micro_config(micro_tokenizer_workdir)
    bad.stages[3].cfg_dropout = 1.0
    with pytest.raises(ValueError, match="cfg_dropout"):
        config_check.validate(bad)
    bad = micro_config(micro_tokenizer_workdir)
    bad.vision.anchors = ((64, 64), (64, 80))
    with pytest.raises(ValueError, match=r"vision.anchors=\(64, 80\): expected \(height, width\) pairs"):
        config_check.validate(bad)
    bad = micro_config(micro_tokenizer_workdir)
    bad.vision.understand_pixels = (32 * 32, 64 * 64)
    config_check.validate(bad)
    bad.vision.understand_pixels = (64 * 64, 32 * 32)
    with pytest.raises(ValueError, match=r"vision.understand_pixels=\(4096, 1024\): expected \(\) or \(min_pixels"):
        config_check.validate(bad)
    bad = micro_config(micro_tokenizer_workdir)
    bad.vision.code_noise = 1.0
    with pytest.raises(ValueError, match="vision.code_noise"):
        config_check.validate(bad)
    with pytest.raises(ValueError, match="copy_mixture=True needs config.vision.source_copy"):
        config_check.validate(micro_config(micro_tokenizer_workdir, arg="copy_mixture=1"))


def test_step_fills_discrete_slots_with_the_tokenizers_codes(micro_tokenizer_workdir):
    from illume_jax import sharding
    from illume_jax.train.multimodal import VisionTokenizer
    from illume_jax.train.state import model_config
    from illume_jax.train.tokenizer import load_tokenizer, saved_config
    config = micro_config(micro_tokenizer_workdir)
    mesh = sharding.make_mesh(dict(config.mesh))
    vision = VisionTokenizer(config, mesh)
    cfg = model_config(config)
    ex = multimodal.MultimodalExample(CharTokenizer(), "plain", cfg, RES, seq_len=1024, max_images=2)
    turns = [{"from": "human", "value": "<image>\nPlease edit the image according to the instruction: x\n"},
             {"from": "gpt", "value": "<image>"}]
    scenes = [shapecomp.make_scene(1, "train", i) for i in (0, 1)]
    rec = {"task": "edit", "conversations": json.dumps(turns),
           "images": [shapecomp.png_bytes(shapecomp.render(s)) for s in scenes]}
    row = ex(rec, np.random.default_rng(0))
    batch = {k: jnp.asarray(v[None]) for k, v in row.items()}
    # Jitted, as in the train step (op by op, the tokenizer's encoder took ~40 s to dispatch).
    with sharding.use_mesh(mesh):
        out = jax.jit(lambda p, b: vision.prepare(p, b, cfg.vocab))(vision.params, batch)
        tok_model, _, _ = load_tokenizer(saved_config(micro_tokenizer_workdir), micro_tokenizer_workdir, mesh)
        sem, pix = nnx.jit(lambda m, x: m.encode(x))(tok_model, jnp.asarray(row["images"][1:2]))
    expected = mllm.block_ids(mllm.block_template(cfg.grids(RES, RES), cfg.vocab, continuous=False),
                              np.asarray(sem[0]), np.asarray(pix[0]), cfg.vocab)
    targets = np.asarray(out["targets"][0])
    start = int(np.argmax(row["target_slots"] == mllm.SLOT_SEM_OUT)) - 2  # SOI, SOL0 before the codes
    np.testing.assert_array_equal(targets[start:start + len(expected)], expected)
    # Inputs are the targets shifted by one.
    n = int(row["segment_ids"].sum())
    np.testing.assert_array_equal(np.asarray(out["tokens"][0, 1:n]), targets[:n - 1])


def test_a_stage_may_train_at_its_own_resolution(micro_tokenizer_workdir, tmp_path):
    """`stages[i].resolution` (ILLUME+'s 256² early stages before ~512² ones): the stage's batches hold images,
    and code grids of that side; the others keep vision.resolution."""
    from illume_jax import sharding
    from illume_jax.train import step as step_lib
    from illume_jax.train.state import model_config
    config = micro_config(micro_tokenizer_workdir)
    config.stages[0].resolution = 32
    config_check.validate(config)
    mesh = sharding.make_mesh(dict(config.mesh))
    assert step_lib.batch_shapes(config, 0, mesh)["images"].shape[2:] == (32, 32, 3)
    assert step_lib.batch_shapes(config, 1, mesh)["images"].shape[2:] == (RES, RES, 3)
    cfg = model_config(config)
    iterator = loop.default_iterator_factory(config, str(tmp_path), tokenizer=CharTokenizer())
    for si, side in ((0, 32), (2, RES)):
        batch = next(iterator(si))
        assert batch["images"].shape[2:] == (side, side, 3)
        # Each understanding image is one continuous block of that side's code grids.
        n0, n1 = cfg.cells_per_image(side, side)
        shown = (batch["token_slots"] == mllm.SLOT_SEM_IN).sum(axis=1)
        assert shown.max() > 0 and (shown % n0 == 0).all()
        assert ((batch["token_slots"] == mllm.SLOT_PIX_IN).sum(axis=1) == shown // n0 * n1).all()
    bad = micro_config(micro_tokenizer_workdir)
    bad.stages[0].resolution = 48
    with pytest.raises(ValueError, match=r"stages\[0\].resolution=48: expected 0 \(vision.resolution\) or a "
                                         r"multiple of vision.tag_step \(32\)"):
        config_check.validate(bad)
    bad.stages[0].resolution = 512   # fits no image block into its 512-token rows
    with pytest.raises(ValueError, match="512x512 images"):
        multimodal.check_stage_fits_images(bad, 0, cfg)


@pytest.fixture(scope="module")
def trained(micro_tokenizer_workdir, tmp_path_factory):
    """The four micro stages, 2 steps each, interrupted after 3 steps (inside stage 1) and resumed,
    next to an uninterrupted run. (Each step is ~1.5 s of 2-core CPU: the runs take 16.) The first
    stage trains on 32² images, the others on 64² (`stages[i].resolution`)."""
    config = micro_config(micro_tokenizer_workdir, steps=2)
    for st in config.stages:
        st.steps = 2
    config.stages[0].resolution = 32
    full_dir = str(tmp_path_factory.mktemp("mllm_full"))
    full = loop.train(config, full_dir)
    resumed_dir = str(tmp_path_factory.mktemp("mllm_resumed"))
    stopped = loop.train(config, resumed_dir, stop_after_steps=3)
    resumed = loop.train(config, resumed_dir)
    return config, full_dir, full, resumed_dir, stopped, resumed


def test_four_stages_train_and_resume_exactly(trained):
    config, full_dir, full, resumed_dir, stopped, resumed = trained
    assert stopped["preempted"] and stopped["stopped_at"] == 3 and not resumed["preempted"]
    assert full["step"] == resumed["step"] == sum(s.steps for s in config.stages)
    assert np.isfinite(full["loss"]) and full["image_tokens"] > 0 and full["text_tokens"] > 0
    # The loss split by the last stage's datasets covers every trained token of its rows.
    from illume_jax.data.pipeline import mixture_names
    names = mixture_names(config.stages[-1])
    assert len(names) > 1 and {k for k in full if k.startswith("tokens/")} == {f"tokens/{n}" for n in names}
    np.testing.assert_allclose(sum(full[f"tokens/{n}"] for n in names), full["tokens"], rtol=1e-6)
    assert all(np.isfinite(full[k]) for k in full if k.startswith("loss/"))
    from illume_jax.infer.illume import Illume
    a, b = Illume.load(full_dir), Illume.load(resumed_dir)
    for x, y in zip(jax.tree.leaves(nnx.state(a.model, nnx.Param)), jax.tree.leaves(nnx.state(b.model, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_stage_one_moves_only_new_vocabulary_rows_and_the_projector(trained):
    """ILLUME stage 1: the LLM is frozen, text rows of the embedding do not move."""
    config, full_dir, *_ = trained
    s0, s1 = config.stages[0].steps, config.stages[1].steps
    before, after = _params_at(full_dir, s0), _params_at(full_dir, s0 + s1)   # stage 1's first and last state
    first = config.model.text_vocab_size
    for path, old in before.items():
        new = after[path]
        if path == "llm/embed/embedding":
            np.testing.assert_array_equal(new[:first], old[:first])
            assert not np.array_equal(new[first:], old[first:])
        elif path.startswith("projector/"):
            assert not np.array_equal(new, old), path
        else:
            np.testing.assert_array_equal(new, old, err_msg=path)


def _params_at(workdir, step):
    from illume_jax.infer.illume import Illume
    from illume_jax.train.optim import path_str
    m = Illume.load(workdir, step=step)
    flat = jax.tree_util.tree_flatten_with_path(nnx.state(m.model, nnx.Param))[0]
    return {path_str(p): np.asarray(v) for p, v in flat}


def test_api_generates_edits_and_answers(trained, tmp_path):
    from illume_jax.eval import mllm as mllm_eval
    from illume_jax.infer.illume import Illume
    _, full_dir, *_ = trained
    model = Illume.load(full_dir)
    images = model.generate(["a red circle", "a blue square", "a green star"], seed=0, batch_size=2)
    assert [i.shape for i in images] == [(RES, RES, 3)] * 3 and images[0].dtype == np.uint8
    again = model.generate(["a red circle"], seed=0)
    np.testing.assert_array_equal(again[0], images[0])   # seeded
    src = shapecomp.render(shapecomp.make_scene(1, "test", 0))
    wide = np.concatenate([src, src], axis=1)
    edited = model.edit([src, wide], ["make it blue", "remove it"])
    assert edited[0].shape == src.shape and edited[1].shape == wide.shape  # the input's own size
    answers = model.understand([src, src], ["Is there a red circle in the image?", "How many objects?"],
                               max_new_tokens=4)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    with pytest.raises(ValueError, match="uint8 RGB"):
        model.understand([src.astype(np.float32)], ["?"])
    # The scored first token is the one greedy understanding emits, and its log-probability is
    # the same whether the row is scored alone or left-padded next to a longer question.
    qs = ["Is there a red circle in the image?", "How many?"]
    first = [model.text_tokenizer.encode(a)[0] if a else None for a in model.understand([src, src], qs,
                                                                                       max_new_tokens=1)]
    vocab = np.arange(model.cfg.vocab.first_id)
    full = np.asarray(il.next_text_logprobs(model.model, model._batch([model._prompt(f"<image>\n{q}") for q in qs],
                                                                        model._image_batch([src, src])),
                                            text_size=len(vocab)))
    np.testing.assert_allclose(np.exp(full).sum(-1), 1.0, rtol=1e-4)
    for row, f in zip(full, first):
        if f is not None:   # a reply that decodes to text: its first id is the argmax
            assert int(np.argmax(row)) == f
    lp = model.answer_logprobs([src, src], qs, ("yes", "no"))
    yes, no = (model.text_tokenizer.encode(a)[0] for a in ("yes", "no"))
    np.testing.assert_allclose(lp, full[:, [yes, no]], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.answer_logprobs([src], qs[1:], ("yes", "no")), lp[1:], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="share a first token"):
        model.answer_logprobs([src], qs[:1], ("yes", "yes"))
    out = str(tmp_path / "eval")
    results = mllm_eval.evaluate_and_report(model, full_dir, gen_scenes=2, samples_per_prompt=2, pope_scenes=1,
                                            edit_pairs=2, out_dir=out, extra_metrics={"tokenizer ceiling": 0.5},
                                            progress=False)
    assert 0.0 <= results["geneval"]["overall"] <= 1.0 and results["geneval"]["images"] >= 4
    assert set(results["pope"]) == {"random", "popular", "adversarial", "mean"}
    assert all(0.0 <= m["auc"] <= 1.0 for m in results["pope"].values())
    for split in ("random", "popular", "adversarial"):  # the per-kind accuracies partition the split's questions
        m = results["pope"][split]
        assert sum(k["questions"] for k in m["by_kind"].values()) == m["questions"]
        np.testing.assert_allclose(sum(k["accuracy"] * k["questions"] for k in m["by_kind"].values()),
                                   m["accuracy"] * m["questions"], atol=1e-9)
        assert m["by_kind"]["present"]["questions"] == m["questions"] // 2
    assert 0.0 <= results["edit"]["success"] <= 1.0 and results["edit"]["pairs"] == 2
    assert json.load(open(os.path.join(out, "metrics.json")))["geneval"] == results["geneval"]
    assert not os.path.exists(os.path.join(out, "metrics.partial.json"))  # superseded by metrics.json
    _check_public_formats(out, results)
    _check_report(os.path.join(out, "report.html"), images=results["geneval"]["images"] + 3 * 6 + 2 * 3)
    with pytest.raises(ValueError, match="compositional.*level >= 3"):
        mllm_eval.run_suites(model, level=1, split="compositional")


def test_api_draws_and_edits_at_aspect_anchors(trained, monkeypatch):
    """ILLUME+ draws at 11 aspect anchors: `generate(size=(h, w))` puts the anchor's tags in the prompt and the
    assistant's prefix and draws its grids; `edit` pads each source to its nearest anchor (`vision.anchors`) and
    shows and draws it there, one sampling call per anchor, and returns the source's own size."""
    from illume_jax.infer.illume import Illume
    _, full_dir, *_ = trained
    model = Illume.load(full_dir)
    v, cfg = model.cfg.vocab, model.cfg
    wide = model.generate(["a red circle"], seed=0, size=(64, 96))
    assert wide[0].shape == (64, 96, 3) and wide[0].dtype == np.uint8
    ids = list(model._prompt(multimodal.t2i_prompt("x"), suffix=model._image_prefix((64, 96)), size=(64, 96))[0])
    assert ids.count(v.height_tag(64)) == 2 and ids.count(v.width_tag(96)) == 2 and v.width_tag(64) not in ids
    with pytest.raises(ValueError, match=r"generate: size=\(64, 80\): expected a height and width that are "
                                         r"multiples of 32"):
        model.generate(["x"], size=(64, 80))
    model.anchors = [(64, 64), (64, 128)]
    calls = []
    sample = model._sample_images

    def spy(cond, uncond, images, sampling, seed, size):
        shown = [(r[1] == mllm.SLOT_SEM_IN).sum() for r in cond + uncond]
        calls.append((size, images.shape, set(shown)))
        return sample(cond, uncond, images, sampling, seed, size)

    monkeypatch.setattr(model, "_sample_images", spy)
    src = shapecomp.render(shapecomp.make_scene(1, "test", 0))
    long = np.concatenate([src, src], axis=1)           # 64 x 128: its own anchor
    edited = model.edit([src, long, src[:, :48]], ["make it blue", "remove it", "make it red"])
    assert [e.shape for e in edited] == [src.shape, long.shape, (RES, 48, 3)]
    assert [c[0] for c in calls] == [(64, 64), (64, 128)]          # src and the 64x48 one share the square
    assert calls[0][1][:2] == (2, 1) and calls[1][1][1:] == (1, 64, 128, 3)
    assert calls[0][2] == {cfg.cells_per_image(64, 64)[0]} and calls[1][2] == {cfg.cells_per_image(64, 128)[0]}


def test_understanding_keeps_each_images_aspect(trained):
    """`vision.understand_pixels` (ILLUME+'s 32²..768²): each understanding image is shown at its own aspect
    (sides multiples of 16 in the bounds), the questions grouped by that shape; answers and scores come back
    in the caller's order, each as the image's group alone gives it."""
    from illume_jax.infer.illume import Illume
    _, full_dir, *_ = trained
    model = Illume.load(full_dir)
    model.understand_pixels = (32 * 32, 64 * 128)
    src = shapecomp.render(shapecomp.make_scene(1, "test", 0))
    long = np.concatenate([src, shapecomp.render(shapecomp.make_scene(1, "test", 1))], axis=1)   # 64 x 128
    qs = ["Is there a red circle in the image?", "How many objects?", "Is there a blue square?"]
    groups = model._question_groups([src, long, src], qs)
    assert [g[0] for g in groups] == [[0, 2], [1]]
    assert groups[0][2].shape == (2, 1, 64, 64, 3) and groups[1][2].shape == (1, 1, 64, 128, 3)
    n_wide = model.cfg.cells_per_image(64, 128)
    assert [((r[1] == mllm.SLOT_SEM_IN).sum(), (r[1] == mllm.SLOT_PIX_IN).sum()) for r in groups[1][1]] == [n_wide]
    lp = model.answer_logprobs([src, long, src], qs, ("yes", "no"))
    np.testing.assert_allclose(lp[[0, 2]], model.answer_logprobs([src, src], qs[::2], ("yes", "no")), rtol=1e-4,
                               atol=1e-4)
    np.testing.assert_allclose(lp[1:2], model.answer_logprobs([long], qs[1:2], ("yes", "no")), rtol=1e-4, atol=1e-4)
    answers = model.understand([src, long, src], qs, max_new_tokens=3)
    assert answers[1] == model.understand([long], qs[1:2], max_new_tokens=3)[0]
    model.understand_pixels = (0, 64 * 128)   # no lower bound: a 4-pixel-high image rounds to no rows of codes
    with pytest.raises(ValueError, match="an image of 4x300 pixels is too thin for the tower"):
        model.understand([np.zeros((4, 300, 3), np.uint8)], ["?"])


def test_a_pixel_decoder_retrained_on_the_same_codes_draws_the_images(trained, micro_tokenizer_workdir, tmp_path):
    """`Illume.load(..., pixel_decoder=RUN)`: a decoder retrained on the frozen encoder and codebooks
    (the 16x16 tokenizer's ceiling fix) serves an MLLM trained on the old one, without retraining;
    a tokenizer whose codes mean anything else is refused by name."""
    from illume_jax.eval import mllm as mllm_eval
    from illume_jax.infer import illume as illume_lib
    from illume_jax.infer.illume import Illume
    from illume_jax.train import tokenizer as tok
    from train.test_tokenizer_train import micro_tokenizer_config
    _, full_dir, *_ = trained
    config = micro_tokenizer_config()
    config.train.update(steps=1, disc_start=-1, dead_code_patience=0, trainable=("pixel_decoder/.*",))
    config.model_init.update(weights_from=micro_tokenizer_workdir, reinit=("pixel_decoder/.*",))
    retrained = str(tmp_path / "decoder_only")
    tok.train_tokenizer(config, retrained)
    own, swapped = Illume.load(full_dir), Illume.load(full_dir, pixel_decoder=retrained)
    assert own.pixel_decoder_dir is None and swapped.pixel_decoder_dir == retrained
    a, b = (illume_lib.tokenizer_variables(m.vision_tokenizer) for m in (own, swapped))
    changed = {p for p in a if not np.array_equal(a[p], b[p])}
    assert a.keys() == b.keys() and changed and all(p.startswith("pixel_decoder/") for p in changed)
    # The same seed gives the same codes (one LLM), drawn by the other decoder.
    x, y = own.generate(["a red circle"], seed=0)[0], swapped.generate(["a red circle"], seed=0)[0]
    assert x.shape == y.shape and not np.array_equal(x, y)
    # Anything else that differs changes what a code means.
    codebook = next(p for p in sorted(a) if "quant" in p and not p.startswith("pixel_decoder/"))
    moved = dict(b, **{codebook: b[codebook] + 1})
    with pytest.raises(ValueError, match=f"outside the pixel decoder, at '{codebook}' \\(different values\\)"):
        illume_lib.check_same_codes(a, moved, "pixel_decoder='x'", "the model's tokenizer")
    with pytest.raises(ValueError, match="'extra/w' \\(missing in the model's tokenizer\\)"):
        illume_lib.check_same_codes(a, dict(b, **{"extra/w": np.zeros(1)}), "pixel_decoder='x'",
                                    "the model's tokenizer")
    with pytest.raises(ValueError, match="no tokenizer checkpoint"):
        Illume.load(full_dir, pixel_decoder=str(tmp_path))
    # The evaluation records the decoder and the samplings it used, and uses them: greedy
    # generation draws the same image for both samples of a prompt.
    greedy = il.Sampling.for_task("t2i", temperature=0.0)
    mllm_eval.evaluate_and_report(swapped, full_dir, gen_scenes=1, samples_per_prompt=2, pope_scenes=0,
                                  edit_pairs=1, out_dir=str(tmp_path / "eval"), progress=False, t2i_sampling=greedy)
    saved = json.load(open(tmp_path / "eval" / "metrics.json"))
    assert saved["pixel_decoder"] == retrained
    assert saved["sampling"] == {"t2i": dict(temperature=[0.0] * 3, top_k=[2048, 2048, 6144], top_p=[1.0] * 3,
                                             guidance_scale=2.0),
                                 "edit": dict(temperature=[0.7] * 3, top_k=[512, 512, 1536], top_p=[0.8] * 3,
                                              guidance_scale=1.5)}
    pairs_equal = []
    for sampling in (greedy, None):
        _, samples = mllm_eval.run_suites(swapped, gen_scenes=1, samples_per_prompt=2, pope_scenes=0, edit_pairs=0,
                                          t2i_sampling=sampling)
        images = [t["image"] for t in samples["t2i"]]
        pairs_equal.append([np.array_equal(images[k], images[k + 1]) for k in range(0, len(images), 2)])
    assert all(pairs_equal[0]) and not all(pairs_equal[1])   # the official temperature 1 samples two images


def test_a_stopped_evaluation_keeps_the_suites_it_finished(trained, tmp_path, monkeypatch):
    from illume_jax.eval import mllm as mllm_eval
    from illume_jax.infer.illume import Illume
    _, full_dir, *_ = trained
    model = Illume.load(full_dir)

    def stopped(*args, **kwargs):  # stands in for a time box or a preemption during the last suite
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "edit", stopped)
    out = str(tmp_path / "eval")
    with pytest.raises(KeyboardInterrupt):
        mllm_eval.evaluate_and_report(model, full_dir, gen_scenes=1, samples_per_prompt=1, pope_scenes=1,
                                      edit_pairs=1, out_dir=out, progress=False)
    partial = json.load(open(os.path.join(out, "metrics.partial.json")))
    assert partial["finished"] == ["geneval", "pope"] and "edit" not in partial
    assert 0.0 <= partial["geneval"]["overall"] <= 1.0 and set(partial["pope"]) >= {"random", "mean"}
    assert not os.path.exists(os.path.join(out, "metrics.json"))


def test_evaluation_runs_only_the_suites_asked_for(trained, tmp_path, monkeypatch):
    """gen_scenes / edit_pairs = 0: POPE alone (a model trained on understanding only), with its
    metrics.json, POPE files and report, and no generation or editing call at all."""
    from illume_jax.eval import mllm as mllm_eval
    from illume_jax.infer.illume import Illume
    _, full_dir, *_ = trained
    model = Illume.load(full_dir)

    def unasked(*args, **kwargs):
        raise AssertionError("a skipped suite ran")

    monkeypatch.setattr(model, "edit", unasked)
    monkeypatch.setattr(model, "generate", unasked)
    out = str(tmp_path / "eval")
    results = mllm_eval.evaluate_and_report(model, full_dir, gen_scenes=0, pope_scenes=1, edit_pairs=0, out_dir=out,
                                            progress=False)
    assert "geneval" not in results and "edit" not in results and results["level"] == 1
    assert json.load(open(os.path.join(out, "metrics.json")))["pope"] == results["pope"]
    assert sorted(os.listdir(os.path.join(out, "pope"))) == ["adversarial_answers.jsonl", "adversarial_questions.jsonl",
                                                            "images", "popular_answers.jsonl", "popular_questions.jsonl",
                                                            "random_answers.jsonl", "random_questions.jsonl"]
    assert "overview" not in results["files"] and os.path.exists(results["files"]["report"])
    for kw, match in ((dict(gen_scenes=0, pope_scenes=0, edit_pairs=0), "nothing to evaluate"),
                      (dict(pope_scenes=-1), "pope_scenes=-1")):
        with pytest.raises(ValueError, match=match):
            mllm_eval.run_suites(model, **kw)


def _check_public_formats(out, results):
    """GenEval's folder layout (one folder per prompt, its metadata line, samples/NNNN.png) and
    POPE's question / answer files (equal length, labels yes/no, images present)."""
    root = os.path.join(out, "geneval")
    prompts = sorted(d for d in os.listdir(root) if d.isdigit())
    assert len(prompts) == results["geneval"]["prompts"]
    for d in prompts:
        meta = [json.loads(line) for line in open(os.path.join(root, d, "metadata.jsonl"))]
        assert len(meta) == 1 and {"tag", "include", "prompt"} <= set(meta[0])
        assert sorted(os.listdir(os.path.join(root, d, "samples"))) == ["0000.png", "0001.png"]
    assert len(open(os.path.join(root, "evaluation_metadata.jsonl")).readlines()) == len(prompts)
    for split in ("random", "popular", "adversarial"):
        qs = [json.loads(line) for line in open(os.path.join(out, "pope", f"{split}_questions.jsonl"))]
        ans = [json.loads(line) for line in open(os.path.join(out, "pope", f"{split}_answers.jsonl"))]
        assert len(qs) == len(ans) == results["pope"][split]["questions"]
        assert {q["label"] for q in qs} <= {"yes", "no"} and all(a["answer"] == a["text"] for a in ans)
        assert all(os.path.exists(os.path.join(out, "pope", "images", q["image"])) for q in qs)


def _check_report(path, images):
    """Self-contained (no external resource), every section present, images embedded."""
    from html.parser import HTMLParser

    class Parser(HTMLParser):
        def __init__(self):
            super().__init__()
            self.srcs, self.ids, self.rows = [], set(), 0

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag in ("img", "script", "link"):
                self.srcs.append(a.get("src") or a.get("href") or "")
            if "id" in a:
                self.ids.add(a["id"])
            self.rows += tag == "tr"

    p = Parser()
    p.feed(open(path).read())
    assert {"metrics", "metrics-table", "t2i", "understanding", "editing", "curves"} <= p.ids
    assert len(p.srcs) >= images // 2 and all(s.startswith("data:image/png;base64,") for s in p.srcs)
    assert "tokenizer ceiling" in open(path).read()


def test_a_run_forks_into_a_model_with_a_cell_embedding(trained, micro_tokenizer_workdir, tmp_path):
    """model_init.weights_from = a `train` workdir: every parameter comes from its checkpoint except
    those `reinit` names (here the new `cell_embed/`, `neighbour_embed/`, `parent_embed/`, `source_embed/`,
    `source_copy/`), which
    start fresh; the
    fork trains, loads and generates. What does not fit, and a different text tokenizer, are named."""
    import shutil
    from illume_jax import sharding
    from illume_jax.infer.illume import Illume
    from illume_jax.train import state as state_lib
    config, full_dir, *_ = trained
    fork_step = sum(s.steps for s in config.stages[:3])     # the end of align
    fork = micro_config(micro_tokenizer_workdir, steps=2, arg="cell_embedding=1,neighbour_codes=1,parent_codes=1,"
                                                                     "source_cells=1,source_copy=1,code_noise=0.2,stages=3")
    fork.stages[0].steps = 1
    new = ("cell_embed/.*", "neighbour_embed/.*", "parent_embed/.*", "source_embed/.*", "source_copy/.*")
    fork.model_init.update(weights_from=full_dir, weights_step=fork_step, reinit=new)
    config_check.validate(fork)
    mesh = sharding.make_mesh(dict(fork.mesh))
    _, _, fresh = state_lib.create_state(fork, 0, mesh)
    got = state_lib.load_run_params(full_dir, fresh.params, mesh, step=fork_step, reinit=new)
    source = _params_at(full_dir, fork_step)
    from illume_jax.train.optim import path_str
    fresh_flat = {path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(fresh.params)[0]}
    for p, v in jax.tree_util.tree_flatten_with_path(got)[0]:
        name = path_str(p)
        is_new = name.startswith(("cell_embed/", "neighbour_embed/", "parent_embed/", "source_embed/", "source_copy/"))
        np.testing.assert_array_equal(np.asarray(v), fresh_flat[name] if is_new else source[name], err_msg=name)
    assert {n for n in fresh_flat if n not in source} == {"cell_embed/rows", "cell_embed/cols",
                                                          "neighbour_embed/level0", "neighbour_embed/level1",
                                                          "parent_embed/table", "source_embed/proj/kernel",
                                                          "source_copy/gate", "source_copy/bias"}
    with pytest.raises(ValueError, match=r"cell_embed/rows \(2, \d+, 32\): not in the run.*reinit names"):
        state_lib.load_run_params(full_dir, fresh.params, mesh, step=fork_step)
    with pytest.raises(ValueError, match=r"reinit: \['nothing/.\*'\] match no parameter"):
        state_lib.load_run_params(full_dir, fresh.params, mesh, reinit=(*new, "nothing/.*"))
    with pytest.raises(ValueError, match="no checkpoint at step 12345"):
        state_lib.load_run_params(full_dir, fresh.params, mesh, step=12345, reinit=new)
    other = tmp_path / "other"
    (other / "tokenizer").mkdir(parents=True)
    (other / "tokenizer" / "spm.model").write_bytes(b"another vocabulary")
    with pytest.raises(ValueError, match="text tokenizer .* differs from this run's"):
        state_lib.load_run_params(full_dir, fresh.params, mesh, reinit=new, workdir=str(other))
    bad = micro_config(micro_tokenizer_workdir)
    bad.model_init.reinit = ("cell_embed/.*",)
    with pytest.raises(ValueError, match="only with weights_from a `train` workdir"):
        config_check.validate(bad)
    # The fork trains from there (its text tokenizer copied from the run, as the docs ask).
    fork_dir = tmp_path / "fork"
    fork_dir.mkdir()
    shutil.copytree(os.path.join(full_dir, "tokenizer"), fork_dir / "tokenizer")
    out = loop.train(fork, str(fork_dir))
    assert np.isfinite(out["loss"])
    model = Illume.load(str(fork_dir))
    assert model.cfg.cell_embedding and model.cfg.neighbour_codes and model.cfg.parent_codes
    trained_cells = np.asarray(model.model.cell_embed.rows[...])
    assert not np.array_equal(trained_cells, fresh_flat["cell_embed/rows"])   # sft trains it
    assert not fresh_flat["neighbour_embed/level1"].any()                     # zero at the fork ...
    assert np.asarray(model.model.neighbour_embed.level1[...]).any()          # ... and sft trains it
    assert not fresh_flat["parent_embed/table"].any() and np.asarray(model.model.parent_embed.table[...]).any()
    assert not fresh_flat["source_embed/proj/kernel"].any() and np.asarray(model.model.source_embed.proj.kernel[...]).any()
    assert not fresh_flat["source_copy/bias"].any() and np.asarray(model.model.source_copy.bias[...]).any()
    images = model.generate(["a red circle"], seed=0)
    assert images[0].shape == (RES, RES, 3)
    edited = model.edit([images[0]], ["make the red circle blue"], seed=0)   # drawn over its source's cells
    assert edited[0].shape == (RES, RES, 3)
    # bench/edit_probe.py --semantic_from: with the source's semantic half given and the copy forced (a 500-nat
    # bonus), each drawn edit is the tokenizer's own reconstruction of its source, so it scores as that does.
    from bench import edit_probe
    copier = model.model.source_copy
    copier.gate[...] = jnp.zeros_like(copier.gate[...])
    copier.bias[...] = jnp.full_like(copier.bias[...], 50.0)
    got = edit_probe.forced_semantic_edits(model, which="source", pairs=2, batch_size=2)
    befores = [shapecomp.render(shapecomp.edit_pair(1, "test", i).before) for i in range(2)]
    sem, pix = (np.asarray(a) for a in model.vision_tokenizer.encode(jnp.asarray(model._image_batch(befores)[:, 0])))
    t = mllm.block_template(model.cfg.grids(RES, RES), model.cfg.vocab, continuous=False)
    recon = model._to_images(np.stack([mllm.block_ids(t, s, p, model.cfg.vocab)[1:] for s, p in zip(sem, pix)]))
    fg = [edit_probe.foreground(r) for r in recon]
    assert got["semantic_from"] == "source"
    assert got["fg_iou_source"] == pytest.approx(np.mean([edit_probe.iou(f, edit_probe.foreground(b))
                                                          for f, b in zip(fg, befores)]))
    assert got["empty"] == pytest.approx(np.mean([not f.any() for f in fg]))
    with pytest.raises(ValueError, match="which='other'"):
        edit_probe.forced_semantic_edits(model, which="other", pairs=1)


def _text_llm_folder(config, dst):
    """A converted text-LLM folder (what `convert --kind=llm` writes for Qwen2.5 / Vicuna) of the micro
    MLLM's architecture: its text rows only, random weights."""
    from configs import tiny
    from illume_jax import sharding
    from illume_jax.convert import weights
    from illume_jax.models.llm import LLM, LLMConfig
    text = tiny.get_config()
    text.model = config.model.copy_and_resolve_references()
    text.model.vocab_size = config.model.text_vocab_size
    with sharding.use_mesh(sharding.make_mesh(dict(config.mesh))):
        model = LLM(LLMConfig.from_config(text.model), rngs=nnx.Rngs(7))
        tensors = {k: v + 0.5 for k, v in weights.flat_numpy(model).items()}  # unlike any fresh init
    weights.save(str(dst), kind="llm", config=text, module=model, tensors=tensors, dtype=None, source="test")
    return tensors


def test_an_mllm_starts_from_a_converted_text_llm(micro_tokenizer_workdir, tmp_path):
    """ILLUME+ 3B / 7B start from Qwen2.5 (ILLUME from Vicuna): `model_init.weights_from` = a converted text
    LLM grafts its weights into the MLLM's LLM (embedding / head rows past its vocabulary stay fresh), the
    tower comes from the vision tokenizer. Through stage 1 (LLM and tower frozen, only new rows) the text
    part is exactly the source."""
    from illume_jax import sharding
    from illume_jax.convert import weights
    from illume_jax.infer.illume import Illume
    from illume_jax.train import state as state_lib
    from illume_jax.train.multimodal import VisionTokenizer
    config = micro_config(micro_tokenizer_workdir, arg="stages=1")
    src = _text_llm_folder(config, tmp_path / "text_llm")
    config.model_init.weights_from = str(tmp_path / "text_llm")
    config_check.validate(config)   # an MLLM config accepts a text LLM's folder
    loop.train(config, str(tmp_path / "run"))
    got = weights.flat_numpy(Illume.load(str(tmp_path / "run")).model)
    text_rows = config.model.text_vocab_size
    for k, v in src.items():
        mine = got[f"llm/{k}"]
        if k == "embed/embedding":
            np.testing.assert_array_equal(mine[:text_rows], v)   # stage 1 moves only the new rows
            assert mine.shape[0] > text_rows and np.abs(mine[text_rows:]).mean() < 0.2  # fresh, not ~0.5
        else:
            np.testing.assert_array_equal(mine, v, err_msg=k)
    tower = VisionTokenizer(config, sharding.make_mesh(dict(config.mesh))).tower
    for name, sub in tower.items():
        for k, v in weights.flat_numpy(sub).items():
            np.testing.assert_array_equal(got[f"vision/{name}/{k}"], v, err_msg=f"vision/{name}/{k}")
    # Qwen2.5-3B ties its head; ILLUME+ 3B's is separate: a tied text LLM seeds an untied head's text columns.
    untied = micro_config(micro_tokenizer_workdir, arg="stages=1")
    untied.model.tie_embeddings = False
    _, _, state = state_lib.create_state(untied, 0, sharding.make_mesh(dict(untied.mesh)))
    fresh_head = np.asarray(state.params["llm"]["lm_head"]["kernel"][...])
    grafted = state_lib.graft_text_llm(str(tmp_path / "text_llm"), state.params, untied)
    head = np.asarray(grafted["llm"]["lm_head"]["kernel"][...])
    np.testing.assert_array_equal(head[:, :text_rows], src["embed/embedding"].T)
    np.testing.assert_array_equal(head[:, text_rows:], fresh_head[:, text_rows:])
    # Qwen2.5-7B and Vicuna-7B have their own heads (ILLUME+ 7B, ILLUME 7B): the head's text columns are copied.
    src_untied = _text_llm_folder(untied, tmp_path / "text_llm_untied")
    _, _, state = state_lib.create_state(untied, 0, sharding.make_mesh(dict(untied.mesh)))
    fresh = {k: np.asarray(v) for k, v in weights.flat_numpy(state.params).items()}
    grafted = weights.flat_numpy(state_lib.graft_text_llm(str(tmp_path / "text_llm_untied"), state.params, untied))
    head = grafted["llm/lm_head/kernel"]
    np.testing.assert_array_equal(head[:, :text_rows], src_untied["lm_head/kernel"])
    np.testing.assert_array_equal(head[:, text_rows:], fresh["llm/lm_head/kernel"][:, text_rows:])
    np.testing.assert_array_equal(grafted["llm/embed/embedding"][:text_rows], src_untied["embed/embedding"])
    np.testing.assert_array_equal(grafted["projector/semantic/fc1/kernel"], fresh["projector/semantic/fc1/kernel"])
    with pytest.raises(ValueError, match="its head is separate from its embedding, config.model ties them"):
        state_lib.graft_text_llm(str(tmp_path / "text_llm_untied"), None, config)
    bad = micro_config(micro_tokenizer_workdir, arg="stages=1")
    bad.model.d_model = 48
    with pytest.raises(ValueError, match="d_model=32, config.model has 48"):
        state_lib.graft_text_llm(str(tmp_path / "text_llm"), None, bad)
