"""A whole self-enhancement round on a micro MLLM (random weights in a converted folder: the round
only needs a model that generates, answers and trains), killed inside and between every step and
resumed: nothing is redone or lost, the datasets it writes are well-formed, the dialogues follow
the formats of align/assessment.py, and stage 3 trains on them."""
import json
import os

import numpy as np
import pytest

pytest.importorskip("torch")

from flax import nnx  # noqa: E402

from configs import illume_tiny  # noqa: E402
from convert.test_convert_pipeline import _random, _word_tokenizer  # noqa: E402
from illume_jax.align import assessment  # noqa: E402
from illume_jax.align import round as round_lib  # noqa: E402
from illume_jax.convert import files, official  # noqa: E402
from illume_jax.convert import dualvitok as conv_dvt  # noqa: E402
from illume_jax.convert import mllm as conv_mllm  # noqa: E402
from illume_jax.models import mllm  # noqa: E402
from illume_jax.models.dualvitok import DualViTokConfig  # noqa: E402
from illume_jax.models.llm import LLMConfig  # noqa: E402
from illume_jax.train import tokenizer as tok_lib  # noqa: E402
from train.test_tokenizer_train import micro_tokenizer_config  # noqa: E402


def micro_round_config():
    c = illume_tiny.get_config("vocab=64,batch=8")
    for d in c.data.datasets.values():
        d.num_examples = 16
    c.stages[-1].seq_len = 768
    c.checkpoint.update(every_steps=1000, async_save=False)
    c.log_every = 1
    c.self_enhance.update(num_scenes=4, chunk=3, train_steps=2, mix_weight=0.5,
                          eval=dict(gen_scenes=1, pope_scenes=1, edit_pairs=1))
    return c


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A micro MLLM as a converted folder (its DualViTok too), built from random weights."""
    root = tmp_path_factory.mktemp("self_enhance")
    tok_config = micro_tokenizer_config()
    dvt_cfg = DualViTokConfig.from_config(tok_config.model)
    files.write_safetensors(str(root / "dvt_official"), conv_dvt.to_official(
        _random(lambda: tok_lib.make_model(tok_config.model, nnx.Rngs(3))), dvt_cfg))
    official.from_official("dualvitok", str(root / "dvt_official"), str(root / "dvt"), base=tok_config)
    llm = LLMConfig(family="qwen2", text_vocab_size=64, vocab_size=64 + 7 + 32 + 64 + 96 + 13, d_model=32,
                    num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64, rope_theta=1e4,
                    norm_eps=1e-6, qkv_bias=True, tie_embeddings=False, remat="none")
    cfg = mllm.MLLMConfig.create(llm, dvt_cfg)
    folder = str(root / "mllm_official")
    files.write_safetensors(folder, conv_mllm.to_official(_random(lambda: mllm.MLLM(cfg, rngs=nnx.Rngs(4))), cfg))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(conv_mllm.official_config_dict(cfg), f)
    _word_tokenizer(os.path.join(folder, "tokenizer.json"), 64)
    official.from_official("mllm", folder, str(root / "mllm"), tokenizer=str(root / "dvt"),
                           base=micro_round_config())
    return str(root / "mllm")


def test_round_resumes_after_kills_in_and_between_every_step(model_dir):
    from configs import converted
    config = converted.get_config(model_dir)  # the micro config the conversion wrote (self_enhance block kept)
    root = os.path.join(model_dir, "self_enhance")
    n = len(round_lib.prompts(config.self_enhance))
    assert n == 7  # 3 parts of up to 3 samples

    for stop in ("generate:1", "generate:1", "generate", "judge:1", "judge", "dialogues", "train:1"):
        with pytest.raises(round_lib.Stop):
            round_lib.run_round(config, model_dir, stop_after=stop)
        if stop == "generate:1":  # one more part per run, the finished ones untouched
            parts = sorted(p for p in os.listdir(os.path.join(root, "generate")) if p.endswith(".array_record"))
            assert len(parts) in (1, 2) and not os.path.exists(os.path.join(root, "generate", "DONE.json"))
    summary = round_lib.run_round(config, model_dir)

    generated = round_lib.read_records(os.path.join(root, "generate"))
    assert [r["id"] for r in generated] == list(range(n))  # each sample exactly once across the kills
    judged = round_lib.read_records(os.path.join(root, "judge"))
    assert [r["id"] for r in judged] == list(range(n))
    assert summary["judge"]["judged"] + summary["judge"]["skipped"] == n
    # The exact judge of a random model's images: every verdict parses back from its own text.
    for r in judged:
        a = assessment.Assessment.from_json(r["verdict"]["assessment"])
        assert assessment.parse_assessment(assessment.format_assessment(a)) == a

    d = summary["dialogues"]
    assert d["good"] + d["bad"] + d["skipped"] == n and d["dialogues"] == d["good"] + d["bad"]
    lines = [json.loads(x) for x in open(os.path.join(root, "dialogues", "self_enhance.jsonl"))]
    assert len(lines) == d["dialogues"]
    for rec in lines:
        turns = rec["conversations"]
        assert len(turns) in (2, 4) and len(rec["images"]) == len(turns) // 2
        assert turns[0]["value"].startswith("<image>\n") and assessment.parse_assessment(turns[1]["value"])
        if len(turns) == 4:  # bad sample: the corrected image (the exact render) is the answer
            assert turns[3]["value"] == "<image>"
            assert not assessment.parse_assessment(turns[1]["value"]).consistent
        for image in rec["images"]:
            assert os.path.exists(os.path.join(root, "dialogues", "images", image))

    # Stage 3 ran its steps with the dialogues in the mixture, resumed after the kill at step 1.
    from illume_jax.train.checkpoint import Checkpointer
    ckpt = Checkpointer(os.path.join(root, "train", "checkpoints"), async_save=False)
    meta = ckpt.restore_meta()
    ckpt.close()
    assert meta["step"] == 2
    cfg = json.loads(meta["config"])
    assert cfg["stages"][0]["mixture"]["self_enhance"] == pytest.approx(0.5)
    assert cfg["model_init"]["weights_from"] == model_dir
    assert set(summary["eval"]) >= {"geneval_overall", "pope_accuracy", "edit_success"}
    assert os.path.exists(os.path.join(root, "eval", "mllm.json"))
    # A finished round is not redone; --rerun_from redoes a step and the later ones only.
    again = round_lib.run_round(config, model_dir)
    assert again["eval"] == summary["eval"]
    with pytest.raises(round_lib.Stop):
        round_lib.run_round(config, model_dir, rerun_from="judge", stop_after="dialogues")
    assert round_lib._done(os.path.join(root, "generate")) == summary["generate"]  # kept
    assert round_lib._done(os.path.join(root, "train")) is None  # discarded, to be redone
    assert [r["id"] for r in round_lib.read_records(os.path.join(root, "judge"))] == list(range(n))


def test_training_config_mixes_the_dialogues_at_the_configured_share():
    config = micro_round_config()
    se = config.self_enhance
    c = round_lib.training_config(config, se, "/d", "/w", "/data")
    mix = c.stages[0].mixture
    assert len(c.stages) == 1 and c.stages[0].steps == se.train_steps
    assert mix["self_enhance"] == pytest.approx(se.mix_weight) and sum(mix.values()) == pytest.approx(1.0)
    assert c.data.datasets.self_enhance.path == "/d/self_enhance.jsonl"
    control = round_lib.training_config(config, se, None, "/w", "/data")  # the ablation's control arm
    assert "self_enhance" not in control.stages[0].mixture
    assert control.stages[0].steps == c.stages[0].steps
    with pytest.raises(ValueError, match="stop_after"):
        round_lib._parse_stop("nope")
    np.testing.assert_allclose(sum(control.stages[0].mixture.values()), sum(config.stages[-1].mixture.values()))


def test_ablation_reports_mean_and_spread_per_arm():
    from illume_jax.align import ablation
    res = {"geneval": {"overall": 0.5, "tags": {"colors": 0.25}},
           "pope": {"mean": {"accuracy": 0.6, "f1": 0.5, "yes_ratio": 0.4}, "random": {"accuracy": 0.7}},
           "edit": {"success": 0.1, "preservation": 0.9}}
    m = ablation._metrics(res)
    assert m["geneval_colors"] == 0.25 and m["pope_random_accuracy"] == 0.7 and m["edit_success"] == 0.1
    runs = [dict(m, arm="with", seed=s, geneval_overall=g, judge=dict(consistent=c, compared=4, parsed=p,
                                                                       samples=8))
            for s, g, c, p in ((0, 0.2, 0.5, 4), (1, 0.4, None, 0))]
    agg = ablation._aggregate(runs)
    assert agg["geneval_overall"]["mean"] == pytest.approx(0.3) and agg["geneval_overall"]["std"] == pytest.approx(0.1)
    assert agg["judge_agreement"] == dict(mean=0.5, std=0.0, runs=1)  # a run whose judge never parsed is left out
    assert agg["judge_parsed"]["mean"] == pytest.approx(0.25)


def test_self_enhance_config_validates_and_names_bad_values():
    from configs import self_enhance_tiny
    from illume_jax import config_check
    config_check.validate(self_enhance_tiny.get_config("tokenizer=/no/tokenizer/yet"))
    for key, value, match in (("judge", "gpt", "self_enhance.judge"), ("mix_weight", 1.0, "self_enhance.mix_weight"),
                              ("chunk", 0, "self_enhance.chunk")):
        bad = self_enhance_tiny.get_config("tokenizer=/no/tokenizer/yet")
        bad.self_enhance[key] = value
        with pytest.raises(ValueError, match=match):
            config_check.validate(bad)
    bad = self_enhance_tiny.get_config("tokenizer=/no/tokenizer/yet,judge=http")
    with pytest.raises(ValueError, match="self_enhance.http.url"):  # an HTTP judge needs its endpoint
        config_check.validate(bad)


def test_control_arm_skips_drawing_and_judging(model_dir, tmp_path):
    """self_enhance.mix_weight=0 (a sweep's self_enhance=0 arm): no images drawn or judged, stage 3
    trains from the same weights on the plain SFT mixture."""
    import shutil
    from configs import converted
    from illume_jax.train.checkpoint import Checkpointer
    work = str(tmp_path / "mllm")
    shutil.copytree(model_dir, work, ignore=shutil.ignore_patterns("self_enhance"))
    config = converted.get_config(work)
    with config.unlocked():
        config.self_enhance.mix_weight = 0.0
    summary = round_lib.run_round(config, work)
    for step in ("generate", "judge", "dialogues"):
        assert summary[step] == dict(skipped="self_enhance.mix_weight=0")
    assert not os.path.exists(os.path.join(work, "self_enhance", "generate", "images"))
    ckpt = Checkpointer(os.path.join(work, "self_enhance", "train", "checkpoints"), async_save=False)
    meta = ckpt.restore_meta()
    ckpt.close()
    assert meta["step"] == config.self_enhance.train_steps
    assert "self_enhance" not in json.loads(meta["config"])["stages"][0]["mixture"]
    assert set(summary["eval"]) >= {"geneval_overall", "pope_accuracy", "edit_success"}


def test_vqa_accuracy_scores_first_words(model_dir):
    from illume_jax.eval import mllm as mllm_eval
    from illume_jax.infer.illume import Illume

    class Oracle:  # answers every question right: the scorer's parsing, not the model, is under test
        def __init__(self, right):
            self.right = right

        def understand(self, images, questions, **kw):
            from illume_jax.data import shapecomp
            answers = [q["answer"] for i in range(3)  # in the order the suite asks them
                       for q in shapecomp.attribute_questions(shapecomp.make_scene(1, "test", i))]
            assert len(answers) == len(questions)
            return [f"{a.capitalize()}." if self.right else "zzz" for a in answers]

    good = mllm_eval.vqa_accuracy(Oracle(True), scenes=3)
    assert good["accuracy"] == 1.0 and good["questions"] >= 3 and set(good["per_kind"]) >= {"counting"}
    assert mllm_eval.vqa_accuracy(Oracle(False), scenes=3)["accuracy"] == 0.0
    assert 0.0 < good["constant_answer_accuracy"] < 1.0
    res = mllm_eval.vqa_accuracy(Illume.load(model_dir), scenes=1)  # a real model's replies parse
    assert 0.0 <= res["accuracy"] <= 1.0
