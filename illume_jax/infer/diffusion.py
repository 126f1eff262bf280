"""Diffusion noise schedules and samplers (Euler, DDIM, DPM-Solver++ 2M) in JAX, numerically as diffusers.

Why not diffusers itself: the decoders (`models/diffusion_decoder.py`) run as JAX functions under
jit/sharding, while diffusers' schedulers are PyTorch objects stepped from Python, one call per step.
Here the schedule is computed once on the host in numpy, op for op as the diffusers class's `__init__`
+ `set_timesteps` (float32 sigmas / alphas, float32 Euler and int64 DDIM / DPM timesteps; torch's
float32 `linspace` and double-accumulated `cumprod` reproduced bit for bit; torch's CPU float32 sqrt is
not always correctly rounded, numpy's is, so a few values may sit an ulp apart). Then the whole loop is
one `jax.lax.fori_loop` in one jit: the model is traced once whatever the number of steps, and
classifier-free guidance is one batched model call per step ([uncond; cond] rows).

Configs are diffusers scheduler configs (`SchedulerConfig.from_diffusers`, `load_scheduler_config`):
EulerDiscreteScheduler -> 'euler', DDIMScheduler -> 'ddim', DPMSolverMultistepScheduler (dpmsolver++,
order 2, midpoint) -> 'dpm++2m'. Options whose math is not implemented (thresholding, exponential /
beta / lu / flow sigmas, SDE variants, continuous timesteps, ...) raise a ValueError naming the key.
Latents stay float32 through the loop (diffusers casts back to the model dtype between steps).
Training helpers (`TrainSchedule`, `min_snr_weight`) follow diffusers' DDPM `add_noise` /
`get_velocity` and `training_utils.compute_snr`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SAMPLERS = ("euler", "ddim", "dpm++2m")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")

# diffusers class -> our sampler name, and back.
DIFFUSERS_CLASSES = {
    "EulerDiscreteScheduler": "euler",
    "DDIMScheduler": "ddim",
    "DPMSolverMultistepScheduler": "dpm++2m",
}
_CLASS_OF = {v: k for k, v in DIFFUSERS_CLASSES.items()}
# diffusers' per-class default `timestep_spacing` (the one default that differs between the classes).
_DEFAULT_SPACING = {"euler": "linspace", "ddim": "leading", "dpm++2m": "linspace"}

_COMMON_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                "prediction_type", "timestep_spacing", "steps_offset", "rescale_betas_zero_snr")
# The SchedulerConfig fields each sampler reads (= the diffusers __init__ arguments we implement).
_SAMPLER_KEYS = {
    "euler": _COMMON_KEYS + ("interpolation_type", "use_karras_sigmas", "sigma_min", "sigma_max",
                             "timestep_type", "final_sigmas_type"),
    "ddim": _COMMON_KEYS + ("clip_sample", "clip_sample_range", "set_alpha_to_one"),
    "dpm++2m": _COMMON_KEYS + ("use_karras_sigmas", "final_sigmas_type", "lower_order_final", "euler_at_final"),
}
# diffusers __init__ arguments accepted only at these values (others change the math in ways not
# implemented here). DPM's solver_type aliases and algorithm 'deis' are remapped by diffusers itself.
_FIXED_KEYS = {
    "euler": {"use_exponential_sigmas": (False, None), "use_beta_sigmas": (False, None)},
    "ddim": {"thresholding": (False, None)},
    "dpm++2m": {"solver_order": (2,), "algorithm_type": ("dpmsolver++", "deis"),
                "solver_type": ("midpoint", "logrho", "bh1", "bh2"), "thresholding": (False, None),
                "use_exponential_sigmas": (False, None), "use_beta_sigmas": (False, None),
                "use_lu_lambdas": (False, None), "use_flow_sigmas": (False, None),
                "lambda_min_clipped": (-math.inf,), "variance_type": (None,),
                "use_dynamic_shifting": (False, None)},
}
# diffusers __init__ arguments that have no effect given the fixed values above.
_INERT_KEYS = {
    "euler": (),
    "ddim": ("dynamic_thresholding_ratio", "sample_max_value"),
    "dpm++2m": ("dynamic_thresholding_ratio", "sample_max_value", "flow_shift", "time_shift_type"),
}
# DDIM/PNDM-era keys that SD and SDXL Euler configs still carry (no Euler argument): dropped without
# a warning when an Euler config is read, kept for a DDIM built from the same file.
_LEGACY_EULER_KEYS = ("clip_sample", "clip_sample_range", "set_alpha_to_one", "skip_prk_steps", "sample_max_value")


# --------------------------------------------------------------------------------------------- config

@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """A diffusers scheduler config (same key names and defaults) plus the sampler it selects.

    Fields a sampler does not read must keep their defaults (a clear error otherwise), so a config
    cannot silently carry e.g. `use_karras_sigmas=True` into DDIM. `timestep_spacing=None` means the
    diffusers class's default ('leading' for DDIM, 'linspace' for Euler and DPM++).
    """
    sampler: str = "euler"                      # 'euler' | 'ddim' | 'dpm++2m'
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"               # 'linear' | 'scaled_linear' | 'squaredcos_cap_v2'
    trained_betas: tuple[float, ...] | None = None
    prediction_type: str = "epsilon"            # 'epsilon' | 'v_prediction' | 'sample'
    timestep_spacing: str | None = None         # 'leading' | 'trailing' | 'linspace'
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    # Euler
    interpolation_type: str = "linear"
    timestep_type: str = "discrete"
    sigma_min: float | None = None              # Karras sigmas' range (default: the schedule's own)
    sigma_max: float | None = None
    # Euler and DPM++
    use_karras_sigmas: bool = False
    final_sigmas_type: str = "zero"             # 'zero' | 'sigma_min'
    # DDIM
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    # DPM++ 2M
    lower_order_final: bool = True
    euler_at_final: bool = False

    def __post_init__(self):
        if self.trained_betas is not None:
            object.__setattr__(self, "trained_betas", tuple(float(b) for b in np.asarray(self.trained_betas).ravel()))
        if self.timestep_spacing is None and self.sampler in SAMPLERS:
            object.__setattr__(self, "timestep_spacing", _DEFAULT_SPACING[self.sampler])
        _check_choice("sampler", self.sampler, SAMPLERS)
        _check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        _check_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        _check_choice("final_sigmas_type", self.final_sigmas_type, FINAL_SIGMAS_TYPES)
        if self.interpolation_type != "linear":
            raise ValueError(f"interpolation_type={self.interpolation_type!r}: only 'linear' is supported")
        if self.timestep_type != "discrete":
            raise ValueError(f"timestep_type={self.timestep_type!r}: only 'discrete' is supported "
                             "(diffusers' 'continuous' EDM-style timesteps are not implemented)")
        if int(self.num_train_timesteps) < 2:
            raise ValueError(f"num_train_timesteps={self.num_train_timesteps!r}: must be >= 2")
        if self.trained_betas is not None and len(self.trained_betas) != self.num_train_timesteps:
            raise ValueError(f"trained_betas: {len(self.trained_betas)} values for "
                             f"num_train_timesteps={self.num_train_timesteps}")
        if int(self.steps_offset) < 0:
            raise ValueError(f"steps_offset={self.steps_offset!r}: must be >= 0")
        if not self.clip_sample_range > 0:
            raise ValueError(f"clip_sample_range={self.clip_sample_range!r}: must be > 0")
        defaults = {f.name: f.default for f in dataclasses.fields(SchedulerConfig)}
        used = set(_SAMPLER_KEYS[self.sampler])
        for name, default in defaults.items():
            if name != "sampler" and name not in used and getattr(self, name) != default:
                users = [s for s in SAMPLERS if name in _SAMPLER_KEYS[s]]
                raise ValueError(f"{name}={getattr(self, name)!r} has no meaning for sampler "
                                 f"{self.sampler!r} (only for {', '.join(users)})")

    @classmethod
    def from_diffusers(cls, config: dict, sampler: str | None = None) -> "SchedulerConfig":
        """From a diffusers scheduler config dict (`scheduler.config` or a scheduler_config.json).

        The sampler is picked by `_class_name` unless `sampler` is given (then, as diffusers'
        `OtherScheduler.from_config(config)`, keys the chosen class does not take are dropped).
        """
        from_class = sampler is None
        if from_class:
            name = config.get("_class_name")
            if name not in DIFFUSERS_CLASSES:
                raise ValueError(f"scheduler class {name!r} is not supported; supported: "
                                 f"{', '.join(sorted(DIFFUSERS_CLASSES))} (or pass sampler= one of {SAMPLERS})")
            sampler = DIFFUSERS_CLASSES[name]
        _check_choice("sampler", sampler, SAMPLERS)
        kwargs: dict[str, Any] = {"sampler": sampler}
        for key, value in config.items():
            if key.startswith("_") or key in _INERT_KEYS[sampler] or (sampler == "euler" and key in _LEGACY_EULER_KEYS):
                continue
            if key in _FIXED_KEYS[sampler]:
                allowed = _FIXED_KEYS[sampler][key]
                if value not in allowed:
                    raise ValueError(f"{key}={value!r} is not supported for {_CLASS_OF[sampler]} "
                                     f"(supported: {', '.join(map(repr, allowed))})")
            elif key in _SAMPLER_KEYS[sampler]:
                kwargs[key] = value
            elif from_class:     # a newer diffusers argument? it might change the math
                warnings.warn(f"{_CLASS_OF[sampler]} config key {key!r} is not known here; ignored")
            # else: not an argument of the chosen class, dropped as diffusers' from_config does.
        for key in ("sigma_min", "sigma_max"):
            if kwargs.get(key) is not None:
                kwargs[key] = float(kwargs[key])
        return cls(**kwargs)

    def to_diffusers(self) -> dict:
        """The diffusers config dict (with `_class_name`) of this sampler: `Class.from_config(d)`."""
        out: dict[str, Any] = {"_class_name": _CLASS_OF[self.sampler]}
        for key in _SAMPLER_KEYS[self.sampler]:
            value = getattr(self, key)
            out[key] = list(value) if isinstance(value, tuple) else value
        if self.sampler == "dpm++2m":
            out.update(solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint")
        return out


def _check_choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{key}={value!r}: expected one of {', '.join(map(repr, choices))}")


def load_scheduler_config(path: str, sampler: str | None = None) -> SchedulerConfig:
    """Read a diffusers `scheduler_config.json` (the file, its folder, or a pipeline folder holding
    `scheduler/scheduler_config.json`)."""
    if os.path.isdir(path):
        for candidate in ("scheduler_config.json", os.path.join("scheduler", "scheduler_config.json")):
            if os.path.isfile(os.path.join(path, candidate)):
                path = os.path.join(path, candidate)
                break
        else:
            raise FileNotFoundError(f"no scheduler_config.json in {path} (nor in its scheduler/ folder)")
    with open(path) as f:
        return SchedulerConfig.from_diffusers(json.load(f), sampler=sampler)


# ------------------------------------------------------------------------- host-side numpy schedules

def _torch_linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """`torch.linspace(start, end, n, dtype=torch.float32)` on CPU, bit for bit: ATen takes the step
    in float32 and each value as one fused multiply-add from the nearer end (start + step*i for the
    first half, end - step*(n-1-i) after). The FMA is emulated in float64 (exact product; a double
    rounding could differ from a true FMA in rare ties, not seen on the usual beta ranges)."""
    s, e = np.float32(start), np.float32(end)
    if n == 1:
        return np.array([s], np.float32)
    step = np.float64(np.float32(e - s) / np.float32(n - 1))
    i = np.arange(n, dtype=np.float64)
    head = step * i + np.float64(s)
    tail = np.float64(e) - step * (n - 1 - i)
    return np.where(np.arange(n) < n // 2, head, tail).astype(np.float32)


def _betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """diffusers' `betas_for_alpha_bar` (the 'squaredcos_cap_v2' cosine schedule): Python floats, then float32."""
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - alpha_bar((i + 1) / num_diffusion_timesteps) / alpha_bar(i / num_diffusion_timesteps),
                         max_beta) for i in range(num_diffusion_timesteps)], np.float32)


