"""MoVQ pixel encoder/decoder (spec §1.5, §1.7) vs a compact PyTorch reference written from the
spec with the official state-dict key names, on tiny random configs (fp32); plus pixel
(un)shuffle / nearest resize against torch, the DC blocks alone, the converter's error
messages, and the released configs' parameter counts and key shapes (shape-only)."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from illume_jax import sharding  # noqa: E402
from illume_jax.convert import movq as conv_movq  # noqa: E402
from illume_jax.models import movq  # noqa: E402
from illume_jax.modules import conv, resample  # noqa: E402

G = 8  # GroupNorm groups in the tiny configs
ENC = movq.MoVQConfig(ch=16, ch_mult=(1, 1, 2), num_res_blocks=2, attn_levels=(2,), z_channels=8, num_groups=G)
DEC = movq.MoVQConfig(ch=16, ch_mult=(1, 1, 2), num_res_blocks=1, attn_levels=(2,), z_channels=8, zq_channels=8,
                      num_groups=G)


# ----------------------------------------------------------------------------- torch reference
class TSpatialNorm(nn.Module):
    def __init__(self, c, zq_ch, groups):
        super().__init__()
        self.norm_layer = nn.GroupNorm(groups, c, eps=1e-6, affine=True)
        self.conv_y = nn.Conv2d(zq_ch, c, 1)
        self.conv_b = nn.Conv2d(zq_ch, c, 1)

    def forward(self, f, zq):
        zq = F.interpolate(zq, size=f.shape[-2:], mode="nearest")
        return self.norm_layer(f) * self.conv_y(zq) + self.conv_b(zq)


def t_norm(c, zq_ch, groups):
    return TSpatialNorm(c, zq_ch, groups) if zq_ch else nn.GroupNorm(groups, c, eps=1e-6, affine=True)


def t_apply(norm, x, zq):
    return norm(x, zq) if isinstance(norm, TSpatialNorm) else norm(x)


class TRes(nn.Module):
    def __init__(self, cin, cout, zq_ch, groups):
        super().__init__()
        self.norm1, self.conv1 = t_norm(cin, zq_ch, groups), nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2, self.conv2 = t_norm(cout, zq_ch, groups), nn.Conv2d(cout, cout, 3, 1, 1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)
        self.cin, self.cout = cin, cout

    def forward(self, x, zq=None):
        h = self.conv1(F.silu(t_apply(self.norm1, x, zq)))
        h = self.conv2(F.silu(t_apply(self.norm2, h, zq)))
        return (self.nin_shortcut(x) if self.cin != self.cout else x) + h


class TAttn(nn.Module):
    def __init__(self, c, zq_ch, groups):
        super().__init__()
        self.norm = t_norm(c, zq_ch, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x, zq=None):
        h = t_apply(self.norm, x, zq)
        q, k, v = self.q(h), self.k(h), self.v(h)
        b, c, hh, ww = q.shape
        q = q.reshape(b, c, hh * ww).permute(0, 2, 1)
        w = torch.softmax(torch.bmm(q, k.reshape(b, c, hh * ww)) * c ** -0.5, dim=2)
        h = torch.bmm(v.reshape(b, c, hh * ww), w.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + self.proj_out(h)


class TDown(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c // 4, 3, 1, 1)

    def forward(self, x):
        y = F.pixel_unshuffle(x, 2)
        return F.pixel_unshuffle(self.conv(x), 2) + y.unflatten(1, (-1, 4)).mean(2)


class TUp(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, 4 * c, 3, 1, 1)

    def forward(self, x):
        return F.pixel_shuffle(self.conv(x), 2) + F.pixel_shuffle(x.repeat_interleave(4, dim=1), 2)


class TLevel(nn.Module):
    def __init__(self, cin, cout, n, attn, resample, zq_ch, groups):
        super().__init__()
        self.block = nn.ModuleList([TRes(cin if i == 0 else cout, cout, zq_ch, groups) for i in range(n)])
        self.attn = nn.ModuleList([TAttn(cout, zq_ch, groups) for _ in range(n)] if attn else [])
        if resample is not None:
            setattr(self, resample[0], resample[1](cout))

    def run(self, h, zq=None):
        for i, blk in enumerate(self.block):
            h = blk(h, zq)
            if len(self.attn):
                h = self.attn[i](h, zq)
        return h


class TMid(nn.Module):
    def __init__(self, c, zq_ch, groups):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = TRes(c, c, zq_ch, groups), TAttn(c, zq_ch, groups), \
            TRes(c, c, zq_ch, groups)

    def forward(self, h, zq=None):
        return self.block_2(self.attn_1(self.block_1(h, zq), zq), zq)


class TEncoder(nn.Module):
    def __init__(self, c: movq.MoVQConfig):
        super().__init__()
        n, top, g = len(c.ch_mult), c.ch * c.ch_mult[-1], c.num_groups
        self.z = c.z_channels
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, 1, 1)
        in_mult = (1,) + c.ch_mult
        self.down = nn.ModuleList([
            TLevel(c.ch * in_mult[l], c.ch * c.ch_mult[l], c.num_res_blocks, l in c.attn_levels,
                   ("downsample", TDown) if l != n - 1 else None, 0, g) for l in range(n)])
        self.mid = TMid(top, 0, g)
        self.norm_out = nn.GroupNorm(g, top, eps=1e-6, affine=True)
        self.conv_out = nn.Conv2d(top, c.z_channels, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level.run(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = F.silu(self.norm_out(self.mid(h)))
        return self.conv_out(h) + h.unflatten(1, (self.z, -1)).mean(2)


class TDecoder(nn.Module):
    def __init__(self, c: movq.MoVQConfig):
        super().__init__()
        n, top, g, zq = len(c.ch_mult), c.ch * c.ch_mult[-1], c.num_groups, c.zq_channels
        self.rep = top // c.z_channels
        self.conv_in = nn.Conv2d(c.z_channels, top, 3, 1, 1)
        self.mid = TMid(top, zq, g)
        self.up = nn.ModuleList()
        cin = top
        for l in reversed(range(n)):
            cout = c.ch * c.ch_mult[l]
            self.up.insert(0, TLevel(cin, cout, c.num_res_blocks + 1, l in c.attn_levels,
                                     ("upsample", TUp) if l != 0 else None, zq, g))
            cin = cout
        self.norm_out = TSpatialNorm(cin, zq, g)
        self.conv_out = nn.Conv2d(cin, c.out_channels, 3, 1, 1)

    def forward(self, z, zq):
        h = self.conv_in(z) + z.repeat_interleave(self.rep, dim=1)
        h = self.mid(h, zq)
        for level in reversed(self.up):
            h = level.run(h, zq)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h, zq)))


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Default conv init, plus random GroupNorm affine parameters (they start at 1 / 0)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.GroupNorm):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
    return model.eval()


# ----------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _mesh1():
    with sharding.use_mesh(sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])):
        yield


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _close(ours, ref, tol=1e-4):
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(ours, ref, atol=tol * scale, rtol=tol)


# ----------------------------------------------------------------------------- blocks
def _block_pair(ours_ctor, torch_module):
    """Our block built shape-only and filled from the (randomised) torch block."""
    with _mesh1():
        ours = nnx.eval_shape(ours_ctor)
    conv_movq.load_torch_state(ours, _randomize(torch_module).state_dict())
    return ours, torch_module


_jit_call = nnx.jit(lambda m, *args: m(*args))


def _pixel_unshuffle_conv(block, x):
    return resample.pixel_unshuffle(block.conv(jnp.asarray(x)), 2)


def test_dc_blocks_match_torch():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 8, 6, 16)).astype(np.float32)
    ours, ref = _block_pair(lambda: conv.DCDownBlock2d(16, rngs=nnx.Rngs(0)), TDown(16))
    _close(ours(jnp.asarray(x)), _nhwc(ref(_nchw(x))))
    # the shortcut alone is 2x2 average pooling per channel (spec §1.5)
    pooled = x.reshape(2, 4, 2, 3, 2, 16).mean((2, 4))
    _close(ours(jnp.asarray(x)) - _pixel_unshuffle_conv(ours, x), pooled)
    ours, ref = _block_pair(lambda: conv.DCUpBlock2d(16, rngs=nnx.Rngs(0)), TUp(16))
    _close(ours(jnp.asarray(x)), _nhwc(ref(_nchw(x))))


def test_spatial_norm_resblock_and_attn_match_torch():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 8, 8, 16)).astype(np.float32)
    zq = rng.standard_normal((2, 4, 4, 8)).astype(np.float32)
    ours, ref = _block_pair(lambda: conv.ResBlock(16, 32, zq_channels=8, num_groups=G, rngs=nnx.Rngs(0)),
                            TRes(16, 32, 8, G))
    _close(ours(jnp.asarray(x), jnp.asarray(zq)), _nhwc(ref(_nchw(x), _nchw(zq))))
    ours, ref = _block_pair(lambda: conv.AttnBlock(16, num_groups=G, rngs=nnx.Rngs(0)), TAttn(16, 0, G))
    _close(ours(jnp.asarray(x)), _nhwc(ref(_nchw(x))))


# ----------------------------------------------------------------------------- full models
def test_encoder_matches_torch():
    ref = _randomize(TEncoder(ENC), seed=1)
    sd = {"pixel_encoder." + k: v for k, v in ref.state_dict().items()}
    sd["pixel_decoder.conv_in.weight"] = torch.zeros(1)  # other branches are ignored
    ours = conv_movq.create_from_torch(movq.MoVQEncoder, ENC, sd, "pixel_encoder.")
    x = np.random.default_rng(4).uniform(-1, 1, (2, 16, 12, 3)).astype(np.float32)
    out = _jit_call(ours, jnp.asarray(x))
    assert out.shape == (2, 4, 3, 8)
    _close(out, _nhwc(ref(_nchw(x))))
    # the nested-dict route gives the same parameters
    nested = conv_movq.encoder_params_from_torch(sd, cfg=ENC)
    np.testing.assert_array_equal(nested["down"][2]["block"][0]["nin_shortcut"]["kernel"],
                                  np.asarray(ours.down[2].block[0].nin_shortcut.kernel[...]))


@pytest.mark.parametrize("remat", [False, True])
def test_decoder_matches_torch(remat):
    import dataclasses
    cfg = dataclasses.replace(DEC, remat=remat)
    ref = _randomize(TDecoder(cfg), seed=2)
    ours = conv_movq.create_from_torch(movq.MoVQDecoder, cfg,
                                       {"pixel_decoder." + k: v for k, v in ref.state_dict().items()},
                                       "pixel_decoder.")
    rng = np.random.default_rng(5)
    z = rng.standard_normal((2, 4, 3, 8)).astype(np.float32)
    zq = rng.standard_normal((2, 4, 3, 8)).astype(np.float32)
    out = _jit_call(ours, jnp.asarray(z), jnp.asarray(zq))
    assert out.shape == (2, 16, 12, 3)
    _close(out, _nhwc(ref(_nchw(z), _nchw(zq))))
    if remat:  # the rematerialised form differentiates
        g = nnx.jit(nnx.grad(lambda m: jnp.mean(m(jnp.asarray(z), jnp.asarray(zq)) ** 2)))(ours)
        leaves = jax.tree.leaves(g)
        assert leaves and all(np.isfinite(np.asarray(v)).all() for v in leaves)


def test_decoder_bf16_runs_close():
    import dataclasses
    ref = _randomize(TDecoder(DEC), seed=3)
    sd = ref.state_dict()
    ours = conv_movq.create_from_torch(movq.MoVQDecoder, dataclasses.replace(DEC, dtype="bfloat16"), sd)
    rng = np.random.default_rng(6)
    z, zq = (rng.standard_normal((1, 4, 4, 8)).astype(np.float32) for _ in range(2))
    out = _jit_call(ours, jnp.asarray(z), jnp.asarray(zq))
    assert out.dtype == jnp.bfloat16
    want = _nhwc(ref(_nchw(z), _nchw(zq)))
    err = np.abs(np.asarray(out, np.float32) - want).max() / np.abs(want).max()
    assert err < 0.1, err


# ----------------------------------------------------------------------------- converter errors
def test_converter_names_bad_tensors():
    ref = _randomize(TEncoder(ENC))
    good = dict(ref.state_dict())
    with pytest.raises(ValueError, match=r"missing tensors.*down\.1\.block\.0\.conv1\.weight"):
        conv_movq.encoder_params_from_torch({k: v for k, v in good.items() if k != "down.1.block.0.conv1.weight"},
                                            prefix="", cfg=ENC)
    with pytest.raises(ValueError, match=r"unexpected tensors.*down\.0\.attn\.0\.q\.weight"):
        conv_movq.encoder_params_from_torch({**good, "down.0.attn.0.q.weight": torch.zeros(16, 16, 1, 1)},
                                            prefix="", cfg=ENC)
    bad = {**good, "conv_out.weight": torch.zeros(8, 32, 1, 1)}
    with pytest.raises(ValueError, match=r"conv_out\.weight.*expected \(3, 3, 32, 8\).*\(8, 32, 3, 3\).*"
                                         r"found \(8, 32, 1, 1\)"):
        conv_movq.encoder_params_from_torch(bad, prefix="", cfg=ENC)


def test_params_to_torch_roundtrip():
    ref = _randomize(TDecoder(DEC))
    ours = conv_movq.create_from_torch(movq.MoVQDecoder, DEC, ref.state_dict())
    back = conv_movq.params_to_torch(ours)
    want = {k: v.numpy() for k, v in ref.state_dict().items()}
    assert set(back) == set(want)
    for k in want:
        np.testing.assert_array_equal(back[k], want[k], err_msg=k)


def test_create_random_init_is_torch_like():
    cfg = movq.MoVQConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_levels=(), z_channels=4, num_groups=4)
    enc = movq.create(movq.MoVQEncoder, cfg, seed=3)
    k = np.asarray(enc.down[1].block[0].conv1.kernel[...])  # fan_in 8*9: U(-1/sqrt(72), 1/sqrt(72))
    assert k.shape == (3, 3, 8, 16) and 0.8 / np.sqrt(72) < np.abs(k).max() <= 1 / np.sqrt(72)
    np.testing.assert_array_equal(np.asarray(enc.norm_out.scale[...]), np.ones(16))
    assert _jit_call(enc, jnp.zeros((1, 8, 8, 3))).shape == (1, 4, 4, 4)


# ----------------------------------------------------------------------------- released sizes
def _torch_shapes(cls, cfg) -> dict[str, tuple[int, ...]]:
    shapes = conv_movq.expected_shapes(movq.abstract(cls, cfg))
    out = {}
    for path, shape in shapes.items():
        key = conv_movq._torch_key(path)
        assert conv_movq.map_key(key)[0] == path, key  # the table inverts
        out[key] = (shape[3], shape[2], shape[0], shape[1]) if path[-1] == "kernel" else shape
    return out


def test_official_encoder_size_and_keys():
    shapes = _torch_shapes(movq.MoVQEncoder, movq.MoVQConfig.official_encoder())
    assert round(sum(int(np.prod(s)) for s in shapes.values()) / 1e6, 2) == 27.16
    want = {
        "conv_in.weight": (128, 3, 3, 3), "conv_in.bias": (128,),
        "down.0.block.1.norm1.weight": (128,), "down.0.block.0.conv1.weight": (128, 128, 3, 3),
        "down.2.block.0.nin_shortcut.weight": (256, 128, 1, 1), "down.4.block.0.nin_shortcut.weight": (512, 256, 1, 1),
        "down.0.downsample.conv.weight": (32, 128, 3, 3), "down.1.downsample.conv.weight": (32, 128, 3, 3),
        "down.2.downsample.conv.weight": (64, 256, 3, 3), "down.3.downsample.conv.weight": (64, 256, 3, 3),
        "down.4.attn.1.norm.weight": (512,), "down.4.attn.1.proj_out.weight": (512, 512, 1, 1),
        "mid.attn_1.q.weight": (512, 512, 1, 1), "mid.block_2.conv2.weight": (512, 512, 3, 3),
        "norm_out.weight": (512,), "conv_out.weight": (32, 512, 3, 3),
    }
    for k, s in want.items():
        assert shapes[k] == s, k
    assert not any(k.startswith("down.4.downsample") or k.startswith("down.3.attn") for k in shapes)


def test_official_decoder_size_and_keys():
    shapes = _torch_shapes(movq.MoVQDecoder, movq.MoVQConfig.official_decoder())
    assert round(sum(int(np.prod(s)) for s in shapes.values()) / 1e6, 2) == 476.36
    want = {
        "conv_in.weight": (1536, 64, 3, 3),
        "mid.block_1.norm1.norm_layer.weight": (1536,), "mid.block_1.norm1.conv_y.weight": (1536, 64, 1, 1),
        "mid.attn_1.norm.conv_b.bias": (1536,),
        "up.4.block.2.conv2.weight": (1536, 1536, 3, 3), "up.4.attn.2.v.weight": (1536, 1536, 1, 1),
        "up.3.block.0.nin_shortcut.weight": (768, 1536, 1, 1), "up.1.block.0.nin_shortcut.weight": (384, 768, 1, 1),
        "up.0.block.2.norm2.conv_b.weight": (384, 64, 1, 1),
        "up.4.upsample.conv.weight": (6144, 1536, 3, 3), "up.3.upsample.conv.weight": (3072, 768, 3, 3),
        "up.2.upsample.conv.weight": (3072, 768, 3, 3), "up.1.upsample.conv.weight": (1536, 384, 3, 3),
        "norm_out.norm_layer.bias": (384,), "norm_out.conv_y.weight": (384, 64, 1, 1),
        "conv_out.weight": (3, 384, 3, 3),
    }
    for k, s in want.items():
        assert shapes[k] == s, k
    assert not any(k.startswith("up.0.upsample") or k.startswith("up.3.attn") for k in shapes)


def test_decoder_sharded_over_fsdp_and_tensor_matches_torch():
    """Kernels' output channels split over 'tensor' ('conv_out'), input channels over 'fsdp'
    ('conv_in'), the batch over 'fsdp'; results unchanged."""
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices")
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, devices=jax.devices()[:4])
    ref = _randomize(TDecoder(DEC), seed=4)
    ours = conv_movq.create_from_torch(movq.MoVQDecoder, DEC, ref.state_dict(), mesh=mesh)
    assert ours.up[2].upsample.conv.kernel[...].sharding.spec == jax.sharding.PartitionSpec(None, None, "fsdp", "tensor")
    rng = np.random.default_rng(7)
    z, zq = (rng.standard_normal((2, 4, 4, 8)).astype(np.float32) for _ in range(2))
    batch = sharding.batch_sharding(mesh, 4)
    with sharding.use_mesh(mesh):
        out = _jit_call(ours, jax.device_put(z, batch), jax.device_put(zq, batch))
    _close(out, _nhwc(ref(_nchw(z), _nchw(zq))))
