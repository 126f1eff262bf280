"""DualViTok (spec §1) vs a compact PyTorch reference written from the spec with the official
state-dict key names (§6.1), on a tiny random config in fp32: codes must be identical, decoded
images within 1e-4; plus the converter's round trip, error messages, lazy reading, the
decoder-less checkpoint form and the released key shapes (shape-only)."""
from __future__ import annotations

import collections.abc

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
nn = torch.nn
F = torch.nn.functional

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig  # noqa: E402
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel  # noqa: E402

from configs import dualvitok as dualvitok_config  # noqa: E402
from illume_jax import sharding  # noqa: E402
from illume_jax.convert import dualvitok as conv  # noqa: E402
from illume_jax.convert import hf_vit  # noqa: E402
from illume_jax.models import dualvitok, movq  # noqa: E402
from parity.test_movq_parity import TDecoder, TEncoder  # noqa: E402

VIT = Qwen2VLVisionConfig(depth=2, embed_dim=32, num_heads=4, hidden_size=48, mlp_ratio=4, patch_size=6,
                          temporal_patch_size=2, spatial_merge_size=2, in_channels=3)
SEM = dict(semantic_dim=24, semantic_blocks=2, semantic_heads=2, semantic_mlp_dim=48, semantic_decoder_blocks=1,
           z_channels=8, semantic_codes=64, pixel_codes=96, quantizer_chunk=32)  # 2 and 3 distance chunks
ENC = movq.MoVQConfig(ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, attn_levels=(2,), z_channels=8, num_groups=4)
DEC = movq.MoVQConfig(ch=16, ch_mult=(1, 1, 2), num_res_blocks=1, attn_levels=(2,), z_channels=16, zq_channels=16,
                      num_groups=4)
CLIP_MEAN = torch.tensor(dualvitok.CLIP_MEAN).view(1, 3, 1, 1)
CLIP_STD = torch.tensor(dualvitok.CLIP_STD).view(1, 3, 1, 1)
HW = (64, 64)  # semantic input 60x60 (factor 12: antialiased downscale) -> 5x5 codes; pixel 16x16 codes


