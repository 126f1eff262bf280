"""AutoencoderKL (illume_jax.models.vae) vs diffusers' own AutoencoderKL on a tiny random config
(fp32): posterior mean/logvar (including the logvar clamp), decode, reconstruction, the
pipelines' latent scaling conventions (scaling_factor / shift_factor / latents_mean+std); the
converter's exact round trip, legacy attention names and error messages; `from_diffusers` on the
real SDXL VAE config with a shape-only model whose parameter count and key shapes match
diffusers' (built on the meta device)."""
from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from illume_jax.convert import vae as conv_vae  # noqa: E402
from illume_jax.models import vae  # noqa: E402

TINY = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32)

# the released SDXL VAE config.json (stabilityai/sdxl-vae)
SDXL_CONFIG = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.20.0.dev0", "_name_or_path": "../sdxl-vae/",
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "force_upcast": True, "in_channels": 3, "latent_channels": 4,
    "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 1024, "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SD_VAE_PARAMS = 83_653_863


def _tiny_diffusers(seed: int = 0):
    """A tiny diffusers VAE with every tensor perturbed (GroupNorms away from 1 / 0), and a
    logvar channel pushed past each clamp bound so the clamp is exercised."""
    torch.manual_seed(seed)
    m = diffusers.AutoencoderKL(**TINY).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.3)
            else:
                p.add_(torch.randn_like(p) * 0.05)
        lc = TINY["latent_channels"]
        m.quant_conv.bias[lc] += 60.0       # logvar channel 0 > 20 -> clamped to 20
        m.quant_conv.bias[lc + 1] -= 90.0   # logvar channel 1 < -30 -> clamped to -30
    return m


@pytest.fixture(scope="module")
def pair():
    ref = _tiny_diffusers()
    cfg = vae.VAEConfig.from_diffusers(dict(ref.config))
    ours = conv_vae.create_from_diffusers(cfg, ref.state_dict())
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    return ref, ours, x


def _nchw(x) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _maxerr(ours, ref) -> float:
    ours, ref = np.asarray(ours), np.asarray(ref)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max())


def _close(ours, ref, tol=1e-4, name=""):
    err = _maxerr(ours, ref)
    scale = max(1.0, float(np.abs(np.asarray(ref)).max()))
    print(f"{name}: max abs err {err:.2e} (ref max {scale:.2f})")
    assert err <= tol * scale, (name, err, scale)


_encode = nnx.jit(lambda m, x: m.encode(x))
_decode = nnx.jit(lambda m, z: m.decode(z))


# ----------------------------------------------------------------------------- parity
def test_encode_decode_match_diffusers(pair):
    ref, ours, x = pair
    with torch.no_grad():
        post = ref.encode(_nchw(x)).latent_dist
        mean_ref, logvar_ref = _nhwc(post.mean), _nhwc(post.logvar)
        rec_ref = _nhwc(ref(_nchw(x), sample_posterior=False).sample)
    mean, logvar = _encode(ours, jnp.asarray(x))
    assert mean.dtype == logvar.dtype == jnp.float32 and mean.shape == (2, 16, 16, 4)
    _close(mean, mean_ref, name="mean")
    _close(logvar, logvar_ref, name="logvar")
    lv = np.asarray(logvar)
    assert (lv[..., 0] == 20.0).all() and (lv[..., 1] == -30.0).all()  # the clamp engaged, as in diffusers

    z = np.random.default_rng(1).standard_normal((2, 16, 16, 4)).astype(np.float32)
    with torch.no_grad():
        dec_ref = _nhwc(ref.decode(_nchw(z)).sample)
    out = _decode(ours, jnp.asarray(z))
    assert out.shape == (2, 32, 32, 3)
    _close(out, dec_ref, name="decode")
    _close(nnx.jit(lambda m, x: m(x))(ours, jnp.asarray(x)), rec_ref, name="reconstruction (__call__, mode)")


