"""infer/diffusion.py vs diffusers' schedulers (PyTorch) on the same inputs: schedules, whole sampling
loops with a fake denoiser, one-step DDIM with noise, training helpers, config files; plus CFG
batching, guidance rescale, tracing once, and the config errors."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from illume_jax.infer import diffusion as D

# diffusers' numpy-2 `__array__` deprecation noise
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SHAPE = (2, 3, 3, 4)
SDXL = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)

# (our config kwargs, number of steps): every sampler, spacing, prediction type and final-step rule.
CASES = {
    "euler_eps_sdxl_leading": (dict(sampler="euler", timestep_spacing="leading", steps_offset=1, **SDXL), 12),
    "euler_v_linspace": (dict(sampler="euler", prediction_type="v_prediction"), 10),
    "euler_karras_trailing_sigma_min": (dict(sampler="euler", use_karras_sigmas=True, timestep_spacing="trailing",
                                             final_sigmas_type="sigma_min", **SDXL), 10),
    "ddim_trailing_v_zero_snr": (dict(sampler="ddim", timestep_spacing="trailing", prediction_type="v_prediction",
                                      rescale_betas_zero_snr=True, clip_sample=False, set_alpha_to_one=False,
                                      **SDXL), 15),
    "ddim_leading_eps_clip": (dict(sampler="ddim", steps_offset=1, clip_sample=True, clip_sample_range=0.8), 10),
    "dpm_eps_linspace": (dict(sampler="dpm++2m", **SDXL), 10),
    "dpm_karras_v_16_sigma_min": (dict(sampler="dpm++2m", use_karras_sigmas=True, prediction_type="v_prediction",
                                       final_sigmas_type="sigma_min", **SDXL), 16),
    "dpm_cosine_trailing_euler_final": (dict(sampler="dpm++2m", beta_schedule="squaredcos_cap_v2",
                                             timestep_spacing="trailing", euler_at_final=True,
                                             final_sigmas_type="sigma_min"), 12),
    "dpm_leading_sample": (dict(sampler="dpm++2m", timestep_spacing="leading", steps_offset=1,
                                prediction_type="sample", lower_order_final=False), 8),
}


def _diffusers_scheduler(cfg: D.SchedulerConfig):
    diffusers = pytest.importorskip("diffusers")
    d = cfg.to_diffusers()
    return getattr(diffusers, d.pop("_class_name"))(**d)


def _fake_denoiser(x, t, c):
    """Identical in torch and JAX: 0.1 x + c t / 1000 (c broadcasts over the latent)."""
    return 0.1 * x + c * (t / 1000)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    cond = rng.uniform(-1, 1, (SHAPE[0], 1, 1, SHAPE[3])).astype(np.float32)
    uncond = rng.uniform(-1, 1, (SHAPE[0], 1, 1, SHAPE[3])).astype(np.float32)
    return noise, cond, uncond


def _torch_sample(sched, n, noise, cond, uncond=None, gs=1.0, gr=0.0):
    """diffusers' pipeline loop (as StableDiffusionXLPipeline: scale_model_input, CFG, rescale, step)."""
    import torch
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg
    sched.set_timesteps(n)
    x = torch.from_numpy(noise) * sched.init_noise_sigma
    c, cfg = torch.from_numpy(cond), gs != 1.0
    if cfg:
        c = torch.cat([torch.from_numpy(uncond), c])
    for t in sched.timesteps:
        x_in = sched.scale_model_input(torch.cat([x, x]) if cfg else x, t)
        out = _fake_denoiser(x_in, t, c)
        if cfg:
            out_u, out_c = out.chunk(2)
            out = out_u + gs * (out_c - out_u)
            if gr > 0:
                out = rescale_noise_cfg(out, out_c, guidance_rescale=gr)
        x = sched.step(out, t, x).prev_sample
    return x.numpy()


def _rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def _check_alphas(ours, want, rescaled: bool):
    """float32 values equal up to torch's CPU sqrt, which is not correctly rounded (numpy's is) and
    whose SIMD path depends on the host CPU: <= 4 ulp. The zero-terminal-SNR rescale takes square
    roots, shifts, scales and squares them again, and subtracts nearly equal values near the end,
    which amplifies that rounding: there the bound is relative, 1e-5 (8 ulp at alpha_bar ~ 0.5 and
    44 ulp at ~ 1e-5 seen on one host; the same code gave <= 4 ulp on another)."""
    if rescaled:
        np.testing.assert_allclose(ours, want, rtol=1e-5, atol=0)
    else:
        np.testing.assert_array_max_ulp(ours, want, 4)


