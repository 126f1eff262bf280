"""The LLM probes: padded text scoring equals row-by-row scoring, the in-text existence suite adds up,
and the attention maps are the ones the forward pass uses."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from illume_jax.data import shapecomp
from illume_jax.data.shapecomp import text as sc_text
from illume_jax.data.tokenizers import SentencePieceTokenizer, train_sentencepiece
from illume_jax.eval import probe
from illume_jax.models.llm import LLMConfig, create_llm

TEMPLATE = "plain"


@pytest.fixture(scope="module")
def tok():
    return SentencePieceTokenizer(train_sentencepiece(shapecomp.text_corpus([1], "train", 30), 200))


@pytest.fixture(scope="module")
def llm(tok):
    rows = -(-tok.vocab_size // 64) * 64
    cfg = LLMConfig(vocab_size=rows, text_vocab_size=tok.vocab_size, d_model=32, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=8, mlp_dim=64, rope_theta=1e4, tie_embeddings=False)
    return create_llm(cfg, seed=0)


def _pairs(n):
    out = []
    for i in range(n):
        scene = shapecomp.make_scene(1, "test", i)
        for q in shapecomp.existence_questions(scene, "adversarial")[:2]:
            out.append((sc_text.dense_caption(scene), q["question"]))
    return out


def test_padded_batches_score_as_single_rows(llm, tok):
    pairs = _pairs(8)  # rows of different lengths (one- and two-object scenes); batch 5 leaves a part-filled last batch
    lp = probe.text_answer_logprobs(llm, tok, TEMPLATE, [c for c, _ in pairs], [q for _, q in pairs],
                                    ("yes", "no"), batch_size=5)
    assert lp.shape == (len(pairs), 2)
    yes, no = tok.encode("yes")[0], tok.encode("no")[0]
    lengths = set()
    for (c, q), row in zip(pairs, lp):
        ids = probe.render_question(tok, TEMPLATE, c, q)
        lengths.add(len(ids))
        ref = np.asarray(jax.nn.log_softmax(llm(jnp.asarray(ids)[None]), axis=-1))[0, -1]
        np.testing.assert_allclose(row, ref[[yes, no]], atol=1e-5)
    assert len(lengths) > 1  # the padding was exercised


def test_the_prompt_stops_where_the_answer_starts(tok):
    c, q = _pairs(1)[0]
    ids = probe.render_question(tok, TEMPLATE, c, q)
    text = tok.decode(ids.tolist())
    assert c in text and q in text
    assert not text.rstrip().endswith("yes")


def test_existence_in_text_adds_up(llm, tok):
    res = probe.existence_in_text(llm, tok, TEMPLATE, scenes=4, batch_size=16)
    assert set(res) == set(shapecomp.POPE_SPLITS) | {"mean"}
    for split in shapecomp.POPE_SPLITS:
        r = res[split]
        questions = [q for i in range(4) for q in shapecomp.existence_questions(shapecomp.make_scene(1, "test", i), split)]
        assert r["questions"] == len(questions)
        assert sum(k["questions"] for k in r["by_kind"].values()) == len(questions)
        assert r["accuracy"] == pytest.approx(sum(k["accuracy"] * k["questions"] for k in r["by_kind"].values())
                                              / len(questions))
        # The same answers from the scoring function directly.
        lp = probe.text_answer_logprobs(llm, tok, TEMPLATE,
                                        [sc_text.dense_caption(shapecomp.make_scene(1, "test", i))
                                         for i in range(4) for _ in shapecomp.existence_questions(
                                             shapecomp.make_scene(1, "test", i), split)],
                                        [q["question"] for q in questions])
        said_yes = lp[:, 0] > lp[:, 1]
        assert r["yes_ratio"] == pytest.approx(said_yes.mean())
        assert r["accuracy"] == pytest.approx(np.mean(said_yes == np.asarray([q["answer"] == "yes" for q in questions])))
    assert res["mean"]["accuracy"] == pytest.approx(np.mean([res[s]["accuracy"] for s in shapecomp.POPE_SPLITS]))


def test_attention_maps_reproduce_each_layers_attention(llm, tok):
    c, q = _pairs(1)[0]
    ids = probe.render_question(tok, TEMPLATE, c, q)
    maps = probe.attention_maps(llm, ids)
    T = len(ids)
    assert maps.shape == (2, 4, T, T)
    np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-5)
    assert np.all(maps[..., np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] == 0)  # causal
    # Each layer's attention output, rebuilt from the maps and its value projection, is the layer's own.
    x = llm.embed_tokens(jnp.asarray(ids)[None])
    pos, seg = jnp.arange(T)[None], jnp.ones((1, T), jnp.int32)
    for layer, m in zip(llm.unstacked_layers(), maps):
        h = layer.input_norm(x)
        _, _, v = layer.attn.qkv(h, pos)
        v = jnp.repeat(v, 2, axis=2)  # 4 query heads over 2 kv heads
        rebuilt = layer.attn.o_proj(jnp.einsum("hqk,bkhd->bqhd", jnp.asarray(m), v))
        np.testing.assert_allclose(np.asarray(rebuilt), np.asarray(layer.attn(h, pos, seg)), atol=1e-5)
        x = layer(x, pos, seg)
    pieces = [tok.decode([int(t)]) for t in ids]
    top = probe.top_attended(maps, pieces, T - 1, k=2)
    assert len(top) == 2 and len(top[0]) == 4 and top[0][0].count("@") == 2


def test_bad_inputs_are_named(llm, tok):
    with pytest.raises(ValueError, match="ids must be one non-empty row"):
        probe.attention_maps(llm, np.zeros((2, 3), np.int32))
    with pytest.raises(ValueError, match="2 contexts but 1 questions"):
        probe.text_answer_logprobs(llm, tok, TEMPLATE, ["a", "b"], ["Is there a red circle in the image?"])
    with pytest.raises(ValueError, match="share a first token"):
        probe.text_answer_logprobs(llm, tok, TEMPLATE, ["a"], ["q"], ("yes", "yes"))
    with pytest.raises(ValueError, match="pieces for maps"):
        probe.top_attended(np.zeros((1, 1, 3, 3)), ["a"], 0)


def test_object_windows_take_the_cells_around_each_centre():
    """A 4x4 grid over 16 pixels whose features are their own (row, col): the 3x3 window around a
    centre is its neighbourhood in raster order, zeros past the edge; an even width rounds up to odd."""
    g = 4
    feats = np.stack(np.meshgrid(np.arange(g), np.arange(g), indexing="ij"), -1).reshape(g * g, 2) + 1.0
    w = probe.object_windows(feats, [(6.0, 10.0), (0.5, 0.5)], resolution=16, window_px=12)  # cells of 4 px
    assert w.shape == (2, 9 * 2)
    inner = w[0].reshape(3, 3, 2) - 1  # centre cell: row 2 (y=10), col 1 (x=6)
    np.testing.assert_array_equal(inner[1, 1], [2, 1])
    np.testing.assert_array_equal(inner[0, 0], [1, 0])
    np.testing.assert_array_equal(inner[2, 2], [3, 2])
    corner = w[1].reshape(3, 3, 2)
    assert (corner[0] == 0).all() and (corner[:, 0] == 0).all() and (corner[1, 1] == [1, 1]).all()
    assert probe.object_windows(feats, [(6.0, 6.0)], 16, window_px=8).shape == (1, 9 * 2)  # 2 cells -> 3
    with pytest.raises(ValueError, match="square grid"):
        probe.object_windows(feats[:15], [(1.0, 1.0)], 16, 4)


def test_ridge_classifier_reads_a_linear_code_and_not_noise():
    rng = np.random.default_rng(0)
    classes = np.array(["circle", "square", "star"])
    y = classes[rng.integers(0, 3, 300)]
    x = rng.normal(size=(300, 20))
    x[:, :3] += 4 * (y[:, None] == classes[None])   # the class is written in three directions
    ok = probe.ridge_classifier_accuracy(x[:200], y[:200], x[200:], y[200:])
    assert ok.shape == (100,) and ok.mean() > 0.95
    noise = probe.ridge_classifier_accuracy(x[:200, 3:], y[:200], x[200:, 3:], y[200:])
    assert noise.mean() < 0.6


def test_object_features_probe_runs_on_a_tiny_mllm(tiny_tokenizer_mllm):
    """Every feature set is scored; the raw-pixel yardstick reads colour (the centre cell's colour is
    a linear function of its pixels) far above chance even from 40 training scenes."""
    model = tiny_tokenizer_mllm()
    out = probe.object_features(probe.mllm_image_features(model), train_scenes=40, test_scenes=20, batch_size=20)
    assert out["objects"]["train"] >= 40 and out["objects"]["test"] >= 20
    for name in ("semantic", "pixel", "semantic, projected", "pixel, projected", "raw pixels"):
        assert 0 <= out[name]["shape"] <= 1 and 0 <= out[name]["both"] <= min(out[name]["shape"], out[name]["color"])
        assert set(out[name]["shape_by_size"]) <= {"small", "large"}
    assert out["raw pixels"]["dims"] == 21 * 21 * 3
    assert out["raw pixels"]["color"] > 3 * out["chance"]["color"]
    # The tower alone: the same unprojected grids, scored the same.
    alone = probe.object_features(probe.tower_image_features(model.vision), train_scenes=40, test_scenes=20,
                                  batch_size=20)
    assert set(alone) == {"objects", "chance", "semantic", "pixel", "raw pixels"}
    assert alone["pixel"] == out["pixel"] and alone["raw pixels"] == out["raw pixels"]


def test_image_lookups_ask_every_unique_object_and_score_the_best_answer():
    """An oracle that knows each image's scene answers every lookup right; one that always says the
    first candidate is right exactly where that is the answer."""
    from illume_jax.data.shapecomp.render import render
    from illume_jax.data.shapecomp import world

    scenes = [shapecomp.make_scene(1, "test", i) for i in range(30)]
    by_image = {render(s).tobytes(): s for s in scenes}
    asked = []

    def oracle(images, questions, answers):
        out = np.full((len(images), len(answers)), -5.0)
        for n, (image, q) in enumerate(zip(images, questions)):
            scene = by_image[np.asarray(image).tobytes()]
            asked.append(q)
            word = q.rstrip("?").split()[4]   # What shape is the <colour> object / What color is the <shape>
            obj = next(o for o in scene.objects if word in (o.color, o.shape))
            out[n, answers.index(obj.shape if q.startswith("What shape") else obj.color)] = -0.1
        return out

    right = probe.image_lookups(oracle, scenes=30, batch_size=7)
    expected = {k: 0 for k in ("shape_of_color", "color_of_shape")}
    for s in scenes:
        colors = [o.color for o in s.objects]
        shapes = [o.shape for o in s.objects]
        expected["shape_of_color"] += sum(colors.count(c) == 1 for c in colors)
        expected["color_of_shape"] += sum(shapes.count(x) == 1 for x in shapes)
    assert {k: v["questions"] for k, v in right.items()} == expected and len(asked) == sum(expected.values())
    assert all(v["accuracy"] == 1.0 and set(v["by_size"]) == {"small", "large"} for v in right.values())
    first = probe.image_lookups(lambda im, q, a: np.tile(np.arange(len(a))[::-1], (len(im), 1)), scenes=30)
    lv = world.get_level(1)
    share = np.mean([o.shape == lv.shapes[0] for s in scenes for o in s.objects
                     if [x.color for x in s.objects].count(o.color) == 1])
    assert first["shape_of_color"]["accuracy"] == pytest.approx(share)
    assert first["shape_of_color"]["chance"] == pytest.approx(1 / len(lv.shapes))