def test_sampling_and_call(pair):
    """With an rng the posterior is sampled as mean + exp(logvar / 2) * normal(rng) (documented)."""
    _, ours, x = pair

    @nnx.jit
    def run(m, x, key):
        mean, logvar = m.encode(x)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, jnp.float32)
        return (m.latents_from_images(x, key), m.scale_latents(z), m.latents_from_images(x), m.scale_latents(mean),
                m(x, key), m.decode(z))

    lat_s, want_s, lat_m, want_m, rec, want_rec = run(ours, jnp.asarray(x), jax.random.key(3))
    np.testing.assert_allclose(np.asarray(lat_s), np.asarray(want_s), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(lat_m), np.asarray(want_m), rtol=1e-6)
    assert not np.allclose(np.asarray(lat_s), np.asarray(lat_m))
    np.testing.assert_allclose(np.asarray(rec), np.asarray(want_rec), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", [
    dict(scaling_factor=0.13025),                                                   # SD / SDXL
    dict(scaling_factor=0.3611, shift_factor=0.1159),                               # FLUX / SD3 style
    dict(scaling_factor=0.5, latents_mean=(0.1, -0.2, 0.3, 0.05), latents_std=(0.9, 1.1, 0.7, 1.3)),  # SDXL mean/std
], ids=["scale", "shift", "mean_std"])
def test_latent_scaling_matches_pipeline_convention(pair, variant):
    ref, base, x = pair
    cfg = vae.VAEConfig.from_diffusers({**dict(ref.config), **variant})
    ours = nnx.merge(nnx.graphdef(vae.abstract(cfg)), nnx.state(base))
    s, shift = variant["scaling_factor"], variant.get("shift_factor")
    with torch.no_grad():
        z = ref.encode(_nchw(x)).latent_dist.mode()
        # diffusers pipelines: SD img2img / SD3 / SDXL img2img `prepare_latents`
        if "latents_mean" in variant:
            m = torch.tensor(variant["latents_mean"]).view(1, 4, 1, 1)
            sd = torch.tensor(variant["latents_std"]).view(1, 4, 1, 1)
            lat_ref = (z - m) * s / sd
        else:
            lat_ref = (z - (shift or 0.0)) * s
        # ... and the decode step of their `__call__`
        if "latents_mean" in variant:
            img_ref = ref.decode(lat_ref * sd / s + m).sample
        else:
            img_ref = ref.decode(lat_ref / s + (shift or 0.0)).sample
    lat = ours.latents_from_images(jnp.asarray(x))
    _close(lat, _nhwc(lat_ref), name=f"latents {variant}")
    _close(ours.images_from_latents(jnp.asarray(_nhwc(lat_ref))), _nhwc(img_ref), name=f"images {variant}")
    np.testing.assert_allclose(np.asarray(ours.unscale_latents(ours.scale_latents(lat))), np.asarray(lat),
                               rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- converter
def test_round_trip_is_exact(pair):
    ref, ours, _ = pair
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    back = conv_vae.params_to_diffusers(ours)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].shape == v.shape and np.array_equal(back[k], v), k
    fresh = diffusers.AutoencoderKL(**TINY)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    # every parameter path maps to a key and back
    for p, _ in nnx.to_flat_state(nnx.state(ours, nnx.Param)):
        assert conv_vae.map_key(conv_vae.torch_key(tuple(p))[0])[0] == tuple(p)


def test_legacy_attention_names_and_prefix(pair):
    ref, ours, _ = pair
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = {}
    for k, v in ref.state_dict().items():
        for new, old in legacy.items():
            k = k.replace(f".{new}.", f".{old}.")
        sd["vae." + k] = v
    sd["unet.conv_in.weight"] = torch.zeros(1)  # outside the prefix: ignored
    params = conv_vae.params_from_diffusers(sd, ours.cfg, prefix="vae.")
    attn = params["decoder"]["mid_block"]["attentions"][0]
    np.testing.assert_array_equal(attn["q"]["kernel"][0, 0].T,
                                  ref.decoder.mid_block.attentions[0].to_q.weight.detach().numpy())
    np.testing.assert_array_equal(attn["proj_out"]["bias"],
                                  ref.decoder.mid_block.attentions[0].to_out[0].bias.detach().numpy())