@pytest.mark.parametrize("name", sorted(CASES))
def test_schedule_and_loop_match_diffusers(name):
    kwargs, n = CASES[name]
    cfg = D.SchedulerConfig(**kwargs)
    ref = _diffusers_scheduler(cfg)
    ref.set_timesteps(n)
    sched = D.make_schedule(cfg, n)
    want_t = ref.timesteps.numpy()
    assert sched.timesteps.dtype == want_t.dtype
    if want_t.dtype == np.int64:
        np.testing.assert_array_equal(sched.timesteps, want_t)
    else:
        np.testing.assert_allclose(sched.timesteps, want_t, rtol=1e-6, atol=1e-5)
    _check_alphas(D.alphas_cumprod(cfg), ref.alphas_cumprod.numpy(), cfg.rescale_betas_zero_snr)
    if cfg.sampler == "ddim":
        _check_alphas(sched.alpha_prod, ref.alphas_cumprod.numpy()[want_t], cfg.rescale_betas_zero_snr)
    else:
        assert sched.sigmas.dtype == np.float32
        np.testing.assert_array_max_ulp(sched.sigmas, ref.sigmas.numpy(), 2)
    np.testing.assert_allclose(sched.init_noise_sigma, float(ref.init_noise_sigma), rtol=1e-6)

    noise, cond, uncond = _inputs()
    got = D.sample(_fake_denoiser, noise, sched, cfg, cond=jnp.asarray(cond))
    want = _torch_sample(ref, n, noise, cond)
    assert _rel_err(got, want) < 1e-5, (name, _rel_err(got, want))


def test_cfg_with_rescale_matches_diffusers():
    cfg = D.SchedulerConfig(**CASES["dpm_eps_linspace"][0])
    noise, cond, uncond = _inputs(1)
    got = D.sample(_fake_denoiser, noise, D.make_schedule(cfg, 10), cfg, guidance_scale=5.0,
                   guidance_rescale=0.7, cond=jnp.asarray(cond), uncond=jnp.asarray(uncond))
    want = _torch_sample(_diffusers_scheduler(cfg), 10, noise, cond, uncond, gs=5.0, gr=0.7)
    assert _rel_err(got, want) < 1e-5


def test_rescale_noise_cfg_matches_diffusers():
    torch = pytest.importorskip("torch")
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((2, *SHAPE)).astype(np.float32)
    want = rescale_noise_cfg(torch.from_numpy(a), torch.from_numpy(b), guidance_rescale=0.6).numpy()
    np.testing.assert_allclose(D.rescale_noise_cfg(jnp.asarray(a), jnp.asarray(b), 0.6), want, rtol=1e-5, atol=1e-6)


def test_ddim_stochastic_step_matches_diffusers():
    torch = pytest.importorskip("torch")
    cfg = D.SchedulerConfig(sampler="ddim", clip_sample=False, **SDXL)
    ref = _diffusers_scheduler(cfg)
    ref.set_timesteps(10)
    sched = D.make_schedule(cfg, 10)
    rng = np.random.default_rng(3)
    x, out, vn = rng.standard_normal((3, *SHAPE)).astype(np.float32)
    for i in (0, 4, 9):
        want = ref.step(torch.from_numpy(out), ref.timesteps[i], torch.from_numpy(x), eta=0.7,
                        variance_noise=torch.from_numpy(vn)).prev_sample.numpy()
        got = D.step(cfg, sched, i, jnp.asarray(x), jnp.asarray(out), eta=0.7, variance_noise=jnp.asarray(vn))
        assert _rel_err(got.prev_sample, want) < 1e-6
    # and the stochastic loop runs (eta > 0 with a key), reproducibly
    kw = dict(cond=jnp.asarray(_inputs()[1]), eta=1.0, rng=jax.random.key(0))
    a = D.sample(_fake_denoiser, x, sched, cfg, **kw)
    np.testing.assert_array_equal(a, D.sample(_fake_denoiser, x, sched, cfg, **kw))
    assert not np.allclose(a, D.sample(_fake_denoiser, x, sched, cfg, cond=kw["cond"]))


def test_training_helpers_match_diffusers():
    torch = pytest.importorskip("torch")
    from diffusers.training_utils import compute_snr
    cfg = D.SchedulerConfig(sampler="ddim", **SDXL)
    ref = _diffusers_scheduler(cfg)
    ts = D.make_train_schedule(cfg)
    rng = np.random.default_rng(4)
    x0, noise = rng.standard_normal((2, *SHAPE)).astype(np.float32)
    t = np.array([0, 999])
    tt = torch.from_numpy(t)
    add = jax.jit(ts.add_noise)(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
    np.testing.assert_allclose(add, ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy(),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ts.velocity(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t)),
                               ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), tt).numpy(),
                               rtol=1e-6, atol=1e-7)
    t = np.array([0, 10, 500, 999])
    snr = ts.snr(jnp.asarray(t))
    np.testing.assert_allclose(snr, compute_snr(ref, torch.from_numpy(t)).numpy(), rtol=1e-6)
    w = D.min_snr_weight(snr, 5.0, "epsilon")
    np.testing.assert_allclose(w, np.minimum(snr, 5.0) / snr, rtol=1e-6)
    np.testing.assert_allclose(D.min_snr_weight(snr, 5.0, "v_prediction"), np.minimum(snr, 5.0) / (snr + 1), rtol=1e-6)


