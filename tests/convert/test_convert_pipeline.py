"""The three ILLUME+ checkpoints through `convert` and into every consumer: official-format files
(written from random micro models in the official key names and layouts: a DualViTok `.bin` under
'ema', a sharded MLLM safetensors folder with config.json + tokenizer.json, a diffusers decoder
folder) -> converted folders -> the tokenizer loader, `Illume.load` (generate + understand, images
decoded by the converted diffusion decoder) and the decoder loader -> back to official files,
bit-identical. Numerical parity with PyTorch is proven per model in tests/parity/."""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from configs import illume_tiny  # noqa: E402
from illume_jax import sharding  # noqa: E402
from illume_jax.convert import dualvitok as conv_dvt  # noqa: E402
from illume_jax.convert import files, official  # noqa: E402
from illume_jax.convert import mllm as conv_mllm  # noqa: E402
from illume_jax.convert import sdxl_decoder as conv_sdxl  # noqa: E402
from illume_jax.convert import weights as weights_lib  # noqa: E402
from illume_jax.models import diffusion_decoder as dd  # noqa: E402
from illume_jax.models import mllm  # noqa: E402
from illume_jax.models.dualvitok import DualViTokConfig, token_grids  # noqa: E402
from illume_jax.models.llm import LLMConfig  # noqa: E402
from illume_jax.train import tokenizer as tok_lib  # noqa: E402
from train.test_decoder_train import micro_decoder  # noqa: E402
from train.test_tokenizer_train import micro_tokenizer_config  # noqa: E402


def _random(make, seed: int = 1) -> dict[str, np.ndarray]:
    """{path: numpy} for every variable of the model `make` builds: shapes from the abstract model,
    values drawn here (no init runs or compiles; the values only have to differ)."""
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    with sharding.use_mesh(mesh):
        abstract = nnx.eval_shape(make)
    rng = np.random.default_rng(seed)
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract)):
        leaf = var.get_value()
        if hasattr(leaf, "shape"):
            scale = 1.0 if path[-1] in ("scale", "frozen_codebook") else 0.1
            out[weights_lib.path_str(path)] = (rng.normal(0, 1, leaf.shape) * scale).astype(leaf.dtype)
    return out


