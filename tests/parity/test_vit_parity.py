"""Our ViTs vs transformers' Qwen2-VL vision model and CLIPVisionModel (tiny random configs, fp32)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402

from illume_jax.convert import hf_vit  # noqa: E402
from illume_jax.models import vit  # noqa: E402


def _perturb(model, std=0.5):
    """HF inits LayerNorm to (1, 0) and some biases to 0; randomise every parameter a bit so
    the scale/bias paths are really compared."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * std)
    return model.eval()


def _qwen2_hf():
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
    torch.manual_seed(0)
    cfg = Qwen2VLVisionConfig(depth=2, embed_dim=32, num_heads=4, hidden_size=48, mlp_ratio=4, patch_size=14,
                              temporal_patch_size=2, spatial_merge_size=2, in_channels=3)
    return _perturb(Qwen2VisionTransformerPretrainedModel(cfg).float())


@pytest.fixture(scope="module")
def qwen2_pair():
    hf = _qwen2_hf()
    cfg = hf_vit.qwen2vit_config_from_hf(hf.config, remat="none")
    assert (cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.mlp_dim, cfg.hidden_size) == (2, 32, 4, 128, 48)
    ours = vit.create_qwen2_vit(cfg)
    hf_vit.load_params(ours, hf_vit.qwen2vit_from_torch(hf.state_dict(), cfg))
    return hf, cfg, ours


def _images():
    rng = np.random.default_rng(0)
    return [rng.normal(size=(56, 84, 3)).astype(np.float32), rng.normal(size=(28, 56, 3)).astype(np.float32)]


def test_patchify_matches_qwen2vl_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    proc = Qwen2VLImageProcessorPil()
    for img in _images():
        ref = proc(images=[img], do_resize=False, do_rescale=False, do_normalize=False, do_convert_rgb=False,
                   input_data_format="channels_last", return_tensors="np")
        patches, positions, grid = vit.patchify_qwen2(jnp.asarray(img[None]))
        assert tuple(ref["image_grid_thw"][0]) == (1, *grid)
        np.testing.assert_array_equal(np.asarray(patches[0]), ref["pixel_values"])
        # RoPE ids are what HF's vision model derives from grid_thw.
        from transformers.vision_utils import get_vision_position_ids
        want = get_vision_position_ids(torch.as_tensor(ref["image_grid_thw"]), 2).numpy()
        np.testing.assert_array_equal(np.asarray(positions[0]), want)


def test_qwen2_vit_packed_images_match_transformers(qwen2_pair):
    hf, cfg, ours = qwen2_pair
    items, grids = [], []
    for img in _images():
        patches, positions, grid = vit.patchify_qwen2(jnp.asarray(img[None]))
        items.append((np.asarray(patches[0]), np.asarray(positions[0])))
        grids.append((1, *grid))
    with torch.no_grad():
        out = hf(torch.as_tensor(np.concatenate([p for p, _ in items])), grid_thw=torch.as_tensor(grids))
    ref_merged, ref_hidden = out.pooler_output.numpy(), out.last_hidden_state.numpy()

    patches, positions, seg = vit.pack_patches(items, length=40)  # 24 + 8 tokens + 8 padding
    merged = np.asarray(ours(jnp.asarray(patches), jnp.asarray(positions), jnp.asarray(seg))[0])
    hidden = np.asarray(ours(jnp.asarray(patches), jnp.asarray(positions), jnp.asarray(seg), output="blocks")[0])
    n = len(ref_hidden)
    np.testing.assert_allclose(hidden[:n], ref_hidden, atol=1e-5, rtol=1e-5)
    # Per image: tokens 0..23 -> merged 0..5, tokens 24..31 -> merged 6..7.
    for lo, hi in ((0, 6), (6, 8)):
        np.testing.assert_allclose(merged[lo:hi], ref_merged[lo:hi], atol=1e-5, rtol=1e-5)

    # One image per row (no segment ids) gives the same features.
    for img, (lo, hi) in zip(_images(), ((0, 6), (6, 8))):
        single = np.asarray(ours.encode_images(jnp.asarray(img[None]))[0])
        np.testing.assert_allclose(single, ref_merged[lo:hi], atol=1e-5, rtol=1e-5)


