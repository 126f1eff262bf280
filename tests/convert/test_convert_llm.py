"""`convert --kind=llm` end to end: official files (HF save_pretrained, sharded safetensors, .bin, bf16)
-> a converted folder -> our LLM (logits equal transformers') and the training engine (a run starts
from the converted weights) -> back to official files (bit-identical); plus the file reader/writer
and the errors. Tiny random Qwen2 / LLaMA models built in the test."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from configs import converted  # noqa: E402
from illume_jax.convert import files, official  # noqa: E402
from illume_jax.convert import weights as weights_lib  # noqa: E402
from illume_jax.train import state as state_lib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SPECIALS = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<|user|>", "<|assistant|>"]


def _hf_model(family: str, tie: bool, dtype=torch.float32):
    torch.manual_seed(0)
    common = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=128, tie_word_embeddings=tie)
    if family == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(num_key_value_heads=2, rope_theta=1e4, **common))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=4, **common))
    with torch.no_grad():  # HF starts norms at 1 and biases at 0: randomise so every path is compared
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    return model.to(dtype).eval()


def _word_tokenizer(path: str) -> None:
    """A small tokenizer.json (WordLevel over ShapeComp words) standing in for Qwen's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from illume_jax.data.shapecomp import world
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    words = " ".join(list(world.COLORS) + list(world.SHAPES)) + " a an the of is there in image what left right"
    tok.train_from_iterator([words], trainers.WordLevelTrainer(vocab_size=90, special_tokens=SPECIALS))
    tok.save(path)


def _save_official(model, folder: str, *, shard: str | None = "20KB", tokenizer: bool = True) -> str:
    if shard:
        model.save_pretrained(folder, max_shard_size=shard, safe_serialization=True)
    else:
        model.save_pretrained(folder, safe_serialization=True)
    if tokenizer:
        _word_tokenizer(os.path.join(folder, "tokenizer.json"))
    return folder


def _our_logits(dst: str, tokens: np.ndarray) -> np.ndarray:
    config = converted.get_config(dst)
    cfg = state_lib.model_config(config)
    mesh = official._mesh()
    graphdef, abs_params = state_lib.abstract_model(cfg, mesh)
    params = state_lib.load_converted_params(dst, official._with_shardings(abs_params), False)
    model = nnx.merge(graphdef, params)
    return np.asarray(model(jnp.asarray(tokens, jnp.int32)))


TOKENS = np.random.default_rng(0).integers(0, 96, size=(2, 12))


@pytest.mark.parametrize("family,tie,shard", [("qwen2", False, "20KB"), ("llama", True, None)])
def test_official_llm_converts_to_equal_logits_and_back(tmp_path, family, tie, shard):
    hf = _hf_model(family, tie)
    src = _save_official(hf, str(tmp_path / "official"), shard=shard)
    if shard:
        assert os.path.exists(os.path.join(src, "model.safetensors.index.json"))
    meta = official.from_official("llm", src, str(tmp_path / "ours"))
    assert meta["kind"] == "llm" and meta["tensors"] == (15 if family == "qwen2" else 11)  # stacked layers
    config = converted.get_config(str(tmp_path / "ours"))
    assert config.model.tie_embeddings == tie and config.model.vocab_size == 96  # detected from the file
    from tokenizers import Tokenizer
    n_text = Tokenizer.from_file(os.path.join(src, "tokenizer.json")).get_vocab_size()
    assert config.model.text_vocab_size == n_text < 96 and config.tokenizer.kind == "hf"  # the tokenizer's length
    assert config.model_init.weights_from == str(tmp_path / "ours")
    with torch.no_grad():
        ref = hf(torch.as_tensor(TOKENS)).logits.numpy()
    np.testing.assert_allclose(_our_logits(str(tmp_path / "ours"), TOKENS), ref, atol=2e-5, rtol=1e-5)

    # ours -> official: transformers loads it and every tensor is bit-identical.
    written = official.to_official("llm", str(tmp_path / "ours"), str(tmp_path / "back"))
    assert "config.json" in written and "tokenizer.json" in written
    back = type(hf).from_pretrained(str(tmp_path / "back")).eval()
    sd, sd_back = hf.state_dict(), back.state_dict()
    assert set(sd) == set(sd_back)
    for k in sd:
        assert torch.equal(sd[k], sd_back[k]), k


def test_bf16_checkpoint_is_stored_bf16_and_restores_as_fp32_master_weights(tmp_path):
    hf = _hf_model("qwen2", False, dtype=torch.bfloat16)
    src = _save_official(hf, str(tmp_path / "official"), shard=None, tokenizer=False)
    reader = files.open_tensors(src)
    assert str(reader["model.norm.weight"].dtype) == "bfloat16"
    official.from_official("llm", src, str(tmp_path / "ours"))
    config = converted.get_config(str(tmp_path / "ours"))
    assert config.model.text_vocab_size == 96  # no tokenizer.json: every row is text
    mesh = official._mesh()
    _, abs_params = state_lib.abstract_model(state_lib.model_config(config), mesh)
    params = state_lib.load_converted_params(str(tmp_path / "ours"), official._with_shardings(abs_params), False)
    emb = params["embed"]["embedding"][...]
    assert emb.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(emb), hf.model.embed_tokens.weight.detach().float().numpy())
    # .bin files are read with weights_only=True (and mmap): same tensors.
    torch.save(hf.state_dict(), str(tmp_path / "pytorch_model.bin"))
    binary = files.open_tensors(str(tmp_path / "pytorch_model.bin"))
    assert set(binary) == set(reader)
    np.testing.assert_array_equal(binary["lm_head.weight"].astype(np.float32),
                                  reader["lm_head.weight"].astype(np.float32))


