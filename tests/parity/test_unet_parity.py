"""diffusers UNet2DConditionModel vs our `illume_jax.models.unet.UNet` on tiny random configs
(fp32): an SDXL-style layout (linear projections, text_time addition embedding, per-level
transformer depth and heads) and an SD-1.x-style one (1x1 conv projections, no addition
embedding), including odd input sizes and the rematerialised form; the converter's round trip
and error messages; `UNetConfig.from_diffusers` on the SDXL config (shape-only, counts against
diffusers built on the meta device) and its refusals."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from illume_jax import sharding  # noqa: E402
from illume_jax.convert import unet as conv_unet  # noqa: E402
from illume_jax.models import unet  # noqa: E402

SDXL_STYLE = dict(
    in_channels=12, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16,
    cross_attention_dim=32, norm_num_groups=8)
SD_STYLE = dict(
    in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=2, use_linear_projection=False, cross_attention_dim=32, norm_num_groups=8,
    flip_sin_to_cos=False, freq_shift=1)

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json, conv_in widened to 68 channels (ILLUME+).
SDXL_CONFIG = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0", "act_fn": "silu",
    "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280], "center_input_sample": False,
    "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 68, "layers_per_block": 2, "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
    "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816, "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 128,
    "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}
SDXL_PARAMS_4CH = 2_567_463_684  # diffusers' SDXL base UNet
SDXL_PARAMS_68CH = SDXL_PARAMS_4CH + 64 * 320 * 9


def _randomized(config: dict, seed: int) -> "diffusers.UNet2DConditionModel":
    """A tiny diffusers UNet with every parameter perturbed (some start at zero / one)."""
    torch.manual_seed(seed)
    model = diffusers.UNet2DConditionModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _close(ours, ref, tol=1e-4) -> float:
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = float(np.abs(ours - ref).max())
    assert err <= tol * max(1.0, float(np.abs(ref).max())), err
    return err


_jit_call = nnx.jit(lambda m, *args: m(*args))


@pytest.fixture(scope="module")
def sdxl_pair():
    ref = _randomized(SDXL_STYLE, seed=0)
    cfg = unet.UNetConfig.from_diffusers(dict(ref.config))
    return ref, cfg, conv_unet.create_from_diffusers(cfg, ref.state_dict())


@pytest.fixture(scope="module")
def sd_pair():
    ref = _randomized(SD_STYLE, seed=1)
    cfg = unet.UNetConfig.from_diffusers(dict(ref.config))
    return ref, cfg, conv_unet.create_from_diffusers(cfg, ref.state_dict())


# ----------------------------------------------------------------------------- parity
def test_sdxl_style_matches_diffusers(sdxl_pair):
    ref, cfg, ours = sdxl_pair
    assert cfg.heads == (2, 4) and cfg.use_linear_projection and cfg.addition_embed_type == "text_time"
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 16, 12)).astype(np.float32)
    ctx = rng.standard_normal((2, 5, 32)).astype(np.float32)
    pooled = rng.standard_normal((2, 16)).astype(np.float32)
    time_ids = np.array([[1024, 1024, 0, 0, 1024, 1024], [768, 512, 16, 32, 768, 512]], np.float32)
    t = np.array([999, 17], np.int64)
    with torch.no_grad():
        want = ref(_nchw(x), torch.from_numpy(t), torch.from_numpy(ctx),
                   added_cond_kwargs=dict(text_embeds=torch.from_numpy(pooled),
                                          time_ids=torch.from_numpy(time_ids))).sample.numpy().transpose(0, 2, 3, 1)
    out = _jit_call(ours, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx), jnp.asarray(pooled), jnp.asarray(time_ids))
    assert out.shape == (2, 16, 16, 4)
    err = _close(out, want)
    print(f"SDXL-style max abs error {err:.2e} (output max {np.abs(want).max():.2f})")
    with pytest.raises(ValueError, match="text_embeds"):
        ours(jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx))


@pytest.mark.parametrize("hw", [(16, 16), (15, 10)])
def test_sd_style_matches_diffusers(sd_pair, hw):
    """1x1-conv projections, sin|cos order with freq_shift 1, a scalar float timestep; (15, 10)
    is not divisible by the downsampling, so the up path resizes to the skip's size."""
    ref, cfg, ours = sd_pair
    assert not cfg.use_linear_projection and cfg.addition_embed_type is None
    assert isinstance(ours.down_blocks[0].attentions[0].proj_in, unet.Conv2d)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, *hw, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 7, 32)).astype(np.float32)
    with torch.no_grad():
        want = ref(_nchw(x), 321.5, torch.from_numpy(ctx)).sample.numpy().transpose(0, 2, 3, 1)
    out = _jit_call(ours, jnp.asarray(x), jnp.asarray(321.5, jnp.float32), jnp.asarray(ctx))
    err = _close(out, want)
    print(f"SD-style {hw} max abs error {err:.2e} (output max {np.abs(want).max():.2f})")


