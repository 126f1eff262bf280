"""The official MLLM checkpoint format (spec §6.2) through `convert.mllm` into our `MLLM`, against a
PyTorch reference of the official model on a tiny random checkpoint assembled here (fp32):
transformers' Qwen2ForCausalLM + Qwen2-VL vision transformer (semantic encoder), the MoVQ
encoder reference of test_movq_parity (pixel encoder) and the two GELU-MLP projectors, keyed as
the official file. Checks the spliced input embeddings and first-token logits of an
understanding prompt (spec §3.3), greedy generation of a whole image block under the official
layout constraint (spec §3.4, written here from the spec), the converter's round trip, tie
detection and its error messages."""
from __future__ import annotations

from typing import Mapping

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
nn, F = torch.nn, torch.nn.functional

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from illume_jax.convert import hf_llm, hf_vit  # noqa: E402
from illume_jax.convert import mllm as conv  # noqa: E402
from illume_jax.infer import interleaved as il  # noqa: E402
from illume_jax.models import dualvitok as dvt  # noqa: E402
from illume_jax.models import mllm, movq  # noqa: E402
from parity.test_movq_parity import TEncoder, _randomize  # noqa: E402

TEXT, SEM, PIX = 100, 64, 128                 # text ids; level-0 / level-1 codebook sizes
SOI, EOI, EOL, SOL0, EOL0, SOL1, EOL1 = range(TEXT, TEXT + 7)   # spec §3.2 order
L0 = TEXT + 7 + 32                            # 16 height + 16 width tags (64..1024), then codes
L1, END = L0 + SEM, L0 + SEM + PIX
VOCAB = END + 13                              # padded, as the official resized embedding
IMG = (64, 128)                               # semantic 56x112 -> 2x4 cells; pixel /8 -> 8x16
ENC = movq.MoVQConfig(ch=8, ch_mult=(1, 1, 2, 2), num_res_blocks=1, attn_levels=(3,), z_channels=8, num_groups=4)
EOS = 99


def _qwen2(tie: bool, seed: int):
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, rms_norm_eps=1e-6,
                                   max_position_embeddings=512, initializer_range=0.3, tie_word_embeddings=tie)
    return transformers.Qwen2ForCausalLM(cfg)


def _perturb(model):
    with torch.no_grad():  # norms start at 1 / 0 and HF zeroes biases: randomise them all
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def _official(tie: bool, seed: int):
    """(torch modules, official-format state dict, config.json dict)."""
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
    llm = _perturb(_qwen2(tie, seed))
    vit = _perturb(Qwen2VisionTransformerPretrainedModel(Qwen2VLVisionConfig(
        depth=2, embed_dim=32, num_heads=4, hidden_size=48, mlp_ratio=4, patch_size=14, temporal_patch_size=2,
        spatial_merge_size=2, in_channels=3)).float())
    enc = _randomize(TEncoder(ENC), seed=seed)
    proj = [_perturb(nn.Sequential(nn.Linear(d, 64), nn.GELU(), nn.Linear(64, 64))) for d in (48, ENC.z_channels)]
    sd = {k: v for k, v in llm.state_dict().items() if not (tie and k == "lm_head.weight")}  # save_pretrained
    for prefix, module in (("model.vision_tower.semantic_encoder.", vit), ("model.vision_tower.pixel_encoder.", enc),
                           ("model.mm_projector.projector_1.", proj[0]), ("model.mm_projector.projector_2.", proj[1])):
        sd |= {prefix + k: v for k, v in module.state_dict().items()}
    config = llm.config.to_dict() | {"model_type": "illume_qwen2", "special_tokens_ids": list(range(TEXT, TEXT + 7)),
                                     "mm_hidden_size": [48, ENC.z_channels]}
    return dict(llm=llm, vit=vit, enc=enc, proj=proj), sd, config