def _word_tokenizer(path: str, size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    words = "a red green blue circle square triangle is there an the image of in what colour left right yes no"
    tok.train_from_iterator([words], trainers.WordLevelTrainer(
        vocab_size=size, special_tokens=["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]))
    tok.save(path)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    out = {"root": root}
    # -- DualViTok: a .bin state dict under 'ema', as the official loaders accept ---------------------
    tok_config = micro_tokenizer_config()
    dvt_cfg = DualViTokConfig.from_config(tok_config.model)
    dvt_flat = _random(lambda: tok_lib.make_model(tok_config.model, nnx.Rngs(3)))
    dvt_sd = conv_dvt.to_official(dvt_flat, dvt_cfg)
    os.makedirs(root / "dualvitok_official")
    torch.save({"ema": {k: torch.from_numpy(np.array(v)) for k, v in dvt_sd.items()}},
               str(root / "dualvitok_official" / "pytorch_model.bin"))
    official.from_official("dualvitok", str(root / "dualvitok_official"), str(root / "dualvitok"), base=tok_config)
    out.update(dvt_flat=dvt_flat, dvt_sd=dvt_sd)

    # -- MLLM: sharded safetensors + config.json + tokenizer.json -----------------------------------------
    base = illume_tiny.get_config("vocab=64")
    llm = LLMConfig(family="qwen2", text_vocab_size=64, vocab_size=64 + 7 + 32 + 64 + 96 + 13, d_model=32,
                    num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64, rope_theta=1e4,
                    norm_eps=1e-6, qkv_bias=True, tie_embeddings=False, remat="none")
    cfg = mllm.MLLMConfig.create(llm, dvt_cfg)
    mllm_flat = _random(lambda: mllm.MLLM(cfg, rngs=nnx.Rngs(4)), seed=2)
    mllm_sd = conv_mllm.to_official(mllm_flat, cfg)
    folder = str(root / "mllm_official")
    files.write_safetensors(folder, mllm_sd, max_shard_bytes=200_000)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(conv_mllm.official_config_dict(cfg), f)
    _word_tokenizer(os.path.join(folder, "tokenizer.json"), 64)
    official.from_official("mllm", folder, str(root / "mllm"), tokenizer=str(root / "dualvitok"), base=base)
    out.update(mllm_flat=mllm_flat, mllm_sd=mllm_sd, mllm_cfg=cfg)

    # -- SDXL-style decoder: a diffusers folder -------------------------------------------------------------
    dec_config = micro_decoder(str(root / "dualvitok"))
    dec_cfg = dd.DecoderConfig.from_config(dec_config.model)
    dec_flat = _random(lambda: dd.DiffusionDecoder(dec_cfg, rngs=nnx.Rngs(5)), seed=3)
    unet_cfg, vae_cfg = official._diffusers_configs(dec_config)
    conv_sdxl.write_folder(str(root / "decoder_official"), dec_flat, dec_cfg, unet_cfg, vae_cfg,
                           dict(dec_config.scheduler))
    official.from_official("sdxl-decoder", str(root / "decoder_official"), str(root / "decoder"),
                           tokenizer=str(root / "dualvitok"), base=dec_config)
    out.update(dec_flat=dec_flat)
    return out


def _same(a: dict, b: dict) -> None:
    assert set(a) == set(b), (sorted(set(a) ^ set(b)))[:8]
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def test_dualvitok_folder_loads_bit_exactly_and_encodes(converted):
    root = converted["root"]
    wd = str(root / "dualvitok")
    assert weights_lib.info(wd)["kind"] == "dualvitok"
    model, trainer, state = tok_lib.load_tokenizer(tok_lib.saved_config(wd), wd)
    _same(weights_lib.flat_numpy(model), converted["dvt_flat"])  # frozen codebooks included
    images = np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
    _, codes = trainer.reconstruct(state, images)
    (h1, w1), (h2, w2) = token_grids(64, 64, model.cfg)
    assert {k: v.shape for k, v in codes.items()} == {"semantic": (2, h1, w1), "pixel": (2, h2, w2)}
    np.testing.assert_array_equal(np.asarray(codes["pixel"]), np.asarray(model.encode(images)[1]))


def test_mllm_folder_runs_in_illume_with_the_converted_decoder(converted):
    from illume_jax.infer.illume import Illume
    root = converted["root"]
    model = Illume.load(str(root / "mllm"), diffusion_decoder=str(root / "decoder"))
    _same({k: v for k, v in weights_lib.flat_numpy(model.model).items()}, converted["mllm_flat"])
    assert model.config.model_init.weights_from == str(root / "mllm")
    images = model.generate(["a red circle"], seed=0)
    assert len(images) == 1 and images[0].shape == (128, 128, 3) and images[0].dtype == np.uint8  # 2x decoder
    answers = model.understand([images[0][::2, ::2]], ["is there a red circle"], max_new_tokens=4)
    assert len(answers) == 1 and isinstance(answers[0], str)


def test_decoder_folder_loads_and_every_folder_exports_back_bit_identically(converted, tmp_path):
    from illume_jax.train.decoder import load_decoder
    root = converted["root"]
    trainer, state = load_decoder(str(root / "decoder"), official._mesh())
    _same(weights_lib.flat_numpy(state.params), converted["dec_flat"])
    official.to_official("dualvitok", str(root / "dualvitok"), str(tmp_path / "dvt"))
    _same(dict(files.open_tensors(str(tmp_path / "dvt"))), converted["dvt_sd"])
    official.to_official("mllm", str(root / "mllm"), str(tmp_path / "mllm"))
    _same(dict(files.open_tensors(str(tmp_path / "mllm"))), converted["mllm_sd"])
    hf = json.load(open(tmp_path / "mllm" / "config.json"))
    assert hf["special_tokens_ids"] == list(range(64, 71)) and os.path.exists(tmp_path / "mllm" / "tokenizer.json")
    official.to_official("sdxl-decoder", str(root / "decoder"), str(tmp_path / "dec"))
    for sub in ("unet", "vae"):
        _same(dict(files.open_tensors(str(tmp_path / "dec" / sub))),
              dict(files.open_tensors(str(root / "decoder_official" / sub))))


def test_consumers_refuse_folders_of_the_wrong_kind(converted, tmp_path):
    root = converted["root"]
    with pytest.raises(ValueError, match="expected dualvitok"):
        official.from_official("mllm", str(root / "mllm_official"), str(tmp_path / "x"), tokenizer=str(root / "mllm"))
    with pytest.raises(ValueError, match="not an MLLM"):
        from illume_jax.infer.illume import Illume
        Illume.load(str(root / "dualvitok"))
    with pytest.raises(ValueError, match="expected llm"):
        official.to_official("llm", str(root / "mllm"), str(tmp_path / "y"))
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "y")


def test_tokenizer_and_decoder_trainers_start_from_the_converted_weights(converted):
    """Fine-tuning official weights: `--config=configs/converted.py:DIR` points model_init.weights_from
    at the folder, and the first train state holds exactly the converted variables."""
    from configs import converted as converted_config
    from illume_jax.train.decoder import DecoderTrainer, FrozenTokenizer
    root = converted["root"]
    mesh = official._mesh()
    config = converted_config.get_config(str(root / "dualvitok"))
    assert config.model_init.weights_from == str(root / "dualvitok") and config.vit_pretrain.steps == 0
    trainer = tok_lib.TokenizerTrainer(config, str(root / "ft_tok"), mesh, training=False)
    state = trainer.init_state()
    model = nnx.merge(trainer.graphdef, state.params, state.buffers)
    _same(weights_lib.flat_numpy(model), converted["dvt_flat"])
    assert jax.tree.leaves(state.opt_state)  # a fresh optimizer over the converted weights

    config = converted_config.get_config(str(root / "decoder"))
    assert config.vae_train.steps == 0 and config.tokenizer_workdir == str(root / "dualvitok")
    dt = DecoderTrainer(config, str(root / "ft_dec"), mesh, "unet", FrozenTokenizer(config, mesh))
    state = dt.init_state()
    _same(weights_lib.flat_numpy(state.params), converted["dec_flat"])
    _same(weights_lib.flat_numpy(state.ema), {k[len("unet/"):]: v for k, v in converted["dec_flat"].items()
                                              if k.startswith("unet/")})


def test_converted_configs_pass_validation(converted, tmp_path):
    from configs import converted as converted_config
    from illume_jax import config_check
    root = converted["root"]
    config_check.validate(converted_config.get_config(str(root / "mllm")))
    # Without --config, the release's own recipe: configs/illume_plus_3b.py's vision block and its stage 3 only.
    official.from_official("mllm", str(root / "mllm_official"), str(tmp_path / "default"),
                           tokenizer=str(root / "dualvitok"))
    default = converted_config.get_config(str(tmp_path / "default"))
    config_check.validate(default)
    assert [st.name for st in default.stages] == ["sft"] and default.stages[0].cfg_dropout == 0.1
    assert default.vision.resolution == 512 and default.vision.vit_trainable_from == 16
    assert default.vision.tokenizer_workdir == str(root / "dualvitok")
    config_check.validate_tokenizer(converted_config.get_config(str(root / "dualvitok")))
    config_check.validate_decoder(converted_config.get_config(str(root / "decoder")))