def test_converter_errors(pair):
    ref, ours, _ = pair
    cfg = ours.cfg
    good = dict(ref.state_dict())

    sd = dict(good)
    del sd["decoder.mid_block.attentions.0.to_k.bias"]
    with pytest.raises(ValueError, match=r"missing tensors.*decoder\.mid_block\.attentions\.0\.to_k\.bias"):
        conv_vae.params_from_diffusers(sd, cfg)

    sd = dict(good, **{"encoder.extra_block.weight": torch.zeros(3, 3, 3, 3)})
    with pytest.raises(ValueError, match=r"unexpected tensors.*encoder\.extra_block\.weight"):
        conv_vae.params_from_diffusers(sd, cfg)

    sd = dict(good, **{"encoder.conv_in.weight": torch.zeros(16, 3, 5, 5)})
    with pytest.raises(ValueError, match=r"shape mismatches.*encoder\.conv_in\.weight.*expected \(16, 3, 3, 3\).*"
                                         r"found \(16, 3, 5, 5\)"):
        conv_vae.params_from_diffusers(sd, cfg)

    sd = dict(good, **{"decoder.mid_block.attentions.0.to_q.weight": torch.zeros(32, 16)})
    with pytest.raises(ValueError, match=r"to_q\.weight.*expected \(32, 32\).*found \(32, 16\)"):
        conv_vae.params_from_diffusers(sd, cfg)


def test_from_diffusers_rejects_unsupported():
    for bad, what in [({"act_fn": "gelu"}, "act_fn"),
                      ({"down_block_types": ["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"]},
                       "down_block_types"),
                      ({"up_block_types": ["UpDecoderBlock2D"] * 3}, "up_block_types"),
                      ({"norm_type": "spatial"}, "norm_type"),
                      ({"_class_name": "AutoencoderTiny"}, "AutoencoderTiny")]:
        with pytest.raises(ValueError, match=what):
            vae.VAEConfig.from_diffusers({**SDXL_CONFIG, **bad})
    with pytest.raises(ValueError, match="shift_factor and latents_mean"):
        vae.VAEConfig.from_diffusers({**SDXL_CONFIG, "shift_factor": 0.1, "latents_mean": [0.0] * 4,
                                      "latents_std": [1.0] * 4})


# ----------------------------------------------------------------------------- released config
def test_sdxl_config_shapes_match_diffusers():
    cfg = vae.VAEConfig.from_diffusers(SDXL_CONFIG)
    assert (cfg.block_out_channels, cfg.layers_per_block, cfg.latent_channels, cfg.scaling_factor,
            cfg.force_upcast, cfg.shift_factor, cfg.downsample) == ((128, 256, 512, 512), 2, 4, 0.13025, True, None, 8)
    model = vae.abstract(cfg)
    shapes = conv_vae.expected_shapes(model)
    assert sum(int(np.prod(s)) for s in shapes.values()) == SD_VAE_PARAMS
    kwargs = {k: v for k, v in SDXL_CONFIG.items() if not k.startswith("_")}
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(**kwargs)
    assert sum(p.numel() for p in ref.parameters()) == SD_VAE_PARAMS
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    ours = {}
    for p, s in shapes.items():
        key, layout = conv_vae.torch_key(p)
        ours[key] = conv_vae._torch_shape(s, layout)
    assert ours == ref_shapes
    # every parameter carries a logical sharding annotation
    for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        assert v.get_metadata().get("out_sharding") is not None, p


def test_bad_input_shapes(pair):
    _, ours, _ = pair
    with pytest.raises(ValueError, match="expected"):
        ours.encode(jnp.zeros((1, 32, 32, 4)))
    with pytest.raises(ValueError, match="expected"):
        ours.decode(jnp.zeros((1, 4, 4, 3)))


def test_remat_wraps_blocks(pair):
    """remat=True puts each Res/Attn block under jax.checkpoint (traced only: compiling a
    backward pass twice costs more than this whole file should)."""
    _, ours, x = pair
    remat = nnx.merge(nnx.graphdef(vae.abstract(dataclasses.replace(ours.cfg, remat=True))), nnx.state(ours))
    x = jnp.asarray(x[:1, :16, :16])

    def n_checkpoints(m):
        graphdef, state = nnx.split(m)
        jaxpr = jax.make_jaxpr(jax.grad(lambda s: jnp.mean(jnp.square(nnx.merge(graphdef, s)(x)))))(state)
        return len(re.findall(r"= (?:remat\w*|checkpoint)\[", str(jaxpr)))

    # encoder: 2 level resnets + mid (2 res, 1 attn); decoder: 2x2 level resnets + mid (3)
    assert n_checkpoints(ours) == 0 and n_checkpoints(remat) >= 2 + 3 + 4 + 3