class _CountingReader(Mapping):
    """A lazy checkpoint reader stand-in: counts reads per key."""

    def __init__(self, sd):
        self.sd, self.reads = sd, {}

    def __getitem__(self, k):
        self.reads[k] = self.reads.get(k, 0) + 1
        return self.sd[k]

    def __iter__(self):
        return iter(self.sd)

    def __len__(self):
        return len(self.sd)


def _load(model, flat):
    """Replace each parameter's value, keeping its sharding and dtype; names must match exactly."""
    state = nnx.state(model, nnx.Param)
    items = list(nnx.to_flat_state(state))
    names = ["/".join(str(p) for p in path) for path, _ in items]
    assert set(names) == set(flat), (sorted(set(names) - set(flat)), sorted(set(flat) - set(names)))
    for (_, var), name in zip(items, names):
        old = var[...]
        assert tuple(flat[name].shape) == old.shape, name
        var[...] = jax.device_put(np.asarray(flat[name]).astype(old.dtype), old.sharding)
    nnx.update(model, state)


def _tok_cfg(vit):
    return dvt.DualViTokConfig(vit=hf_vit.qwen2vit_config_from_hf(vit.config, remat="none"), pixel_encoder=ENC,
                               semantic_codes=SEM, pixel_codes=PIX)


@pytest.fixture(scope="module")
def pair():
    torch_side, sd, config = _official(tie=False, seed=0)
    llm_cfg = conv.llm_config_from_official(config, tie_embeddings=conv.detect_tied(sd, config), remat="none")
    assert (llm_cfg.text_vocab_size, llm_cfg.vocab_size, llm_cfg.tie_embeddings) == (TEXT, VOCAB, False)
    cfg = mllm.MLLMConfig.create(llm_cfg, _tok_cfg(torch_side["vit"]))
    reader = _CountingReader(sd)
    flat = conv.from_official(reader, cfg)
    assert set(reader.reads) == set(sd) and max(reader.reads.values()) == 1  # each tensor read once
    model = mllm.create_mllm(cfg)
    _load(model, flat)
    return torch_side, sd, config, cfg, model, flat


