"""ViT behaviour: patch order, 2-D RoPE, block-diagonal packing, scan/remat/unrolled, partial
training, bidirectional attention, sharding, configs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from illume_jax import sharding
from illume_jax.convert.hf_vit import flat_params
from illume_jax.models import vit
from illume_jax.modules.attention import attend
from illume_jax.modules.rope import apply_rope_2d, vision_rope_frequencies

CFG = vit.Qwen2ViTConfig(depth=3, embed_dim=32, num_heads=4, hidden_size=24, patch_size=4, remat="none")


@pytest.fixture(scope="module")
def model():
    return vit.create_qwen2_vit(CFG, seed=1)


def _images(rng, *shapes):
    return [rng.normal(size=(*s, 3)).astype(np.float32) for s in shapes]


def test_patch_order_by_hand():
    """Pixel value encodes (y, x, c); check the (c, t, kh, kw) vector and the window order."""
    p, m, H, W = 2, 2, 8, 12  # grid 4 x 6 patches
    y, x, c = np.meshgrid(np.arange(H), np.arange(W), np.arange(3), indexing="ij")
    img = (1000 * y + 10 * x + c).astype(np.float32)
    patches, positions, grid = vit.patchify_qwen2(jnp.asarray(img[None]), patch_size=p, temporal_patch_size=2,
                                                  merge=m)
    patches, positions = np.asarray(patches[0]), np.asarray(positions[0])
    assert grid == (4, 6) and patches.shape == (24, 3 * 2 * p * p) and positions.shape == (24, 2)
    # Window order: merged (row, col), then sub (row, col).
    expected_rc = [(R * m + r, C * m + cc) for R in range(2) for C in range(3) for r in range(m) for cc in range(m)]
    assert [tuple(rc) for rc in positions] == expected_rc
    for i, (r, cc) in enumerate(expected_rc):
        vec = patches[i].reshape(3, 2, p, p)
        for t in range(2):  # the frame repeated
            for ch in range(3):
                np.testing.assert_array_equal(vec[ch, t], img[r * p:(r + 1) * p, cc * p:(cc + 1) * p, ch])
    np.testing.assert_array_equal(vit.grid_positions(2, 3), [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]])
    with pytest.raises(ValueError, match="multiple of patch_size"):
        vit.patchify_qwen2(jnp.zeros((1, 10, 8, 3)), patch_size=2, merge=2)


def test_rope_2d_matches_transformers():
    torch = pytest.importorskip("torch")
    mod = pytest.importorskip("transformers.models.qwen2_vl.modeling_qwen2_vl")
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
    N, H = 3, 16
    hf_rope = mod.Qwen2VLVisionRotaryEmbedding(Qwen2VLVisionConfig(embed_dim=N * H, num_heads=N))
    np.testing.assert_allclose(hf_rope.inv_freq.numpy(), np.asarray(vision_rope_frequencies(H)), rtol=1e-6)
    pos = vit.grid_positions(4, 6, 2)
    rng = np.random.default_rng(0)
    q, k = (rng.normal(size=(len(pos), N, H)).astype(np.float32) for _ in range(2))
    cos, sin = hf_rope(torch.zeros(1), torch.as_tensor(pos))
    ref_q, ref_k = mod.apply_rotary_pos_emb_vision(torch.as_tensor(q), torch.as_tensor(k), cos, sin)
    pos_b = jnp.asarray(pos[None])
    np.testing.assert_allclose(np.asarray(apply_rope_2d(jnp.asarray(q[None]), pos_b))[0], ref_q.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(apply_rope_2d(jnp.asarray(k[None]), pos_b))[0], ref_k.numpy(), atol=1e-6)


def test_packed_images_equal_separate_forwards(model):
    imgs = _images(np.random.default_rng(1), (16, 24), (8, 16), (8, 8))
    items, singles = [], []
    for img in imgs:
        patches, positions, _ = vit.patchify_qwen2(jnp.asarray(img[None]), patch_size=4)
        items.append((np.asarray(patches[0]), np.asarray(positions[0])))
        singles.append(np.asarray(model(patches, positions)[0]))
    patches, positions, seg = vit.pack_patches(items, length=48)  # 24 + 8 + 4 tokens, 12 padding
    packed = np.asarray(model(jnp.asarray(patches), jnp.asarray(positions), jnp.asarray(seg))[0])
    assert packed.shape == (12, 24) and np.isfinite(packed).all()
    start = 0
    for single in singles:
        np.testing.assert_allclose(packed[start:start + len(single)], single, atol=1e-5, rtol=1e-5)
        start += len(single)
    # A batch of same-size images without segment ids equals the per-image runs.
    two = jnp.asarray(np.stack([imgs[2], imgs[2][::-1]]))
    batched = np.asarray(model.encode_images(two))
    np.testing.assert_allclose(batched[0], singles[2], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        vit.pack_patches(items, length=30)


def test_scan_remat_and_unrolled_agree():
    imgs = jnp.asarray(np.stack(_images(np.random.default_rng(2), (8, 16), (8, 16))))
    patches, positions, _ = vit.patchify_qwen2(imgs, patch_size=4)

    def run(cfg):  # same seed -> same parameters; only the execution strategy differs
        gdef, params = nnx.split(vit.create_qwen2_vit(cfg, seed=1), nnx.Param)

        @jax.jit
        def loss_and_grad(p):
            return jax.value_and_grad(lambda p: jnp.mean(jnp.square(nnx.merge(gdef, p)(patches, positions))))(p)
        return loss_and_grad(params)

    ref_loss, ref_grad = run(CFG)
    for kw in (dict(scan_layers=False), dict(remat="nothing_saveable")):
        loss, grad = run(vit.Qwen2ViTConfig(**{**CFG.__dict__, **kw}))
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad)):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_trainable_from_zeroes_lower_block_grads(model):
    imgs = jnp.asarray(np.stack(_images(np.random.default_rng(3), (8, 8))))
    patches, positions, _ = vit.patchify_qwen2(imgs, patch_size=4)
    gdef, params = nnx.split(model, nnx.Param)

    def grads(trainable_from):
        def loss(p):
            return jnp.sum(nnx.merge(gdef, p)(patches, positions, trainable_from=trainable_from) ** 2)
        return flat_params_from(jax.jit(jax.grad(loss))(params))

    def flat_params_from(state):
        return {"/".join(map(str, k)): v[...] for k, v in nnx.to_flat_state(state)}

    full, part = grads(0), grads(2)
    for name in full:
        if name.startswith("blocks/"):
            assert np.all(np.asarray(part[name][:2]) == 0), name
            np.testing.assert_allclose(part[name][2:], full[name][2:], atol=1e-6, rtol=1e-5)
        else:
            np.testing.assert_allclose(part[name], full[name], atol=1e-6, rtol=1e-5)
    # Forward values are unchanged, and running fewer blocks gives the pre-merger states of that depth.
    np.testing.assert_allclose(model(patches, positions, trainable_from=2), model(patches, positions), atol=1e-6)
    assert model(patches, positions, output="blocks", num_blocks=1).shape == (1, 4, 32)


def test_bidirectional_attention_masks():
    rng = np.random.default_rng(4)
    B, T, N, H = 2, 10, 4, 8
    q, k, v = (jnp.asarray(rng.normal(size=(B, T, N, H)).astype(np.float32)) for _ in range(3))
    seg = jnp.asarray([[1] * 6 + [2] * 3 + [0], [1] * 10], jnp.int32)

    def manual(q, k, v):
        logits = jnp.einsum("tnh,snh->nts", q, k) / np.sqrt(H)
        return jnp.einsum("nts,snh->tnh", jax.nn.softmax(logits, -1), v)

    out = attend(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=False)
    np.testing.assert_allclose(out[0, :6], manual(q[0, :6], k[0, :6], v[0, :6]), atol=1e-5)
    np.testing.assert_allclose(out[0, 6:9], manual(q[0, 6:9], k[0, 6:9], v[0, 6:9]), atol=1e-5)
    np.testing.assert_allclose(out[1], manual(q[1], k[1], v[1]), atol=1e-5)
    assert np.isfinite(np.asarray(out)).all()
    full = attend(q, k, v, causal=False)
    np.testing.assert_allclose(full[1], out[1], atol=1e-5)
    # The causal default is unchanged.
    causal = attend(q, k, v)
    mask = np.tril(np.ones((T, T), bool))
    logits = jnp.where(mask, jnp.einsum("tnh,snh->nts", q[0], k[0]) / np.sqrt(H), -jnp.inf)
    np.testing.assert_allclose(causal[0], jnp.einsum("nts,snh->tnh", jax.nn.softmax(logits, -1), v[0]), atol=1e-5)


def test_sharded_model_matches_single_device(model):
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = vit.create_qwen2_vit(CFG, mesh=mesh, seed=1)
    spec = flat_params(sharded)["blocks/attn/qkv/kernel"].sharding.spec
    assert tuple(spec)[:4] == (None, "fsdp", None, "tensor")  # layers, embed, (q,k,v), heads
    imgs = jnp.asarray(np.stack(_images(np.random.default_rng(5), *[(8, 16)] * 4)))
    patches, positions, _ = vit.patchify_qwen2(imgs, patch_size=4)
    with sharding.use_mesh(mesh):
        out = nnx.jit(lambda m, p, q: m(p, q))(sharded, patches, positions)
    np.testing.assert_allclose(np.asarray(out), np.asarray(model(patches, positions)), atol=1e-5, rtol=1e-5)


def test_config_checks_and_param_count(model):
    assert vit.Qwen2ViTConfig().num_params() == 675_759_104  # spec §1.2: 675.76M
    assert sum(np.asarray(v).size for v in flat_params(model).values()) == CFG.num_params()
    with pytest.raises(ValueError, match="act"):
        vit.Qwen2ViTConfig(act="relu6")
    with pytest.raises(ValueError, match="num_heads"):
        vit.Qwen2ViTConfig(embed_dim=36, num_heads=4)
    with pytest.raises(ValueError, match="unknown keys"):
        vit.Qwen2ViTConfig.from_config({"depth": 2, "width": 3})
    with pytest.raises(ValueError, match="image_size"):
        vit.ClipViTConfig(image_size=30, patch_size=14)
    with pytest.raises(ValueError, match="output"):
        model(jnp.zeros((1, 4, CFG.patch_dim)), jnp.zeros((1, 4, 2), jnp.int32), output="pooled")


def test_bidirectional_splash_interpret_matches_xla():
    pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")
    rng = np.random.default_rng(6)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 128, 2, 16)), jnp.float32) for _ in range(3))
    seg = jnp.asarray([[1] * 70 + [2] * 50 + [0] * 8], jnp.int32)
    ref = attend(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, causal=False)
    out = attend(q, k, v, q_segment_ids=seg, causal=False, implementation="splash", splash_interpret=True)
    np.testing.assert_allclose(out[:, :120], ref[:, :120], atol=1e-4)