@pytest.mark.parametrize("name", ["euler_karras_trailing_sigma_min", "ddim_trailing_v_zero_snr",
                                  "dpm_karras_v_16_sigma_min"])
def test_reads_diffusers_scheduler_config(name, tmp_path):
    cfg = D.SchedulerConfig(**CASES[name][0])
    _diffusers_scheduler(cfg).save_config(tmp_path / "scheduler")
    assert D.load_scheduler_config(str(tmp_path)) == cfg
    assert D.load_scheduler_config(str(tmp_path / "scheduler" / "scheduler_config.json")) == cfg


def test_from_diffusers_choices_and_errors():
    base = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    # as OtherScheduler.from_config(config): a foreign class's keys are dropped
    pndm = dict(_class_name="PNDMScheduler", skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, **base)
    with pytest.raises(ValueError, match="PNDMScheduler.*DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscrete"):
        D.SchedulerConfig.from_diffusers(pndm)
    cfg = D.SchedulerConfig.from_diffusers(pndm, sampler="euler")
    assert cfg == D.SchedulerConfig(sampler="euler", steps_offset=1, **SDXL)
    with pytest.warns(UserWarning, match="skip_prk_steps"):   # not a DDIMScheduler argument
        assert D.SchedulerConfig.from_diffusers(dict(pndm, _class_name="DDIMScheduler")).set_alpha_to_one is False
    dpm = dict(_class_name="DPMSolverMultistepScheduler", **base)
    assert D.SchedulerConfig.from_diffusers(dpm).sampler == "dpm++2m"
    for key, value in [("solver_order", 3), ("algorithm_type", "sde-dpmsolver++"), ("solver_type", "heun"),
                       ("use_lu_lambdas", True), ("thresholding", True), ("lambda_min_clipped", -5.1),
                       ("variance_type", "learned_range"), ("use_exponential_sigmas", True)]:
        with pytest.raises(ValueError, match=key):
            D.SchedulerConfig.from_diffusers(dict(dpm, **{key: value}))
    with pytest.raises(ValueError, match="thresholding"):
        D.SchedulerConfig.from_diffusers(dict(base, _class_name="DDIMScheduler", thresholding=True))
    with pytest.raises(ValueError, match="use_beta_sigmas"):
        D.SchedulerConfig.from_diffusers(dict(base, _class_name="EulerDiscreteScheduler", use_beta_sigmas=True))
    with pytest.raises(ValueError, match="timestep_type"):
        D.SchedulerConfig.from_diffusers(dict(base, _class_name="EulerDiscreteScheduler", timestep_type="continuous"))
    with pytest.raises(ValueError, match="interpolation_type"):
        D.SchedulerConfig.from_diffusers(dict(base, _class_name="EulerDiscreteScheduler",
                                              interpolation_type="log_linear"))
    with pytest.warns(UserWarning, match="use_foo_sigmas"):
        D.SchedulerConfig.from_diffusers(dict(base, _class_name="EulerDiscreteScheduler", use_foo_sigmas=True))


def test_sdxl_config_file_reads_as_euler_and_as_ddim_without_clipping():
    """SDXL's scheduler_config.json carries DDIM-era keys: Euler drops them silently, and a DDIM
    built from the file must not fall back to DDIM's clip_sample=True (it clips unit-scaled latents)."""
    import warnings

    from configs.diffusion_decoder import SDXL_SCHEDULER
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        euler = D.SchedulerConfig.from_diffusers(dict(SDXL_SCHEDULER))
    assert euler.sampler == "euler"
    ddim = D.SchedulerConfig.from_diffusers(dict(SDXL_SCHEDULER), sampler="ddim")
    assert ddim.clip_sample is False and ddim.set_alpha_to_one is False


def test_key_tables_cover_the_diffusers_signatures():
    """Every __init__ argument of the three classes is either implemented, pinned or inert."""
    import inspect
    diffusers = pytest.importorskip("diffusers")
    for cls, sampler in D.DIFFUSERS_CLASSES.items():
        params = set(inspect.signature(getattr(diffusers, cls).__init__).parameters) - {"self"}
        known = set(D._SAMPLER_KEYS[sampler]) | set(D._FIXED_KEYS[sampler]) | set(D._INERT_KEYS[sampler])
        assert params == known, (cls, params ^ known)