def _torch_splice(t, image, before, after, grids):
    """Spec §3.3: SOI, SOL0, semantic rows + EOL, EOL0, SOL1, pixel rows + EOL, EOL1, EOI."""
    (h1, w1), (h2, w2) = grids
    x = torch.as_tensor(image).permute(0, 3, 1, 2)                    # [-1, 1], NCHW
    s = F.interpolate((x + 1) / 2, size=(28 * h1, 28 * w1), mode="bicubic", align_corners=False, antialias=True)
    s = (s.clamp(0, 1) - torch.tensor(dvt.CLIP_MEAN)[:, None, None]) / torch.tensor(dvt.CLIP_STD)[:, None, None]
    gh, gw = 2 * h1, 2 * w1                                            # 14-px patches, 2x2 merge windows
    p = s[0].unsqueeze(0).repeat(2, 1, 1, 1).reshape(1, 2, 3, gh // 2, 2, 14, gw // 2, 2, 14)
    patches = p.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(gh * gw, 3 * 2 * 14 * 14)
    sem = t["proj"][0](t["vit"](patches, grid_thw=torch.tensor([[1, gh, gw]])).pooler_output)
    pix = t["proj"][1](t["enc"](x)[0].flatten(1).T)
    emb = lambda ids: t["llm"].model.embed_tokens(torch.as_tensor(ids))  # noqa: E731
    parts = [emb(before), emb([SOI, SOL0])]
    for feats, h, w, close in ((sem, h1, w1, [EOL0, SOL1]), (pix, h2, w2, [EOL1, EOI])):
        for r in range(h):
            parts += [feats[r * w:(r + 1) * w], emb([EOL])]
        parts.append(emb(close))
    return torch.cat(parts + [emb(after)])


def test_understanding_embeddings_and_first_logits_match(pair):
    t, _, _, cfg, model, _ = pair
    grids = cfg.grids(*IMG)
    assert grids == ((2, 4), (8, 16))
    rng = np.random.default_rng(0)
    before, after = rng.integers(0, TEXT, 7), rng.integers(0, TEXT, 5)
    image = rng.uniform(-1, 1, (1, *IMG, 3)).astype(np.float32)
    block = mllm.block_template(grids, cfg.vocab, continuous=True)
    tokens = np.concatenate([before, block.ids.clip(0), after])[None].astype(np.int32)
    slots = np.concatenate([0 * before, block.slots, 0 * after])[None].astype(np.int32)
    cells = np.concatenate([0 * before, block.cells, 0 * after])[None].astype(np.int32)
    run = nnx.jit(lambda m, *a: (m.embed(*a), m(a[0], slots=a[1], cells=a[2], images=a[3])[:, -1]))
    embeds, logits = run(model, jnp.asarray(tokens), jnp.asarray(slots), jnp.asarray(cells), jnp.asarray(image[None]))
    with torch.no_grad():
        ref = _torch_splice(t, image, before, after, grids)
        ref_logits = t["llm"](inputs_embeds=ref[None]).logits[0, -1].numpy()
    assert ref.shape[0] == tokens.shape[1] == 12 + 6 + 2 * 5 + 8 * 17
    err_e, err_l = np.abs(np.asarray(embeds[0]) - ref.numpy()).max(), np.abs(np.asarray(logits[0]) - ref_logits).max()
    print(f"max |embeds diff| {err_e:.2e}, max |last logits diff| {err_l:.2e}")
    assert err_e < 1e-5 and err_l < 1e-4


def _official_layout(h1, w1, h2, w2):
    """Per generated position after <start_of_image>: a forced id or an allowed [lo, hi) (spec §3.4/§4.1)."""
    steps = [SOL0]
    for h, w, lo, hi, close in ((h1, w1, L0, L1, [EOL0, SOL1]), (h2, w2, L1, END, [EOL1, EOI])):
        steps += ([(lo, hi)] * w + [EOL]) * h + close
    return steps


def test_greedy_image_block_matches_torch(pair):
    t, _, _, cfg, model, _ = pair
    (h1, w1), (h2, w2) = cfg.grids(*IMG)
    # ... <height_64><width_128><start_of_image>: tag ids first + 6 + h/64 and first + 22 + w/64 (spec §3.2)
    prompt = [*np.random.default_rng(1).integers(0, TEXT, 9), TEXT + 6 + IMG[0] // 64, TEXT + 22 + IMG[1] // 64, SOI]
    assert prompt[-3:-1] == [cfg.vocab.height_tag(IMG[0]), cfg.vocab.width_tag(IMG[1])]
    layout = _official_layout(h1, w1, h2, w2)
    want = []
    with torch.no_grad():  # full recompute per step (a cache-free greedy loop)
        for step in layout:
            logits = t["llm"](input_ids=torch.tensor([prompt + want])).logits[0, -1]
            want.append(step if isinstance(step, int) else step[0] + int(torch.argmax(logits[step[0]:step[1]])))
    P = len(prompt)
    prompts = il.Prompts(tokens=jnp.asarray([prompt], jnp.int32), mask=jnp.ones((1, P), jnp.int32),
                         slots=jnp.zeros((1, P), jnp.int32), cells=jnp.zeros((1, P), jnp.int32))
    state = il.RowState.start(np.array([[h1, w1, h2, w2]]), True, True, phase=il.EXPECT_SOL0)
    tokens, final = il.generate(model, prompts, state, jax.random.key(0), vocab=cfg.vocab,
                                sampling=il.Sampling(temperature=(0.0, 0.0, 0.0)), max_new_tokens=len(layout),
                                eos_id=EOS, pad_id=0)
    got = np.asarray(tokens[0]).tolist()
    assert got == want, next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
    assert int(final.phase[0]) == il.DONE
    sem, pix = mllm.parse_block([SOI] + got, cfg.grids(*IMG), cfg.vocab)
    assert len(np.unique(sem)) > 2 and len(np.unique(pix)) > 8  # a non-degenerate block


def _assert_same(a: Mapping, b: Mapping):
    assert set(a) == set(b), (sorted(set(a) - set(b)), sorted(set(b) - set(a)))
    for k in a:
        x, y = np.asarray(a[k].numpy() if hasattr(a[k], "numpy") else a[k]), np.asarray(b[k])
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), k


def test_round_trip(pair):
    _, sd, config, cfg, model, flat = pair
    back = conv.to_official(flat, cfg)
    _assert_same(sd, back)
    _assert_same(conv.from_official(back, cfg), flat)
    _assert_same(sd, conv.to_official({k: np.asarray(v) for k, v in hf_llm.flat_params(model).items()}, cfg))
    half = conv.from_official({k: v.to(torch.bfloat16) for k, v in sd.items()}, cfg)  # bf16 in -> fp32 numpy
    assert {v.dtype for v in half.values()} == {np.dtype(np.float32)}
    np.testing.assert_array_equal(half["projector/pixel/fc1/kernel"],
                                  sd["model.mm_projector.projector_2.0.weight"].bfloat16().float().numpy().T)
    exported = conv.official_config_dict(cfg)
    assert conv.llm_config_from_official(exported, remat="none") == cfg.llm
    assert exported["special_tokens_ids"] == config["special_tokens_ids"] and exported["mm_hidden_size"] == [48, 8]
    assert exported["model_type"] == "illume_qwen2" and exported["tie_word_embeddings"] is False


def test_tie_detection_and_error_messages(pair):
    _, sd, config, cfg, _, _ = pair
    _, sd_t, config_t = _official(tie=True, seed=1)
    assert conv.detect_tied(sd_t, config_t) is True and conv.detect_tied(sd, config) is False
    with pytest.raises(ValueError, match=r"tie_word_embeddings=False but the checkpoint has no lm_head\.weight"):
        conv.detect_tied(sd_t, {**config_t, "tie_word_embeddings": False})
    with pytest.raises(ValueError, match=r"tie_word_embeddings=True but the checkpoint has an lm_head\.weight"):
        conv.detect_tied(sd, {**config, "tie_word_embeddings": True})
    cfg_t = mllm.MLLMConfig.create(conv.llm_config_from_official(config_t, remat="none"), cfg.tokenizer)
    assert cfg_t.llm.tie_embeddings
    flat_t = conv.from_official(sd_t, cfg_t)
    assert "llm/lm_head/kernel" not in flat_t
    _assert_same(sd_t, conv.to_official(flat_t, cfg_t))
    with pytest.raises(ValueError, match=r"lm_head\.weight is missing but cfg\.llm\.tie_embeddings=False"):
        conv.from_official(sd_t, cfg)
    with pytest.raises(ValueError, match=r"lm_head\.weight is present but cfg\.llm\.tie_embeddings=True"):
        conv.from_official(sd, cfg_t)

    broken = dict(sd)
    del broken["model.vision_tower.semantic_encoder.blocks.1.mlp.fc2.bias"]
    broken["model.mm_projector.projector_2.0.weight"] = torch.zeros(64, 40)
    broken["model.vision_tower.extra.weight"] = torch.zeros(1)
    broken["model.embed_tokens.weight"] = torch.zeros(VOCAB - 3, 64)
    with pytest.raises(ValueError) as err:
        conv.from_official(broken, cfg)
    msg = str(err.value)
    for part in ("model.vision_tower.semantic_encoder.blocks.1.mlp.fc2.bias", "model.vision_tower.extra.weight",
                 "model.mm_projector.projector_2.0.weight: expected (64, 8), found (64, 40)",
                 f"model.embed_tokens.weight has {VOCAB - 3} rows but config vocab_size is {VOCAB}"):
        assert part in msg, (part, msg)