def test_qwen2_converter_accepts_prefix_and_names_problems(qwen2_pair):
    hf, cfg, ours = qwen2_pair
    sd = {f"model.visual.{k}": v for k, v in hf.state_dict().items()}
    sd["model.language_model.embed_tokens.weight"] = torch.zeros(3, 3)  # outside the prefix: ignored
    params = hf_vit.qwen2vit_from_torch(sd, cfg, prefix="model.visual.")
    assert params["blocks/attn/qkv/kernel"].shape == (2, 32, 3, 4, 8)
    assert params["patch_embed/kernel"].shape == (1176, 32)

    broken = dict(hf.state_dict())
    del broken["blocks.1.mlp.fc2.bias"]
    broken["blocks.0.attn.extra"] = torch.zeros(1)
    broken["merger.mlp.2.weight"] = torch.zeros(40, 128)
    with pytest.raises(ValueError) as err:
        hf_vit.qwen2vit_from_torch(broken, cfg)
    msg = str(err.value)
    assert "blocks.1.mlp.fc2.bias" in msg and "blocks.0.attn.extra" in msg
    assert "merger.mlp.2.weight: expected (48, 128), found (40, 128)" in msg


def test_vision_block_stack_matches_transformers_blocks(qwen2_pair):
    """DualViTok's extra blocks: the same block class, batched, raster positions, no mask."""
    hf, cfg, _ = qwen2_pair
    from flax import nnx
    stack = vit.create_sharded(lambda: vit.VisionBlockStack(2, 32, 4, 128, remat="none", rngs=nnx.Rngs(0)))
    sd = {f"semantic_encoder.blocks.{k[len('blocks.'):]}": v for k, v in hf.state_dict().items()
          if k.startswith("blocks.")}
    hf_vit.load_params(stack, hf_vit.vision_blocks_from_torch(sd, "semantic_encoder.blocks.", 2, dim=32,
                                                                num_heads=4, mlp_dim=128))
    h, w = 3, 5
    x = np.random.default_rng(3).normal(size=(2, h * w, 32)).astype(np.float32)
    pos = vit.grid_positions(h, w)
    with torch.no_grad():
        cos, sin = hf.rotary_pos_emb(torch.zeros(1), torch.as_tensor(pos))
        refs = []
        for row in x:
            t = torch.as_tensor(row)
            for blk in hf.blocks:
                t = blk(t, cu_seqlens=torch.tensor([0, h * w], dtype=torch.int32), position_embeddings=(cos, sin))
            refs.append(t.numpy())
    ours = np.asarray(stack(jnp.asarray(x), jnp.asarray(np.broadcast_to(pos, (2, h * w, 2)))))
    np.testing.assert_allclose(ours, np.stack(refs), atol=1e-5, rtol=1e-5)


def test_clip_vit_matches_transformers():
    torch.manual_seed(0)
    hf_cfg = transformers.CLIPVisionConfig(image_size=56, patch_size=14, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=3, num_attention_heads=4, layer_norm_eps=1e-5)
    hf = _perturb(transformers.CLIPVisionModel(hf_cfg).float())
    cfg = hf_vit.clip_config_from_hf(hf.config, remat="none")
    ours = vit.create_clip_vit(cfg)
    hf_vit.load_params(ours, hf_vit.clip_vit_from_torch(hf.state_dict(), cfg))

    img = np.random.default_rng(1).normal(size=(2, 56, 56, 3)).astype(np.float32)
    with torch.no_grad():
        out = hf(pixel_values=torch.as_tensor(img.transpose(0, 3, 1, 2)), output_hidden_states=True)
    last, pooled = ours(jnp.asarray(img))
    np.testing.assert_allclose(np.asarray(last), out.last_hidden_state.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(pooled), out.pooler_output.numpy(), atol=1e-5, rtol=1e-5)
    penultimate, _ = ours(jnp.asarray(img), num_blocks=2)
    np.testing.assert_allclose(np.asarray(penultimate), out.hidden_states[-2].numpy(), atol=1e-5, rtol=1e-5)

    # CLIPModel-style checkpoints (openai/clip-vit-*) carry a 'vision_model.' prefix.
    sd = {f"vision_model.{k}": v for k, v in hf.state_dict().items()} | {"text_model.x": torch.zeros(1)}
    assert set(hf_vit.clip_vit_from_torch(sd, cfg)) == set(hf_vit.flat_params(ours))
    bad = {k: v for k, v in sd.items() if k.startswith("vision_model.")}
    bad["vision_model.embeddings.position_embedding.weight"] = torch.zeros(10, 32)
    with pytest.raises(ValueError, match=r"position_embedding.weight: expected \(17, 32\), found \(10, 32\)"):
        hf_vit.clip_vit_from_torch(bad, cfg)
