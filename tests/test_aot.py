"""Ahead-of-time compilation of the real train step for a TPU topology, on this CPU host."""
import pytest

pytest.importorskip("libtpu", reason="needs the `tpu` extra (libtpu), installed by launch/local.sh test")

from configs import tiny  # noqa: E402
from illume_jax import aot  # noqa: E402


@pytest.mark.parametrize("attention", ["xla", "splash"])
def test_tiny_config_compiles_for_v5p_2x2x1(attention):
    config = tiny.get_config("seq_len=256,batch=8")
    config.mesh.update(data=1, fsdp=-1, tensor=1)
    config.model.update(attention=attention, dtype="bfloat16")
    report = aot.compile_train_step(config, "v5p:2x2x1")
    assert report.num_devices == 4 and report.mesh == {"data": 1, "fsdp": 4, "tensor": 1}
    assert 0 < report.argument_gib < 0.01 and report.temp_gib > 0 and report.fits
    assert report.xla_flops > 0 and report.model_flops_per_step > 0
    assert "fits" in report.table()
    from illume_jax.models.llm import LLMConfig
    llm = LLMConfig.from_config(config.model)
    # The report's stage (`sft`) trains the layers and the final norm, not the (tied) embedding.
    assert report.stage == "sft" and config.stages[1].trainable == ("layers/.*", "final_norm/.*") and llm.tie_embeddings
    assert report.params == llm.num_params() and report.trained_params == llm.num_params() - llm.vocab_size * llm.d_model


def test_unknown_topology_is_a_clear_error():
    with pytest.raises(ValueError, match="--topology='v9z:1x1'"):
        aot.topology_devices("v9z:1x1")


def test_tiny_dualvitok_encode_compiles_for_v5p_2x2x1():
    from configs import dualvitok
    config = dualvitok.get_config("size=tiny,batch=8")
    config.mesh.update(data=1, fsdp=-1, tensor=1)
    report = aot.compile_tokenizer_encode(config, "v5p:2x2x1", resolution=64)
    assert report.num_devices == 4 and report.kind == "dualvitok"
    # 64x64: 8x8 semantic codes (ViT patch 4, merge 2) and 16x16 pixel codes (MoVQ /4).
    assert report.code_grids == {"semantic": (8, 8), "pixel": (16, 16)}
    assert report.peak_gib > 0 and report.xla_flops > 0 and "dualvitok encode" in report.table()


def test_decode_step_compiles_for_v5p_2x2x1_at_the_official_vocabulary():
    """The generation loop's body (windowed head, CFG, masks, sampling, one cached token) with
    ILLUME+'s 283,047-row vocabulary on a small LLM."""
    config = tiny.get_config()
    config.mesh.update(data=1, fsdp=-1, tensor=1)
    config.model.update(text_vocab_size=151665, vocab_size=283047, d_model=64, num_layers=2, dtype="bfloat16")
    report = aot.compile_decode_step(config, "v5p:2x2x1", batch=2, cache_len=128)
    assert report.num_devices == 4 and report.rows == 4 and report.cache_len == 128
    assert report.peak_gib > 0 and report.fits and report.xla_flops > 0
    assert "decode step" in report.table() and not (report.cell_embedding or report.neighbour_codes
                                                    or report.parent_codes or report.source_cells or report.source_copy)
    # With the (non-official) cell embedding, neighbour and parent codes the fed tokens carry their cell's
    # vectors, the codes drawn above it and the semantic code over it: the tables (2 x 2 levels x 256
    # cells, 3 x the official 32,768 + 98,304 codes, 32,768 codes, x 64 fp32, sharded by 'embed'), the
    # rows' code buffers and, with source cells, each row's projected source block are arguments of the step;
    # with the copy path (here the mixture, whose log-softmax over the window the step adds), each row's
    # source codes too.
    from configs import illume_tiny
    extras = illume_tiny.get_config("cell_embedding=1,neighbour_codes=1,parent_codes=1,source_cells=1,"
                                    "source_copy=1,copy_mixture=1,tokenizer=")  # (shapes: config)
    extras.mesh.update(data=1, fsdp=-1, tensor=1)
    extras.model.update(text_vocab_size=151665, vocab_size=283047, d_model=64, num_layers=2, dtype="bfloat16")
    with_extras = aot.compile_decode_step(extras, "v5p:2x2x1", batch=2, cache_len=128)
    assert with_extras.cell_embedding and "cell embedding" in with_extras.table()
    assert with_extras.neighbour_codes and "neighbour codes" in with_extras.table()
    assert with_extras.parent_codes and "parent codes" in with_extras.table()
    assert with_extras.source_cells and "source cells" in with_extras.table()
    assert with_extras.source_copy and "source copy" in with_extras.table()
    assert with_extras.argument_gib > report.argument_gib
    bad = tiny.get_config()
    with pytest.raises(ValueError, match="no room for the ILLUME\\+ image vocabulary"):
        aot.compile_decode_step(bad, "v5p:2x2x1", batch=2, cache_len=128)


def test_the_original_illume_compiles_its_multimodal_step_and_decode_for_v5p_2x2x1():
    """configs/illume_tiny.py:family=illume with a micro LLM: the whole multimodal train step (the semantic VQ's
    CLIP-style tower + adapter + LLM, and the frozen VQ filling the code slots, built from its config's shapes
    alone), and the decode step at ILLUME's one-level 16x16 layout."""
    from configs import illume_tiny
    config = illume_tiny.get_config("family=illume,batch=8")
    config.vision.tokenizer_workdir = ""   # shapes from vision.tokenizer_model, whatever runs/ holds
    config.mesh.update(data=1, fsdp=-1, tensor=1)
    config.model.update(d_model=64, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32, mlp_dim=128)
    report = aot.compile_train_step(config, "v5p:2x2x1")
    assert report.stage == "sft" and report.seq_len == 768 and report.fits and report.temp_gib > 0
    # Every parameter of the MLLM is counted, the tower's and adapter's with the LLM's; sft trains them all.
    from illume_jax.models.llm import LLMConfig
    assert report.params > LLMConfig.from_config(config.model).num_params() and report.trained_params == report.params
    assert f"parameters {report.params / 1e9:.3f} B" in report.table()
    decode = aot.compile_decode_step(config, "v5p:2x2x1", batch=2, cache_len=512)
    assert decode.layout == "ILLUME one level: 16x16 codes of 256" and decode.fits
    assert "ILLUME one level" in decode.table()