# ----------------------------------------------------------------------------- torch reference
def _vit_blocks(n: int, dim: int, heads: int, mlp: int):
    """n Qwen2-VL vision blocks at width `dim` and their 2-D RoPE module (no persistent state)."""
    c = Qwen2VLVisionConfig(depth=n, embed_dim=dim, num_heads=heads, mlp_ratio=mlp // dim, hidden_size=dim)
    aux = Qwen2VisionTransformerPretrainedModel(c)
    return aux.blocks, aux.rotary_pos_emb


def _run_blocks(blocks, rope, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """x [B, h*w, C]: every image attends over all its tokens, raster (row, col) RoPE positions."""
    pos = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(-1, 2)
    cos_sin = rope(x, pos)
    cu = torch.tensor([0, h * w], dtype=torch.int32)
    out = []
    for t in x:
        for blk in blocks:
            t = blk(t, cu_seqlens=cu, position_embeddings=cos_sin)
        out.append(t)
    return torch.stack(out)


class TSemanticEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = Qwen2VisionTransformerPretrainedModel(VIT)
        self.proj_in = nn.Conv2d(VIT.hidden_size, SEM["semantic_dim"], 1)
        self.blocks, rope = _vit_blocks(SEM["semantic_blocks"], SEM["semantic_dim"], SEM["semantic_heads"],
                                        SEM["semantic_mlp_dim"])
        self.rope = [rope]  # a list: not a registered submodule
        self.proj_out = nn.Sequential(nn.Linear(SEM["semantic_dim"], SEM["z_channels"]))

    def forward(self, x):
        """x [B,3,H,W] in [-1,1] -> (z [B,z,h1,w1], target [B,h1*w1,hidden])."""
        B, _, H, W = x.shape
        p, m = VIT.patch_size, VIT.spatial_merge_size
        sh, sw = dualvitok.semantic_input_size(H, W, p * m)
        y = F.interpolate((x + 1) / 2, size=(sh, sw), mode="bicubic", align_corners=False, antialias=True)
        y = (y.clamp(0, 1) - CLIP_MEAN) / CLIP_STD
        # Qwen2-VL patchify: frame repeated over t; tokens ordered (merge row, merge col, sub row, sub col),
        # each patch vector (channel, t, row, col).
        gh, gw = sh // p, sw // p
        y = y[:, None].expand(B, VIT.temporal_patch_size, 3, sh, sw)
        y = y.reshape(B, VIT.temporal_patch_size, 3, gh // m, m, p, gw // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        grid = torch.tensor([[1, gh, gw]] * B)
        feats = self.model(y.reshape(B * gh * gw, -1), grid_thw=grid).pooler_output
        h1, w1 = gh // m, gw // m
        target = F.layer_norm(feats.reshape(B, h1 * w1, -1), (VIT.hidden_size,), eps=1e-6)
        h = self.proj_in(target.transpose(1, 2).reshape(B, -1, h1, w1)).flatten(2).transpose(1, 2)
        h = self.proj_out(_run_blocks(self.blocks, self.rope[0], h, h1, w1))
        return h.transpose(1, 2).reshape(B, -1, h1, w1), target


class TSemanticDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        d = SEM["semantic_dim"]
        self.proj_in = nn.Linear(SEM["z_channels"], d)
        self.blocks, rope = _vit_blocks(SEM["semantic_decoder_blocks"], d, SEM["semantic_heads"],
                                        SEM["semantic_mlp_dim"])
        self.rope = [rope]
        self.proj_out = nn.Sequential(nn.Linear(d, VIT.hidden_size), nn.LayerNorm(VIT.hidden_size))

    def forward(self, q):  # [B,z,h,w] -> [B,h*w,hidden]
        B, _, h, w = q.shape
        return self.proj_out(_run_blocks(self.blocks, self.rope[0], self.proj_in(q.flatten(2).transpose(1, 2)), h, w))


class TSimVQ(nn.Module):
    def __init__(self, n: int, d: int):
        super().__init__()
        self.code_transform = nn.Linear(d, d, bias=False)
        self.register_buffer("frozen_codebook", torch.randn(n, d))

    def forward(self, z):
        """z [B,d,h,w] -> (codes [B,h,w], fp32 Euclidean distances [B*h*w, n])."""
        B, d, h, w = z.shape
        dist = torch.cdist(z.permute(0, 2, 3, 1).reshape(-1, d), self.code_transform(self.frozen_codebook))
        return dist.argmin(-1).reshape(B, h, w), dist

    def lookup(self, codes):  # [B,h,w] -> [B,d,h,w]
        return self.code_transform(self.frozen_codebook[codes]).permute(0, 3, 1, 2)

    @torch.no_grad()
    def fit_to(self, z: torch.Tensor, seed: int) -> None:
        """Frozen codebook such that the effective codes are samples of z [B,d,h,w] plus noise:
        a Gaussian book far from the (offset, narrow) random-network features would give every
        token the same few codes."""
        g = torch.Generator().manual_seed(seed)
        z = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        n, d = self.frozen_codebook.shape
        codes = z[torch.randint(len(z), (n,), generator=g)] + 1.0 * z.std(0) * torch.randn(n, d, generator=g)
        self.frozen_codebook.copy_(torch.linalg.solve(self.code_transform.weight, codes.T).T)


class TDualViTok(nn.Module):
    def __init__(self):
        super().__init__()
        z = SEM["z_channels"]
        self.semantic_encoder = TSemanticEncoder()
        self.semantic_quantizer = TSimVQ(SEM["semantic_codes"], z)
        self.semantic_decoder = TSemanticDecoder()
        self.pixel_encoder = TEncoder(ENC)
        self.pixel_quant_conv = nn.Conv2d(ENC.z_channels, z, 1)
        self.pixel_quantizer = TSimVQ(SEM["pixel_codes"], z)
        self.pixel_post_quant_conv = nn.Conv2d(2 * z, 2 * z, 1)
        self.pixel_decoder = TDecoder(DEC)

    def encode(self, x):
        z_sem, target = self.semantic_encoder(x)
        sem, sem_dist = self.semantic_quantizer(z_sem)
        pix, pix_dist = self.pixel_quantizer(self.pixel_quant_conv(self.pixel_encoder(x)))
        return sem, pix, target, (sem_dist, pix_dist)

    def decode(self, sem, pix):
        sq, pq = self.semantic_quantizer.lookup(sem), self.pixel_quantizer.lookup(pix)
        quant = torch.cat([F.interpolate(sq, size=pq.shape[-2:], mode="bicubic", align_corners=False), pq], 1)
        return self.pixel_decoder(self.pixel_post_quant_conv(quant), quant)


def _randomize(model: nn.Module) -> nn.Module:
    """torch-default (fan-in) Linear/Conv3d weights and biases (HF's std-0.02 init would let the
    biases dominate, so every token would get the same code) and random norm affines."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
            elif isinstance(m, (nn.Linear, nn.Conv3d)):
                m.reset_parameters()
    return model.eval()


# ----------------------------------------------------------------------------- ours
def tiny_cfg() -> dualvitok.DualViTokConfig:
    return dualvitok.DualViTokConfig(vit=hf_vit.qwen2vit_config_from_hf(VIT, remat="none"), pixel_encoder=ENC,
                                     pixel_decoder=DEC, **SEM)


MESH = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


def load_flat(model: nnx.Module, flat) -> None:
    """Every variable (Params and Buffers) from `flat`, with its dtype and (logical) sharding;
    `model` may be shape-only (nnx.eval_shape)."""
    state = nnx.state(model)
    variables = {"/".join(str(p) for p in path): v for path, v in nnx.to_flat_state(state)}
    if set(variables) != set(flat):
        raise ValueError(f"names differ: missing {sorted(set(variables) - set(flat))}, "
                         f"unexpected {sorted(set(flat) - set(variables))}")
    for name, var in variables.items():
        old, new = var.get_value(), np.asarray(flat[name])
        assert new.shape == old.shape, (name, new.shape, old.shape)
        spec = getattr(old.sharding, "spec", None) or jax.sharding.PartitionSpec()
        var.set_value(jax.device_put(new.astype(old.dtype), jax.sharding.NamedSharding(MESH, spec)))
    nnx.update(model, state)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    ref = _randomize(TDualViTok().float())
    x = np.random.default_rng(0).uniform(-1, 1, (2, *HW, 3)).astype(np.float32)
    with torch.no_grad():
        ref.semantic_quantizer.fit_to(ref.semantic_encoder(_nchw(x))[0], 1)
        ref.pixel_quantizer.fit_to(ref.pixel_quant_conv(ref.pixel_encoder(_nchw(x))), 2)
    sd = ref.state_dict()
    cfg = tiny_cfg()
    flat = conv.from_official(sd, cfg)
    with sharding.use_mesh(MESH):  # shape-only: nothing is initialised, everything comes from `flat`
        ours = nnx.eval_shape(lambda: dualvitok.DualViTok(cfg, rngs=nnx.Rngs(1)))
    load_flat(ours, flat)
    return ref, sd, cfg, flat, ours, x


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _encode(m, x):
    (sem_q, sem, _), (_, pix, _), target = m.quantize(x)
    return sem, pix, target, m.semantic_decoder(sem_q)


# ----------------------------------------------------------------------------- parity
def test_codes_identical_and_decode_close(pair):
    ref, _, _, _, ours, x = pair
    with torch.no_grad():
        t_sem, t_pix, t_target, dists = ref.encode(_nchw(x))
        t_recon = ref.decode(t_sem, t_pix).numpy().transpose(0, 2, 3, 1)
        t_semdec = ref.semantic_decoder(ref.semantic_quantizer.lookup(t_sem)).numpy()
    for d in dists:  # codes are only comparable if no two codes are near-equidistant
        two = torch.topk(d, 2, largest=False).values
        assert float((two[:, 1] - two[:, 0]).min()) > 2e-5  # features agree to ~2e-6
    sem, pix, target, semdec = nnx.jit(_encode)(ours, jnp.asarray(x))
    assert sem.shape == (2, 5, 5) and pix.shape == (2, 16, 16)
    np.testing.assert_allclose(np.asarray(target), t_target.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(sem), t_sem.numpy())
    np.testing.assert_array_equal(np.asarray(pix), t_pix.numpy())
    assert len(np.unique(t_sem.numpy())) >= 16 and len(np.unique(t_pix.numpy())) >= 32  # many codes in use
    np.testing.assert_allclose(np.asarray(semdec), t_semdec, atol=1e-4, rtol=1e-4)
    recon = np.asarray(nnx.jit(lambda m, a, b: m.decode(a, b))(ours, sem, pix))
    assert recon.shape == (2, *HW, 3)
    np.testing.assert_allclose(recon, t_recon, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- converter
class _LazyReader(collections.abc.Mapping):
    """A state dict that counts value reads (stands in for a reader over a multi-GB file)."""

    def __init__(self, sd):
        self.sd, self.reads = sd, collections.Counter()

    def __getitem__(self, k):
        self.reads[k] += 1
        return self.sd[k]

    def __iter__(self):
        return iter(self.sd)

    def __len__(self):
        return len(self.sd)


def _same(a: dict, b: dict) -> None:
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    for k in a:
        x, y = np.asarray(a[k]), np.asarray(b[k])
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), k


def test_round_trip_is_bit_exact_and_reads_each_tensor_once(pair):
    _, sd, cfg, flat, ours, _ = pair
    want = {k: v.numpy() for k, v in sd.items()}
    back = conv.to_official(flat, cfg)
    _same(back, want)
    assert back["pixel_post_quant_conv.weight"].shape == (16, 16, 1, 1)
    assert back["semantic_encoder.model.patch_embed.proj.weight"].shape == (32, 3, 2, 6, 6)
    _same(conv.from_official(back, cfg), flat)
    # the frozen codebooks are Buffers, bit-exact
    np.testing.assert_array_equal(np.asarray(ours.pixel_quantizer.frozen_codebook[...]),
                                  want["pixel_quantizer.frozen_codebook"])
    # nested under 'ema', read lazily: each tensor exactly once
    reader = _LazyReader({**sd, "semantic_encoder.model.rotary_pos_emb.inv_freq": torch.zeros(3)})
    _same(conv.from_official({"ema": reader}, cfg), flat)
    assert set(reader.reads) == set(sd) and max(reader.reads.values()) == 1
    assert set(conv.expected_official_shapes(cfg)) == set(sd)


def test_errors_name_every_bad_tensor(pair):
    _, sd, cfg, _, _, _ = pair
    bad = {k: v for k, v in sd.items() if k != "pixel_decoder.conv_in.weight"}
    bad["semantic_encoder.blocks.99.norm1.weight"] = torch.zeros(24)
    bad["semantic_quantizer.frozen_codebook"] = torch.zeros(65, 8)
    with pytest.raises(ValueError) as err:
        conv.from_official(bad, cfg)
    msg = str(err.value)
    assert "missing tensors ['pixel_decoder.conv_in.weight (expected (32, 16, 3, 3))']" in msg
    assert "unexpected tensors ['semantic_encoder.blocks.99.norm1.weight (found (24,))']" in msg
    assert "semantic_quantizer.frozen_codebook: expected (64, 8), found (65, 8)" in msg


def test_checkpoint_without_semantic_decoder(pair):
    _, sd, cfg, flat, _, _ = pair
    inference = {k: v for k, v in sd.items() if not k.startswith("semantic_decoder.")}
    got = conv.from_official(inference, cfg, include_semantic_decoder=False)
    _same(got, {k: v for k, v in flat.items() if not k.startswith("semantic_decoder/")})
    _same(conv.from_official(sd, cfg, include_semantic_decoder=False), got)  # a full one is accepted too
    _same(conv.to_official(got, cfg), {k: v.numpy() for k, v in inference.items()})
    with pytest.raises(ValueError, match=r"semantic_decoder\.proj_in\.weight \(expected \(24, 8\)\)"):
        conv.from_official(inference, cfg)


def test_official_key_shapes_and_totals():
    cfg = dualvitok.DualViTokConfig.from_config(dualvitok_config.model_config("official"))
    shapes = conv.expected_official_shapes(cfg)
    want = {
        "semantic_encoder.model.patch_embed.proj.weight": (1280, 3, 2, 14, 14),
        "semantic_encoder.model.blocks.31.attn.qkv.weight": (3840, 1280),
        "semantic_encoder.model.merger.mlp.2.weight": (3584, 5120),
        "semantic_encoder.proj_in.weight": (1280, 3584, 1, 1),
        "semantic_encoder.blocks.3.mlp.fc1.weight": (5120, 1280),
        "semantic_encoder.proj_out.0.weight": (32, 1280),
        "semantic_quantizer.frozen_codebook": (32768, 32),
        "semantic_quantizer.code_transform.weight": (32, 32),
        "semantic_decoder.proj_in.weight": (1280, 32),
        "semantic_decoder.proj_out.1.weight": (3584,),
        "pixel_quant_conv.weight": (32, 32, 1, 1),
        "pixel_quantizer.frozen_codebook": (98304, 32),
        "pixel_post_quant_conv.weight": (64, 64, 1, 1),
        "pixel_decoder.conv_in.weight": (1536, 64, 3, 3),
        "pixel_decoder.up.4.upsample.conv.weight": (6144, 1536, 3, 3),
    }
    for k, s in want.items():
        assert shapes[k] == s, k
    assert "semantic_encoder.blocks.4.norm1.weight" not in shapes
    # Spec §6.1: 1.350e9 numbers. Its "1,002 tensors" = these 999 persistent tensors + the three
    # non-persistent RoPE `inv_freq` buffers (ViT, extra encoder blocks, semantic decoder), which no
    # state dict holds (20 numbers each, invisible in the total).
    assert len(shapes) == 999
    total = sum(int(np.prod(s)) for s in shapes.values())
    assert abs(total - 1.350e9) / 1.350e9 < 0.005, total