def _cumprod_f32(x: np.ndarray) -> np.ndarray:
    """torch's CPU float32 cumprod: accumulated in float64, each output rounded to float32."""
    return np.cumprod(x.astype(np.float64)).astype(np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """diffusers' `rescale_zero_terminal_snr` (Lin et al. 2023, Algorithm 1), float32 op for op."""
    alphas = np.float32(1.0) - betas
    alphas_bar_sqrt = np.sqrt(_cumprod_f32(alphas))
    a0, a_t = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - a_t) * (a0 / (a0 - a_t))
    alphas_bar = alphas_bar_sqrt * alphas_bar_sqrt
    alphas = np.concatenate([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return np.float32(1.0) - alphas


def betas(config: SchedulerConfig) -> np.ndarray:
    """The training betas (float32), as the diffusers class builds them."""
    if config.trained_betas is not None:
        b = np.array(config.trained_betas, np.float32)
    elif config.beta_schedule == "linear":
        b = _torch_linspace_f32(config.beta_start, config.beta_end, config.num_train_timesteps)
    elif config.beta_schedule == "scaled_linear":
        b = _torch_linspace_f32(config.beta_start ** 0.5, config.beta_end ** 0.5, config.num_train_timesteps)
        b = b * b
    else:
        b = _betas_for_alpha_bar(config.num_train_timesteps)
    if config.rescale_betas_zero_snr:
        b = _rescale_zero_terminal_snr(b)
    return b


def alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
    """The cumulative alphas (float32, index = training timestep), as the diffusers class holds them
    (Euler and DPM++ replace a zero terminal value by 2**-24 so the first sigma stays finite)."""
    ac = _cumprod_f32(np.float32(1.0) - betas(config))
    if config.rescale_betas_zero_snr and config.sampler in ("euler", "dpm++2m"):
        ac[-1] = 2.0 ** -24
    return ac


def _sigma_to_t(sigma, log_sigmas):
    """diffusers' `_sigma_to_t` (verbatim numpy): fractional training timestep of a sigma."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low = log_sigmas[low_idx]
    high = log_sigmas[high_idx]
    w = (low - log_sigma) / (low - high)
    w = np.clip(w, 0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(sigma.shape)


def _karras_sigmas(in_sigmas, num_steps, sigma_min=None, sigma_max=None):
    """diffusers' `_convert_to_karras` (Karras et al. 2022, rho = 7), float64."""
    sigma_min = sigma_min if sigma_min is not None else in_sigmas[-1].item()
    sigma_max = sigma_max if sigma_max is not None else in_sigmas[0].item()
    rho = 7.0
    ramp = np.linspace(0, 1, num_steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


class Schedule(NamedTuple):
    """One sampling run's schedule (host numpy arrays; N = number of steps).

    timesteps:       (N,) what the model is given: float32 (euler) or int64 (ddim, dpm++2m) — the
                     diffusers `scheduler.timesteps` (`sample` hands the model int32 for the latter).
    sigmas:          (N+1,) float32. Euler / DPM++: diffusers' `scheduler.sigmas` (last = final sigma).
                     DDIM: sqrt((1-a)/a) of the step's alpha_prod, then of the last alpha_prod_prev.
    alpha_prod:      (N,) float32 cumulative alpha at each step (Euler / DPM++: 1/(1+sigma^2)).
    alpha_prod_prev: (N,) float32 the one stepped to (DDIM: at t - T//N, or `final_alpha_cumprod`).
    input_scale:     (N,) float32 divisor of the latents before the model (Euler: sqrt(sigma^2+1); else 1).
    order:           (N,) int32 DPM-Solver++ order of each step (1 or 2); 1 for Euler and DDIM.
    init_noise_sigma: () float32 standard deviation of the initial noise (`sample` scales unit noise by it).
    """
    timesteps: Any
    sigmas: Any
    alpha_prod: Any
    alpha_prod_prev: Any
    input_scale: Any
    order: Any
    init_noise_sigma: Any

    @property
    def num_steps(self) -> int:
        return int(np.shape(self.timesteps)[0])

    def as_jax(self) -> "Schedule":
        """The same schedule as jnp arrays (integer timesteps as int32, JAX's default integer width)."""
        def conv(a):
            if jnp.issubdtype(jnp.result_type(a), jnp.integer):
                return jnp.asarray(a).astype(jnp.int32) if isinstance(a, jax.Array) else jnp.asarray(
                    np.asarray(a).astype(np.int32))
            return jnp.asarray(a, jnp.float32)
        return Schedule(*(conv(a) for a in self))


def make_schedule(config: SchedulerConfig, num_steps: int) -> Schedule:
    """The schedule of `num_steps` steps, computed as diffusers' `set_timesteps(num_steps)` does."""
    num_steps = int(num_steps)
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps}: must be >= 1")
    ac = alphas_cumprod(config)
    return {"euler": _euler_schedule, "ddim": _ddim_schedule, "dpm++2m": _dpm_schedule}[config.sampler](
        config, num_steps, ac)


def _train_sigmas(ac: np.ndarray) -> np.ndarray:
    return np.sqrt((np.float32(1) - ac) / ac)          # float32, as torch's ((1 - ac) / ac) ** 0.5


def _final_sigma(config: SchedulerConfig, ac: np.ndarray):
    return _train_sigmas(ac[:1])[0] if config.final_sigmas_type == "sigma_min" else 0


def _vp_alphas(sigmas: np.ndarray):
    a = (1.0 / (1.0 + sigmas.astype(np.float64) ** 2)).astype(np.float32)
    return a[:-1], a[1:]


def _euler_schedule(config: SchedulerConfig, n: int, ac: np.ndarray) -> Schedule:
    T = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        timesteps = np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
    elif config.timestep_spacing == "leading":
        step_ratio = T // n
        timesteps = (np.arange(0, n) * step_ratio).round()[::-1].copy().astype(np.float32)
        timesteps += config.steps_offset
    else:
        step_ratio = T / n
        timesteps = np.arange(T, 0, -step_ratio).round().copy().astype(np.float32)
        timesteps -= 1
    sigmas = _train_sigmas(ac)
    log_sigmas = np.log(sigmas)
    sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
    if config.use_karras_sigmas:
        sigmas = _karras_sigmas(sigmas, n, config.sigma_min, config.sigma_max)
        timesteps = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
    sigmas = np.concatenate([sigmas, [_final_sigma(config, ac)]]).astype(np.float32)
    init = sigmas.max()
    if config.timestep_spacing not in ("linspace", "trailing"):
        init = np.sqrt(init * init + np.float32(1))
    alpha_prod, alpha_prod_prev = _vp_alphas(sigmas)
    return Schedule(
        timesteps=timesteps.astype(np.float32), sigmas=sigmas, alpha_prod=alpha_prod,
        alpha_prod_prev=alpha_prod_prev, input_scale=np.sqrt(sigmas[:-1] * sigmas[:-1] + np.float32(1)),
        order=np.ones(len(timesteps), np.int32), init_noise_sigma=np.float32(init))


def _ddim_schedule(config: SchedulerConfig, n: int, ac: np.ndarray) -> Schedule:
    T = config.num_train_timesteps
    if n > T:
        raise ValueError(f"num_steps={n} cannot be larger than num_train_timesteps={T}")
    if config.timestep_spacing == "linspace":
        timesteps = np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
    elif config.timestep_spacing == "leading":
        step_ratio = T // n
        timesteps = (np.arange(0, n) * step_ratio).round()[::-1].copy().astype(np.int64)
        timesteps += config.steps_offset
    else:
        step_ratio = T / n
        timesteps = np.round(np.arange(T, 0, -step_ratio)).astype(np.int64)
        timesteps -= 1
    if timesteps.max() >= T:
        raise ValueError(f"steps_offset={config.steps_offset} puts timestep {timesteps.max()} outside the "
                         f"{T} training timesteps")
    final = np.float32(1.0) if config.set_alpha_to_one else ac[0]
    prev = timesteps - T // n                       # diffusers' DDIM step: t - T // N, whatever the spacing
    alpha_prod = ac[timesteps]
    alpha_prod_prev = np.where(prev >= 0, ac[np.clip(prev, 0, None)], final).astype(np.float32)
    with np.errstate(divide="ignore"):
        sigmas = _train_sigmas(np.concatenate([alpha_prod, alpha_prod_prev[-1:]]))
    return Schedule(
        timesteps=timesteps, sigmas=sigmas, alpha_prod=alpha_prod, alpha_prod_prev=alpha_prod_prev,
        input_scale=np.ones(len(timesteps), np.float32), order=np.ones(len(timesteps), np.int32),
        init_noise_sigma=np.float32(1.0))


def _dpm_schedule(config: SchedulerConfig, n: int, ac: np.ndarray) -> Schedule:
    T = config.num_train_timesteps
    last_timestep = T                               # lambda_min_clipped = -inf: nothing clipped
    if config.timestep_spacing == "linspace":
        timesteps = np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    elif config.timestep_spacing == "leading":
        step_ratio = last_timestep // (n + 1)
        timesteps = (np.arange(0, n + 1) * step_ratio).round()[::-1][:-1].copy().astype(np.int64)
        timesteps += config.steps_offset
    else:
        step_ratio = T / n
        timesteps = np.arange(last_timestep, 0, -step_ratio).round().copy().astype(np.int64)
        timesteps -= 1
    sigmas = _train_sigmas(ac)
    log_sigmas = np.log(sigmas)
    if config.use_karras_sigmas:
        sigmas = _karras_sigmas(np.flip(sigmas).copy(), n)
        timesteps = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
        if config.beta_schedule != "squaredcos_cap_v2":
            timesteps = timesteps.round()
    else:
        sigmas = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas)
    sigmas = np.concatenate([sigmas, [_final_sigma(config, ac)]]).astype(np.float32)
    timesteps = timesteps.astype(np.int64)          # torch's .to(int64) truncates, as astype does
    n = len(timesteps)
    # diffusers' step(): first order at the first step (no history) and at the last one when
    # euler_at_final, or lower_order_final with < 15 steps, or a zero final sigma.
    order = np.full(n, 2, np.int32)
    order[0] = 1
    if config.euler_at_final or (config.lower_order_final and n < 15) or config.final_sigmas_type == "zero":
        order[-1] = 1
    alpha_prod, alpha_prod_prev = _vp_alphas(sigmas)
    return Schedule(
        timesteps=timesteps, sigmas=sigmas, alpha_prod=alpha_prod, alpha_prod_prev=alpha_prod_prev,
        input_scale=np.ones(n, np.float32), order=order, init_noise_sigma=np.float32(1.0))


# ---------------------------------------------------------------------------------------- one step

class StepOutput(NamedTuple):
    prev_sample: jax.Array            # the latents after the step (float32)
    pred_original_sample: jax.Array   # the x0 prediction (DPM++: the converted output the next step needs)


def euler_step(sample, model_output, sigma, sigma_next, prediction_type: str) -> StepOutput:
    """diffusers `EulerDiscreteScheduler.step` with s_churn = 0 (deterministic)."""
    x = sample.astype(jnp.float32)
    m = model_output.astype(jnp.float32)
    sigma_hat = sigma                                  # sigma * (gamma + 1), gamma = 0
    if prediction_type == "sample":
        x0 = m
    elif prediction_type == "epsilon":
        x0 = x - sigma_hat * m
    else:
        x0 = m * (-sigma / (sigma ** 2 + 1) ** 0.5) + (x / (sigma ** 2 + 1))
    derivative = (x - x0) / sigma_hat
    dt = sigma_next - sigma_hat
    return StepOutput(x + derivative * dt, x0)


def ddim_step(sample, model_output, alpha_prod, alpha_prod_prev, prediction_type: str, *,
              clip_sample_range: float | None = None, eta=0.0, variance_noise=None) -> StepOutput:
    """diffusers `DDIMScheduler.step` (use_clipped_model_output=False; noise only when given)."""
    x = sample.astype(jnp.float32)
    m = model_output.astype(jnp.float32)
    beta_prod = 1 - alpha_prod
    if prediction_type == "epsilon":
        x0 = (x - beta_prod ** 0.5 * m) / alpha_prod ** 0.5
        eps = m
    elif prediction_type == "sample":
        x0 = m
        eps = (x - alpha_prod ** 0.5 * x0) / beta_prod ** 0.5
    else:
        x0 = alpha_prod ** 0.5 * x - beta_prod ** 0.5 * m
        eps = alpha_prod ** 0.5 * m + beta_prod ** 0.5 * x
    if clip_sample_range is not None:
        x0 = jnp.clip(x0, -clip_sample_range, clip_sample_range)
    variance = ((1 - alpha_prod_prev) / beta_prod) * (1 - alpha_prod / alpha_prod_prev)
    std_dev = eta * variance ** 0.5
    prev = alpha_prod_prev ** 0.5 * x0 + (1 - alpha_prod_prev - std_dev ** 2) ** 0.5 * eps
    if variance_noise is not None:
        prev = prev + std_dev * variance_noise.astype(jnp.float32)
    return StepOutput(prev, x0)


def _vp(sigma):
    """diffusers' `_sigma_to_alpha_sigma_t` and the log-SNR lambda."""
    alpha_t = 1 / ((sigma ** 2 + 1) ** 0.5)
    sigma_t = sigma * alpha_t
    return alpha_t, sigma_t, jnp.log(alpha_t) - jnp.log(sigma_t)


def dpm_solver_2m_step(sample, model_output, prev_x0, sigma_prev, sigma, sigma_next, order,
                       prediction_type: str) -> StepOutput:
    """diffusers `DPMSolverMultistepScheduler.step` for dpmsolver++ / order 2 / midpoint: converts the
    output to an x0 prediction, then the first-order update (order 1) or the 2M update using the previous
    step's x0 (`prev_x0`, at `sigma_prev`). `order` may be traced."""
    x = sample.astype(jnp.float32)
    m = model_output.astype(jnp.float32)
    alpha_s0, sigma_s0, lambda_s0 = _vp(sigma)
    if prediction_type == "epsilon":
        m0 = (x - sigma_s0 * m) / alpha_s0
    elif prediction_type == "sample":
        m0 = m
    else:
        m0 = alpha_s0 * x - sigma_s0 * m
    alpha_t, sigma_t, lambda_t = _vp(sigma_next)
    _, _, lambda_s1 = _vp(sigma_prev)
    h = lambda_t - lambda_s0
    b = alpha_t * (jnp.exp(-h) - 1.0)
    x_t = (sigma_t / sigma_s0) * x - b * m0
    # Second-order correction 0.5 * b * D1, D1 = (1/r0) (m0 - m1), r0 = h_0 / h; exactly zero for order 1
    # (where h_0 or h may be 0 / inf: the guard keeps the unused branch free of NaNs).
    second = jnp.asarray(order) == 2
    h_0 = jnp.where(second, lambda_s0 - lambda_s1, 1.0)
    inv_r0 = jnp.where(second, 1.0 / (h_0 / h), 0.0)
    d1 = inv_r0 * (m0 - prev_x0.astype(jnp.float32))
    return StepOutput(x_t - (0.5 * b) * d1, m0)


def step(config: SchedulerConfig, schedule: Schedule, i, sample, model_output, prev_output=None, *,
         eta=0.0, variance_noise=None) -> StepOutput:
    """Step i of `schedule` (the body of `sample`'s loop; `i` may be traced). `prev_output` is the
    previous step's `pred_original_sample` (DPM++ 2M only; ignored at order-1 steps). `eta` /
    `variance_noise`: DDIM's stochasticity (noise is added only when `variance_noise` is given)."""
    if (config.sampler == "dpm++2m" and prev_output is None and isinstance(i, (int, np.integer))
            and isinstance(schedule.order, np.ndarray) and schedule.order[i] == 2):
        raise ValueError(f"step {i} of DPM-Solver++ 2M is second order: pass the previous step's "
                         "pred_original_sample as prev_output")
    s = schedule.as_jax()
    i = jnp.asarray(i, jnp.int32)
    if config.sampler == "euler":
        if variance_noise is not None:
            raise ValueError("variance_noise / eta > 0 is only supported by the 'ddim' sampler")
        return euler_step(sample, model_output, s.sigmas[i], s.sigmas[i + 1], config.prediction_type)
    if config.sampler == "ddim":
        return ddim_step(sample, model_output, s.alpha_prod[i], s.alpha_prod_prev[i], config.prediction_type,
                         clip_sample_range=config.clip_sample_range if config.clip_sample else None,
                         eta=eta, variance_noise=variance_noise)
    if variance_noise is not None:
        raise ValueError("variance_noise / eta > 0 is only supported by the 'ddim' sampler")
    if prev_output is None:
        prev_output = jnp.zeros(jnp.shape(sample), jnp.float32)
    return dpm_solver_2m_step(sample, model_output, prev_output, s.sigmas[jnp.maximum(i - 1, 0)], s.sigmas[i],
                              s.sigmas[i + 1], s.order[i], config.prediction_type)


# ------------------------------------------------------------------------------------ the whole loop

def rescale_noise_cfg(noise_cfg, noise_pred_text, guidance_rescale):
    """Guidance rescale (Lin et al. 2023, §3.4) as diffusers' `rescale_noise_cfg`: match the guided
    prediction's per-sample std (unbiased, over all non-batch axes) to the conditional one's, then mix."""
    axes = tuple(range(1, noise_cfg.ndim))
    std_text = jnp.std(noise_pred_text, axis=axes, keepdims=True, ddof=1)
    std_cfg = jnp.std(noise_cfg, axis=axes, keepdims=True, ddof=1)
    rescaled = noise_cfg * (std_text / std_cfg)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * noise_cfg


def _sample_loop(denoise_fn, config, do_cfg, do_rescale, stochastic, noise, schedule, cond, uncond,
                 guidance_scale, guidance_rescale, eta, rng):
    x = noise.astype(jnp.float32) * schedule.init_noise_sigma
    if do_cfg:
        cond_in = jax.tree.map(lambda u, c: jnp.concatenate([u, c], axis=0), uncond, cond)

    def body(i, carry):
        x, prev_out = carry
        t = schedule.timesteps[i]
        x_in = x / schedule.input_scale[i]
        if do_cfg:
            out = denoise_fn(jnp.concatenate([x_in, x_in], axis=0), t, cond_in).astype(jnp.float32)
            out_uncond, out_cond = jnp.split(out, 2, axis=0)
            out = out_uncond + guidance_scale * (out_cond - out_uncond)
            if do_rescale:
                out = rescale_noise_cfg(out, out_cond, guidance_rescale)
        else:
            out = denoise_fn(x_in, t, cond).astype(jnp.float32)
        vnoise = jax.random.normal(jax.random.fold_in(rng, i), x.shape, jnp.float32) if stochastic else None
        res = step(config, schedule, i, x, out, prev_out, eta=eta, variance_noise=vnoise)
        return res.prev_sample, res.pred_original_sample

    x, _ = jax.lax.fori_loop(0, schedule.timesteps.shape[0], body, (x, jnp.zeros_like(x)))
    return x


_sample_jit = jax.jit(_sample_loop, static_argnums=(0, 1, 2, 3, 4))


def sample(denoise_fn: Callable, noise, schedule: Schedule, config: SchedulerConfig, *,
           guidance_scale: float = 1.0, guidance_rescale: float = 0.0, cond=None, uncond=None,
           eta: float = 0.0, rng=None) -> jax.Array:
    """Denoise unit Gaussian `noise` [B, ...] through `schedule`; returns float32 latents.

    `denoise_fn(x, t, cond) -> model_output` (same shape as x) is a pure JAX function: x is the scaled
    model input (Euler divides by sqrt(sigma^2+1)), t a 0-d timestep (float32 / int32). With
    `guidance_scale != 1` it is called once per step on 2B rows [uncond; cond] (the leaves of the
    `uncond` and `cond` pytrees concatenated on axis 0) and the outputs are combined as
    uncond + s * (cond - uncond), then optionally rescaled (`guidance_rescale`, as diffusers). With
    guidance 1 only `cond` is used. `eta > 0` (DDIM only) needs `rng`.

    `guidance_scale`, `guidance_rescale` and `eta` are Python numbers (whether to batch, rescale or add
    noise is decided at trace time; their values are traced). The loop is one jit (`denoise_fn` and
    `config` are static: keep the same function object to reuse the compilation). A closure over
    concrete weights bakes them into the executable as constants; for a large model call `sample`
    inside your own `jax.jit` / `nnx.jit` so the weights are traced.
    """
    do_cfg = float(guidance_scale) != 1.0
    if do_cfg and (cond is None or uncond is None):
        raise ValueError(f"guidance_scale={guidance_scale}: classifier-free guidance needs both cond and uncond")
    stochastic = float(eta) > 0.0
    if stochastic and config.sampler != "ddim":
        raise ValueError(f"eta={eta}: only the 'ddim' sampler is stochastic")
    if stochastic and rng is None:
        raise ValueError(f"eta={eta} > 0 needs an rng key")
    return _sample_jit(denoise_fn, config, do_cfg, do_cfg and float(guidance_rescale) > 0.0, stochastic,
                       jnp.asarray(noise), schedule.as_jax(), cond, uncond if do_cfg else None,
                       jnp.float32(guidance_scale), jnp.float32(guidance_rescale), jnp.float32(eta),
                       rng if stochastic else None)


# ----------------------------------------------------------------------------------------- training

def _expand(v, ndim: int):
    v = v.reshape(-1)
    return v.reshape(v.shape + (1,) * (ndim - 1))


class TrainSchedule(NamedTuple):
    """The forward process for training (a pytree: pass it into jit). `t`: integer timesteps [B]."""
    alphas_cumprod: jax.Array        # (num_train_timesteps,) float32

    def add_noise(self, x0, noise, t):
        """sqrt(a_t) x0 + sqrt(1 - a_t) noise (diffusers' DDPM `add_noise`, alphas in x0's dtype)."""
        ac = self.alphas_cumprod.astype(x0.dtype)[t]
        return _expand(ac ** 0.5, x0.ndim) * x0 + _expand((1 - ac) ** 0.5, x0.ndim) * noise

    def velocity(self, x0, noise, t):
        """The v-prediction target sqrt(a_t) noise - sqrt(1 - a_t) x0 (diffusers' `get_velocity`)."""
        ac = self.alphas_cumprod.astype(x0.dtype)[t]
        return _expand(ac ** 0.5, x0.ndim) * noise - _expand((1 - ac) ** 0.5, x0.ndim) * x0

    def snr(self, t):
        """Signal-to-noise ratio a_t / (1 - a_t), float32, shaped like t (diffusers' `compute_snr`)."""
        ac = self.alphas_cumprod.astype(jnp.float32)
        return ((ac ** 0.5)[t] / ((1.0 - ac) ** 0.5)[t]) ** 2


def make_train_schedule(config: SchedulerConfig) -> TrainSchedule:
    return TrainSchedule(jnp.asarray(alphas_cumprod(config)))


def min_snr_weight(snr, gamma: float, prediction_type: str):
    """Min-SNR-gamma loss weights (Hang et al. 2023) for an MSE on the `prediction_type` target, as
    diffusers' training scripts: min(snr, gamma), divided by snr (epsilon) or snr + 1 (v_prediction).
    Zero-SNR timesteps get weight 1 with epsilon (0/0 otherwise)."""
    _check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    w = jnp.minimum(snr, gamma)
    if prediction_type == "epsilon":
        return jnp.where(snr > 0, w / jnp.where(snr > 0, snr, 1.0), 1.0)
    if prediction_type == "v_prediction":
        return w / (snr + 1)
    return w
