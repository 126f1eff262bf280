"""Tokenizers, chat templates, TFDS builders (incl. bad records) and the Grain pipeline."""
import json
import os

import numpy as np
import pytest

from configs import tiny
from illume_jax.data import build, chat, pipeline, tokenizers


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("data"))
    c = tiny.get_config("seq_len=64,batch=4")
    c.data.datasets.shapecomp_caption.num_examples = 30
    c.data.datasets.shapecomp_qa.num_examples = 30
    build.build_datasets(c, os.path.join(work, "data"))
    tok = tokenizers.load_or_train_tokenizer(c, work)
    return c, work, tok


def test_sentencepiece_is_deterministic_cached_and_has_single_id_markers(setup, tmp_path):
    c, work, tok = setup
    again = tokenizers.load_or_train_tokenizer(c, str(tmp_path))
    assert again.proto == tok.proto  # retrained from scratch: identical model bytes
    for piece in tokenizers.SPECIAL_PIECES:
        assert len(tok.encode(piece)) == 1 and tok.token_to_id(piece) is not None
    text = "Scene: one object: a large red circle at the top left."
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size <= c.model.text_vocab_size


def test_hf_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {w: i for i, w in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "hello", "world", "[UNK]"])}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    path = str(tmp_path / "tokenizer.json")
    t.save(path)
    hf = tokenizers.HFTokenizer(path)
    assert hf.eos_id == 2 and hf.pad_id == 0 and hf.encode("hello world") == [3, 4]
    with pytest.raises(ValueError, match="no such tokenizer.json"):
        tokenizers.HFTokenizer(str(tmp_path / "missing.json"))


def test_chat_template_masks_exactly_the_assistant_turns(setup):
    _, _, tok = setup
    conv = [{"from": "human", "value": "<image>\nWhat color is the star?"}, {"from": "gpt", "value": "red"},
            {"from": "human", "value": "How many stars are there?"}, {"from": "gpt", "value": "two"}]
    ids, mask = chat.render(conv, tok, "plain", text_only=True, context="two red stars")
    trained = tok.decode(ids[mask == 1].tolist())
    assert "red" in trained and "two" in trained and "color" not in tok.decode(ids[mask == 1][:3].tolist())
    assert (ids[mask == 1] == tok.eos_id).sum() == 2  # each answer ends with EOS, which is trained
    assert "Scene: two red stars" in tok.decode(ids[mask == 0].tolist())
    with pytest.raises(chat.SkipRecord, match="assistant answers with an image"):
        chat.render([{"from": "human", "value": "draw"}, {"from": "gpt", "value": "<image>"}], tok, "plain",
                    text_only=True)
    ids_q, mask_q = chat.render(conv, tok, "qwen2", text_only=True, context="x")
    assert tok.decode(ids_q[mask_q == 1].tolist()).count("<|im_end|>") == 2


