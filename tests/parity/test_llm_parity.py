"""Our LLM vs transformers' Qwen2ForCausalLM / LlamaForCausalLM on tiny random configs (fp32)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from illume_jax.convert import hf_llm  # noqa: E402
from illume_jax.models.llm import create_llm  # noqa: E402

COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              max_position_embeddings=64, rms_norm_eps=1e-6)


def _hf_model(family: str, tie: bool):
    torch.manual_seed(0)
    if family == "qwen2":
        cfg = transformers.Qwen2Config(num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6,
                                       tie_word_embeddings=tie, **COMMON)
        model = transformers.Qwen2ForCausalLM(cfg)
        # HF initialises biases to zero; randomise them so the bias path is really compared.
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    else:
        cfg = transformers.LlamaConfig(num_attention_heads=4, num_key_value_heads=4, rope_theta=1e4,
                                       tie_word_embeddings=tie, **COMMON)
        model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # RMSNorm weights start at 1; perturb so the scale is compared too.
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.mark.parametrize("family,tie", [("qwen2", True), ("qwen2", False), ("llama", False)])
def test_logits_match_transformers(family, tie):
    hf = _hf_model(family, tie)
    cfg = hf_llm.config_from_hf(hf.config, text_vocab_size=80, scan_layers=True, remat="none")
    assert cfg.tie_embeddings == tie and cfg.qkv_bias == (family == "qwen2")
    model = create_llm(cfg)
    hf_llm.load_params(model, hf_llm.hf_to_params(hf.state_dict(), cfg))

    tokens = np.random.default_rng(0).integers(0, 96, size=(2, 24))
    with torch.no_grad():
        ref = hf(torch.as_tensor(tokens)).logits.numpy()
    ours = np.asarray(model(jnp.asarray(tokens, jnp.int32)))
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=2e-5)


def test_round_trip_state_dict():
    hf = _hf_model("qwen2", False)
    cfg = hf_llm.config_from_hf(hf.config)
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    back = hf_llm.params_to_hf(hf_llm.hf_to_params(sd, cfg), cfg)
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])


def test_converter_rejects_mismatched_shapes():
    hf = _hf_model("qwen2", True)
    cfg = hf_llm.config_from_hf(hf.config, d_model=48)
    model = create_llm(hf_llm.config_from_hf(hf.config))
    with pytest.raises(ValueError, match="embed/embedding"):
        hf_llm.load_params(model, hf_llm.hf_to_params(hf.state_dict(), hf_llm.config_from_hf(hf.config)) |
                           {"embed/embedding": np.zeros((96, 48), np.float32)})
    del cfg