def test_training_engine_starts_from_converted_weights(tmp_path):
    """A run on configs/converted.py:DIR starts from the converted weights: with lr 0 its final
    checkpoint exports back to the very tensors of the official file."""
    from illume_jax.train import loop
    hf = _hf_model("qwen2", False)
    src = _save_official(hf, str(tmp_path / "official"))
    official.from_official("llm", src, str(tmp_path / "ours"))
    config = converted.get_config(str(tmp_path / "ours"))
    config.mesh.data = 1  # 8 fake devices; a 1-device mesh keeps this test quick
    with config.unlocked():
        for st in config.stages:
            st.steps, st.lr, st.global_batch_size, st.seq_len = 1, 0.0, 2, 64
        config.data.datasets.shapecomp_caption.num_examples = 16
        config.data.datasets.shapecomp_qa.num_examples = 16
    mesh = official._mesh()
    out = loop.train(config, str(tmp_path / "run"), mesh=mesh)
    assert not out["preempted"]
    official.to_official("llm", str(tmp_path / "run"), str(tmp_path / "back"))
    back = files.open_tensors(str(tmp_path / "back"))
    sd = hf.state_dict()
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k].numpy(), err_msg=k)


def test_bad_checkpoints_are_named_and_nothing_is_written(tmp_path):
    hf = _hf_model("qwen2", False)
    src = _save_official(hf, str(tmp_path / "official"), shard=None, tokenizer=False)
    sd = dict(files.open_tensors(src))
    del sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.layers.0.self_attn.k_proj.weight"] = np.zeros((24, 32), np.float32)
    broken = str(tmp_path / "broken")
    files.write_safetensors(broken, sd)
    with open(os.path.join(broken, "config.json"), "w") as f:
        json.dump(hf.config.to_dict(), f)
    dst = tmp_path / "ours"
    with pytest.raises(ValueError) as err:
        official.from_official("llm", broken, str(dst))
    assert "model.layers.0.self_attn.k_proj.weight: expected (32, 2, 8)" in str(err.value)
    sd["model.layers.0.self_attn.k_proj.weight"] = hf.state_dict()["model.layers.0.self_attn.k_proj.weight"].numpy()
    files.write_safetensors(broken, sd)
    with pytest.raises(ValueError, match=r"lacks layers \[1\] of mlp/up_proj"):
        official.from_official("llm", broken, str(dst))
    assert not dst.exists() and not [p for p in os.listdir(tmp_path) if "converting" in p]
    # An index naming a shard that is not there; a folder without weights.
    with open(os.path.join(broken, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {"a": "model-00001-of-00002.safetensors"}}, f)
    with pytest.raises(ValueError, match="do not exist"):
        files.open_tensors(broken)
    with pytest.raises(ValueError, match="expected one of"):
        files.open_tensors(str(tmp_path))
    # An existing, non-empty destination is not replaced without --overwrite.
    official.from_official("llm", src, str(dst))
    with pytest.raises(ValueError, match="--overwrite"):
        official.from_official("llm", src, str(dst))
    official.from_official("llm", src, str(dst), overwrite=True)
    # A converted LLM folder is refused where a DualViTok is expected.
    with pytest.raises(ValueError, match="expected dualvitok"):
        weights_lib.check_kind(str(dst), ("dualvitok",), "--tokenizer")


def test_safetensors_writer_shards_and_reads_back(tmp_path):
    import ml_dtypes
    rng = np.random.default_rng(0)
    tensors = {"a": rng.normal(size=(4, 8)).astype(np.float32), "b": np.arange(6, dtype=np.int64).reshape(2, 3),
               "c": rng.normal(size=(16,)).astype(ml_dtypes.bfloat16)}
    out = files.write_safetensors(str(tmp_path / "s"), tensors, max_shard_bytes=100)
    assert out[-1].endswith(".index.json") and len(out) == 3  # a (128 bytes) alone; b + c (80) share
    from safetensors.torch import load_file
    ref = {}
    for p in out[:-1]:
        ref |= load_file(p)
    assert ref["c"].dtype == torch.bfloat16
    back = files.open_tensors(str(tmp_path / "s"))
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back.shape(k) == v.shape
        np.testing.assert_array_equal(back[k].view(np.uint8), v.view(np.uint8))
        np.testing.assert_array_equal(ref[k].view(torch.int16).numpy() if k == "c" else ref[k].numpy(),
                                      v.view(np.int16) if k == "c" else v)


def test_cli_reports_usage_errors():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run = lambda *a: subprocess.run([sys.executable, "-m", "illume_jax", "convert", *a], cwd=ROOT, env=env,  # noqa
                                    capture_output=True, text=True, timeout=120)
    r = run("--kind=llm", "--src=x", "--dst=y")
    assert r.returncode == 2 and "exactly one of --from=official or --to=official" in r.stderr
    r = run("--from=official", "--kind=llm", "--src=/nonexistent", "--dst=/tmp/never")
    assert r.returncode == 1 and "no such file or folder" in r.stderr
    jax.clear_caches()