def test_jsonl_builder_skips_and_reports_bad_records(tmp_path):
    from PIL import Image
    img_dir = tmp_path / "img"
    img_dir.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img_dir / "ok.png")
    (img_dir / "broken.png").write_bytes(b"not a png")
    good = {"images": ["ok.png"], "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                                     {"from": "gpt", "value": "black"}]}
    lines = [json.dumps(good), "{not json", json.dumps({"images": []}),
             json.dumps(dict(good, images=["broken.png"])), json.dumps(dict(good, images=["missing.png"])),
             json.dumps(good)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    c = tiny.get_config()
    c.data.datasets["user"] = dict(kind="jsonl", path=str(tmp_path / "d.jsonl"), image_dir=str(img_dir))
    info = build.build_dataset(c, "user", str(tmp_path / "data"))
    assert info["splits"]["train"] == 2 and info["bad_records"] == 4
    report = json.load(open(os.path.join(info["dir"], "bad_records.json")))
    where = [r.split(": ", 1)[0].rsplit(":", 1)[1] for r in report["records"]]
    assert where == ["2", "3", "4", "5"]
    assert "missing field 'conversations'" in report["records"][1]
    assert build.build_dataset(c, "user", str(tmp_path / "data")) == info  # cached, no rebuild
    c.data.datasets["empty"] = dict(kind="jsonl", path=str(tmp_path / "nope.jsonl"), image_dir="")
    with pytest.raises(ValueError, match="empty.path=.*does not exist"):
        build.build_dataset(c, "empty", str(tmp_path / "data"))


def test_builders_made_in_a_bare_process_do_not_warn_about_custom_configs(tmp_path):
    """Spawned Grain workers re-create the builders after importing only data/tfds_builders.py; TFDS's
    'Using custom data configuration' warning (one per builder per worker) must be filtered there."""
    import subprocess
    import sys
    code = ("from illume_jax.data import tfds_builders as t\n"
            f"t.ShapeComp(config=t.shapecomp_config((1,), ('caption',), 4), data_dir={str(tmp_path)!r})\n"
            "import logging; logging.getLogger('absl').warning('canary')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert r.returncode == 0, r.stderr
    assert "canary" in r.stderr  # absl warnings do reach stderr in such a process...
    assert "Using custom data configuration" not in r.stderr  # ...but not this one


def _iterator(setup, **kw):
    c, work, tok = setup
    return pipeline.make_train_iterator(c, kw.pop("stage", 0), tok, os.path.join(work, "data"), **kw)


def test_batches_are_packed_consistently(setup):
    c, _, tok = setup
    b = next(_iterator(setup))
    assert set(b) == {"tokens", "targets", "loss_mask", "segment_ids", "positions", "sources"}
    assert all(v.shape == (4, 64) for v in b.values())
    seg, pos, toks, tgt = b["segment_ids"], b["positions"], b["tokens"], b["targets"]
    for r in range(4):
        for s in set(seg[r]) - {0}:
            idx = np.where(seg[r] == s)[0]
            assert (np.diff(idx) == 1).all() and (pos[r, idx] == np.arange(len(idx))).all()
            # next-token targets stay inside their conversation
            np.testing.assert_array_equal(tgt[r, idx[:-1]], toks[r, idx[1:]])
        assert (b["loss_mask"][r][seg[r] == 0] == 0).all()
    assert b["loss_mask"].sum() > 0 and (seg > 0).mean() > 0.5


def test_deterministic_and_resumable(setup):
    a = _iterator(setup)
    first = [next(a) for _ in range(3)]
    state = a.get_state()
    after = [next(a) for _ in range(2)]
    b = _iterator(setup)
    for x, y in zip(first, [next(b) for _ in range(3)]):
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
    fresh = _iterator(setup)
    fresh.set_state(state)
    for x, y in zip(after, [next(fresh) for _ in range(2)]):
        np.testing.assert_array_equal(x["tokens"], y["tokens"])


def test_resumable_with_worker_processes(setup):
    c, work, tok = setup
    c2 = tiny.get_config("seq_len=64,batch=4,workers=2")
    c2.data.datasets.shapecomp_caption.num_examples = 30
    c2.data.datasets.shapecomp_qa.num_examples = 30
    make = lambda: pipeline.make_train_iterator(c2, 0, tok, os.path.join(work, "data"))
    a = make()
    [next(a) for _ in range(2)]
    state = a.get_state()
    after = [next(a)["tokens"] for _ in range(2)]
    b = make()
    b.set_state(state)
    for x in after:
        np.testing.assert_array_equal(x, next(b)["tokens"])


def test_process_shards_are_disjoint(setup):
    seen = []
    for p in range(2):
        it = _iterator(setup, process_index=p, process_count=2)
        b = next(it)
        assert b["tokens"].shape == (2, 64)
        seen.append({tuple(r) for r in b["tokens"]})
    assert not seen[0] & seen[1]


def test_mixture_weights_are_respected(setup):
    c, work, tok = setup
    src = {"a": [{"conversations": json.dumps([{"from": "human", "value": "a"}, {"from": "gpt", "value": "a"}]),
                  "context": b""}] * 50,
           "b": [{"conversations": json.dumps([{"from": "human", "value": "b"}, {"from": "gpt", "value": "b"}]),
                  "context": b""}] * 50}
    c3 = tiny.get_config("seq_len=64,batch=4")
    c3.data.datasets["a"] = dict(kind="shapecomp", levels=(0,), tasks=("qa",), num_examples=1)
    c3.data.datasets["b"] = dict(kind="shapecomp", levels=(0,), tasks=("qa",), num_examples=1)
    c3.stages[0].mixture = {"a": 0.8, "b": 0.2}
    it = pipeline.make_train_iterator(c3, 0, tok, "", sources=src)
    batches = [next(it) for _ in range(10)]
    text = "".join(tok.decode(b["tokens"][r].tolist()) for b in batches for r in range(4))
    na, nb = text.count("<|user|>a"), text.count("<|user|>b")
    assert 0.7 < na / (na + nb) < 0.9
    # Every packed conversation's tokens carry its dataset's 1-based mixture position, padding 0.
    names = pipeline.mixture_names(c3.stages[0])
    for b in batches:
        seg, srcs = b["segment_ids"], b["sources"]
        assert (srcs[seg == 0] == 0).all()
        for r in range(4):
            for s_id in set(seg[r]) - {0}:
                tags = set(srcs[r][seg[r] == s_id])
                assert len(tags) == 1
                user = tok.decode(b["tokens"][r][seg[r] == s_id].tolist()).split("<|user|>")[1][0]
                assert names[tags.pop() - 1] == user


def test_pipeline_config_errors(setup):
    c, work, tok = setup
    with pytest.raises(ValueError, match="not divisible by 3 processes"):
        pipeline.make_train_iterator(c, 0, tok, work, process_count=3)
    bad = tiny.get_config()
    bad.stages[0].mixture = {"nope": 1.0}
    with pytest.raises(ValueError, match="mixture names 'nope'"):
        pipeline.make_train_iterator(bad, 0, tok, work)