@pytest.mark.parametrize("kwargs,key", [
    (dict(beta_schedule="cosine"), "beta_schedule"),
    (dict(prediction_type="flow_prediction"), "prediction_type"),
    (dict(timestep_spacing="uniform"), "timestep_spacing"),
    (dict(final_sigmas_type="one"), "final_sigmas_type"),
    (dict(sampler="heun"), "sampler"),
    (dict(sampler="ddim", use_karras_sigmas=True), "use_karras_sigmas"),
    (dict(sampler="euler", clip_sample=False), "clip_sample"),
    (dict(sampler="dpm++2m", sigma_max=10.0), "sigma_max"),
    (dict(timestep_type="continuous"), "timestep_type"),
    (dict(trained_betas=[0.1, 0.2]), "trained_betas"),
])
def test_config_errors_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key):
        D.SchedulerConfig(**kwargs)


def test_cfg_batched_equals_separate_branches_and_guidance_one():
    cfg = D.SchedulerConfig(sampler="dpm++2m", **SDXL)
    sched = D.make_schedule(cfg, 8)
    noise, cond, uncond = (jnp.asarray(a) for a in _inputs(5))
    cond_tree, uncond_tree = {"c": cond, "unused": cond[:, 0]}, {"c": uncond, "unused": uncond[:, 0]}

    def denoise(x, t, c):
        assert x.shape[0] == c["c"].shape[0]
        return _fake_denoiser(x, t, c["c"]) + jnp.sin(x)      # nonlinear: the branches must not mix

    got = D.sample(denoise, noise, sched, cfg, guidance_scale=4.0, cond=cond_tree, uncond=uncond_tree)
    s, x, prev = sched.as_jax(), noise, None
    for i in range(sched.num_steps):
        x_in = x / s.input_scale[i]
        u, c = denoise(x_in, s.timesteps[i], uncond_tree), denoise(x_in, s.timesteps[i], cond_tree)
        x, prev = D.step(cfg, sched, i, x, u + 4.0 * (c - u), prev)
    np.testing.assert_allclose(got, x, rtol=1e-5, atol=1e-6)
    # guidance 1: the conditional path only (uncond ignored), = the separate loop on cond alone
    one = D.sample(denoise, noise, sched, cfg, guidance_scale=1.0, cond=cond_tree, uncond=uncond_tree)
    np.testing.assert_array_equal(one, D.sample(denoise, noise, sched, cfg, cond=cond_tree))
    x, prev = noise, None
    for i in range(sched.num_steps):
        x, prev = D.step(cfg, sched, i, x, denoise(x, s.timesteps[i], cond_tree), prev)
    np.testing.assert_allclose(one, x, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="uncond"):
        D.sample(denoise, noise, sched, cfg, guidance_scale=2.0, cond=cond_tree)


@pytest.mark.parametrize("sampler", D.SAMPLERS)
def test_loop_is_one_jit_tracing_the_model_once(sampler):
    cfg = D.SchedulerConfig(sampler=sampler)
    noise, cond, uncond = (jnp.asarray(a) for a in _inputs())
    for n in (3, 25):
        calls = []

        def denoise(x, t, c):
            calls.append(x.shape)
            return _fake_denoiser(x, t, c)

        D.sample(denoise, noise, D.make_schedule(cfg, n), cfg, guidance_scale=3.0, cond=cond, uncond=uncond)
        assert calls == [(2 * SHAPE[0],) + SHAPE[1:]], (n, calls)


def test_eta_and_steps_errors():
    noise, cond, _ = _inputs()
    cfg = D.SchedulerConfig(sampler="euler")
    with pytest.raises(ValueError, match="ddim"):
        D.sample(_fake_denoiser, noise, D.make_schedule(cfg, 4), cfg, cond=cond, eta=0.5, rng=jax.random.key(0))
    ddim = D.SchedulerConfig(sampler="ddim")
    with pytest.raises(ValueError, match="rng"):
        D.sample(_fake_denoiser, noise, D.make_schedule(ddim, 4), ddim, cond=cond, eta=0.5)
    with pytest.raises(ValueError, match="num_steps"):
        D.make_schedule(ddim, 1001)
    with pytest.raises(ValueError, match="num_steps"):
        D.make_schedule(cfg, 0)
    dpm = D.SchedulerConfig(sampler="dpm++2m")
    with pytest.raises(ValueError, match="prev_output"):
        D.step(dpm, D.make_schedule(dpm, 4), 1, noise, noise)


def test_to_diffusers_round_trip():
    for kwargs, _ in CASES.values():
        cfg = D.SchedulerConfig(**kwargs)
        assert D.SchedulerConfig.from_diffusers(json.loads(json.dumps(cfg.to_diffusers()))) == cfg