def test_remat_matches_and_differentiates():
    """remat=True (each resnet / transformer block under nnx.remat) on a one-level UNet: the loss
    matches diffusers and its gradient is finite and reaches the cross-attention."""
    config = {**SD_STYLE, "block_out_channels": (32,), "down_block_types": ("CrossAttnDownBlock2D",),
              "up_block_types": ("CrossAttnUpBlock2D",), "attention_head_dim": 4}
    ref = _randomized(config, seed=2)
    cfg = unet.UNetConfig.from_diffusers(dict(ref.config), remat=True)
    ours = conv_unet.create_from_diffusers(cfg, ref.state_dict())
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
    ctx = rng.standard_normal((1, 3, 32)).astype(np.float32)
    with torch.no_grad():
        want = ref(_nchw(x), 10, torch.from_numpy(ctx)).sample.numpy()
    loss = lambda m: jnp.mean(m(jnp.asarray(x), jnp.asarray([10]), jnp.asarray(ctx)) ** 2)  # noqa: E731
    value, grads = nnx.jit(nnx.value_and_grad(loss))(ours)
    np.testing.assert_allclose(float(value), float(np.mean(want ** 2)), rtol=1e-4)
    leaves = jax.tree.leaves(grads)
    assert leaves and all(np.isfinite(np.asarray(g)).all() for g in leaves)
    to_k = grads["down_blocks"][0]["attentions"][0]["transformer_blocks"][0]["attn2"]["to_k"]["kernel"]
    assert np.abs(np.asarray(to_k[...])).max() > 0


# ----------------------------------------------------------------------------- converter
def test_converter_roundtrip_and_nested_params(sdxl_pair):
    ref, cfg, ours = sdxl_pair
    want = {k: v.numpy() for k, v in ref.state_dict().items()}
    back = conv_unet.params_to_diffusers(ours)
    assert set(back) == set(want)
    for k in want:
        np.testing.assert_array_equal(back[k], want[k], err_msg=k)
    nested = conv_unet.params_from_diffusers(ref.state_dict(), cfg)
    geglu = nested["up_blocks"][0]["attentions"][1]["transformer_blocks"][1]["ff"]["net"][0]["proj"]["kernel"]
    assert geglu.shape == (64, 2, 256)  # (dim, [hidden, gate], inner)
    np.testing.assert_array_equal(
        geglu, np.asarray(ours.up_blocks[0].attentions[1].transformer_blocks[1].ff.net[0].proj.kernel[...]))


def test_converter_names_bad_tensors(sd_pair):
    ref, cfg, _ = sd_pair
    good = dict(ref.state_dict())
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    with pytest.raises(ValueError, match=r"missing tensors.*" + key.replace(".", r"\.")):
        conv_unet.params_from_diffusers({k: v for k, v in good.items() if k != key}, cfg)
    with pytest.raises(ValueError, match=r"unexpected tensors.*down_blocks\.1\.attentions\.0\.norm\.weight"):
        conv_unet.params_from_diffusers({**good, "down_blocks.1.attentions.0.norm.weight": torch.zeros(64)}, cfg)
    bad = {**good, "up_blocks.1.resnets.0.conv1.weight": torch.zeros(32, 96, 1, 1)}
    with pytest.raises(ValueError, match=r"up_blocks\.1\.resnets\.0\.conv1\.weight.*expected \(32, 96, 3, 3\).*"
                                         r"found \(32, 96, 1, 1\)"):
        conv_unet.params_from_diffusers(bad, cfg)
    # keys outside the prefix are ignored
    prefixed = {"unet." + k: v for k, v in good.items()}
    prefixed["vae.conv_in.weight"] = torch.zeros(1)
    assert "conv_in" in conv_unet.params_from_diffusers(prefixed, cfg, prefix="unet.")


