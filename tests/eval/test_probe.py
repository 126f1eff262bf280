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