# ----------------------------------------------------------------------------- configs
def test_from_diffusers_sdxl_shapes_and_count():
    """The ILLUME+ decoder layout (SDXL, 68 input channels), shape-only: parameter count, keys and
    torch shapes equal diffusers' (built on the meta device), and every parameter is annotated."""
    cfg = unet.UNetConfig.from_diffusers(SDXL_CONFIG)
    assert cfg.heads == (5, 10, 20) and cfg.transformer_layers_per_block == (1, 2, 10)
    model = unet.abstract(cfg)
    shapes = conv_unet.expected_shapes(model)
    assert sum(int(np.prod(s)) for s in shapes.values()) == SDXL_PARAMS_68CH
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**{k: v for k, v in SDXL_CONFIG.items() if not k.startswith("_")})
    assert sum(p.numel() for p in ref.parameters()) == SDXL_PARAMS_68CH
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    ours = {}
    for p, s in shapes.items():
        key = conv_unet._torch_key(p)
        assert conv_unet.map_key(key)[0] == p, key  # the table inverts
        ours[key] = conv_unet.torch_shape(p, s)
    assert ours == ref_shapes
    blk = model.down_blocks[2].attentions[1].transformer_blocks[9]
    assert blk.attn2.to_k.kernel.get_value().shape == (2048, 20, 64)  # 20 heads of 64 (diffusers' quirk)
    assert model.conv_in.kernel.get_value().shape == (3, 3, 68, 320)
    for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = v.get_metadata().get("out_sharding")
        assert names is not None and len(names) == len(v.get_value().shape), p


def test_sharding_annotations_on_a_mesh():
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices")
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, devices=jax.devices()[:4])
    model = unet.abstract(unet.UNetConfig(**SDXL_STYLE), mesh)
    blk = model.down_blocks[1].attentions[0].transformer_blocks[0]
    P = jax.sharding.PartitionSpec
    assert blk.attn1.to_q.kernel.get_value().sharding.spec == P("fsdp", "tensor", None)
    assert blk.attn1.to_out[0].kernel.get_value().sharding.spec == P("tensor", None, "fsdp")
    assert blk.ff.net[0].proj.kernel.get_value().sharding.spec == P("fsdp", None, "tensor")
    # conv kernels: output channels over 'tensor', input channels over 'fsdp' (storage, ZeRO-3)
    assert model.down_blocks[0].resnets[0].conv1.kernel.get_value().sharding.spec == P(None, None, "fsdp", "tensor")
    assert model.conv_out.kernel.get_value().sharding.spec == P(None, None, "fsdp", None)
    from illume_jax.models import vae
    rgb_in = vae.abstract(vae.VAEConfig(block_out_channels=(32, 64), norm_num_groups=8), mesh)
    assert rgb_in.encoder.conv_in.kernel.get_value().sharding.spec == P(None, None, None, "tensor")  # 3 % 2


def test_num_attention_heads_and_head_dim_quirk():
    """Heads come from num_attention_heads when given, else from attention_head_dim (diffusers'
    quirk); each head gets channels // heads. (diffusers itself refuses num_attention_heads.)"""
    quirk = unet.abstract(unet.UNetConfig(**SDXL_STYLE))
    explicit = unet.abstract(unet.UNetConfig(**{**SDXL_STYLE, "attention_head_dim": 99, "num_attention_heads": (2, 4)}))
    a = quirk.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.kernel.get_value().shape
    b = explicit.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.kernel.get_value().shape
    assert a == b == (64, 4, 16)


@pytest.mark.parametrize("key,value", [
    ("class_embed_type", "projection"), ("time_cond_proj_dim", 256), ("encoder_hid_dim", 1024),
    ("attention_type", "gated"), ("resnet_time_scale_shift", "scale_shift"),
    ("only_cross_attention", [False, True, True]),
    ("down_block_types", ["DownBlock2D", "AttnDownBlock2D", "CrossAttnDownBlock2D"]),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"), ("addition_embed_type", "text"),
])
def test_from_diffusers_refuses_unsupported(key, value):
    with pytest.raises(ValueError, match=key):
        unet.UNetConfig.from_diffusers({**SDXL_CONFIG, key: value})


def test_create_random_init_runs():
    """`create` (random init compiled under jit; kept minimal, XLA:CPU compiles each random draw
    slowly): torch-like uniform bounds, norms at one."""
    cfg = unet.UNetConfig(**{**SD_STYLE, "block_out_channels": (16,), "down_block_types": ("DownBlock2D",),
                             "up_block_types": ("UpBlock2D",), "mid_block_type": None})
    model = unet.create(cfg, seed=3)
    k = np.asarray(model.up_blocks[0].resnets[0].conv1.kernel[...])  # fan_in 32*9: U(-1/sqrt(288), ...)
    assert k.shape == (3, 3, 32, 16) and 0.8 / np.sqrt(288) < np.abs(k).max() <= 1 / np.sqrt(288)
    w = np.asarray(model.time_embedding.linear_1.kernel[...])
    assert w.shape == (16, 64) and 0.8 / 4 < np.abs(w).max() <= 1 / 4  # torch Linear init, fan_in 16
    np.testing.assert_array_equal(np.asarray(model.conv_norm_out.scale[...]), np.ones(16))
    assert model.mid_block is None and model.add_embedding is None
