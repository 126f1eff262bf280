"""Diffusion-decoder training: `python -m illume_jax train-decoder --config=configs/diffusion_decoder.py:size=tiny`.

The official ILLUME+ release has no decoder training code and ILLUME none at all; this is the
standard latent-diffusion recipe with the conditioning of `models/diffusion_decoder.py`:

  1. vae   (tiny scale, `config.vae_train.steps > 0`): the AutoencoderKL alone, L2 (+ optional L1) + a small KL
           term, on the decoder's output resolution. Its latent scaling factor is then measured
           (1 / std of the latents, as SD's 0.18215 was) and saved beside the weights. Official
           sizes skip it and load the released SDXL VAE (`model_init.vae_from`).
  2. unet  the UNet on VAE latents of the 2x-resolution target, conditioned on the frozen
           tokenizer's codes of the 1x image (computed on the fly inside the step): epsilon- or
           v-prediction MSE, condition dropout for CFG (the code map / context zeroed), optional
           min-SNR-gamma weighting, an EMA of the UNet weights (used for evaluation and export).

Evaluation samples images from the ground-truth codes of validation scenes with the configured
sampler and CFG, and reports how the ShapeComp scorer reads them against the exact 2x render
(`decoder_agreement`, the issue's bar), plus PSNR. Each phase resumes from its own folder.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from illume_jax import sharding
from illume_jax.data import images as images_lib
from illume_jax.eval import recon as recon_lib
from illume_jax.eval import shapecomp_scorer as scorer
from illume_jax.infer import diffusion
from illume_jax.models import diffusion_decoder as dd
from illume_jax.train import checkpoint as ckpt_lib
from illume_jax.train.phase import run_phase
from illume_jax.train.step import InitProgram, abstract_module, mesh_key, reuse_programs
from illume_jax.train.tokenizer import _adam, _check_batch, _masked, _mesh_jit, _shardings


@struct.dataclass
class DecoderState:
    step: jax.Array
    params: Any        # the whole DiffusionDecoder (VAE + UNet); the phase's mask picks what trains
    opt_state: Any
    ema: Any           # EMA of the UNet parameters (None in the VAE phase)
    rng: jax.Array     # raw PRNG key data


def vae_dir(workdir: str) -> str:
    return os.path.join(workdir, "vae")


def unet_dir(workdir: str) -> str:
    return os.path.join(workdir, "unet")


def final_vae_path(workdir: str) -> str:
    return os.path.join(vae_dir(workdir), "final_vae")


# -- the frozen tokenizer: codes -> condition features -----------------------------------------------

class FrozenTokenizer:
    """The trained tokenizer of `config.tokenizer` (from `config.tokenizer_workdir`), reduced to
    the function the decoder needs: 1x images -> condition features (code map or semantic features)."""

    def __init__(self, config: Any, mesh):
        from illume_jax.train.tokenizer import load_tokenizer, saved_config
        workdir = os.path.abspath(config.tokenizer_workdir)
        # The checkpoint's own config is the truth (a run may have overridden codebook sizes);
        # config.tokenizer is the fallback and what shape-only tools (AOT) use.
        tok_cfg = saved_config(workdir) or config.tokenizer
        model, _, state = load_tokenizer(tok_cfg, workdir, mesh)
        self.graphdef, self.params, self.buffers = nnx.split(model, nnx.Param, ...)
        self.kind = tok_cfg.model.kind
        self.resolution = tok_cfg.data.resolution
        want = "dualvitok" if config.model.conditioning == "illume_plus" else "semantic_vq"
        if self.kind != want:
            raise ValueError(f"config.model.conditioning={config.model.conditioning!r} needs a {want} tokenizer; "
                             f"config.tokenizer.model.kind is {self.kind!r}")
        del state

    def features(self, params, buffers, images: jax.Array) -> jax.Array:
        model = nnx.merge(self.graphdef, params, buffers)
        if self.kind == "dualvitok":
            return model.code_map(*model.encode(images))
        return model.reconstruct_features(model.encode(images))


# -- construction -------------------------------------------------------------------------------------

def model_config(config: Any, workdir: str) -> dd.DecoderConfig:
    """The decoder config, with the VAE scaling factor measured by phase 1 when it ran."""
    cfg = dd.DecoderConfig.from_config(config.model)
    path = os.path.join(final_vae_path(workdir), "..", "latent_scaling.json")
    if config.vae_train.steps > 0 and os.path.exists(path):
        with open(path) as f:
            cfg = dataclasses.replace(cfg, vae=dataclasses.replace(cfg.vae, scaling_factor=json.load(f)["scaling_factor"]))
    return cfg


class DecoderTrainer:
    """Model, optimizer, jitted steps and evaluation of one decoder phase ('vae' or 'unet')."""

    def __init__(self, config: Any, workdir: str, mesh, phase: str, tokenizer: FrozenTokenizer | None = None):
        self.config, self.workdir, self.mesh, self.phase = config, workdir, mesh, phase
        self.cfg = model_config(config, workdir)
        self.tokenizer = tokenizer
        make = lambda: dd.DiffusionDecoder(self.cfg, rngs=nnx.Rngs(config.seed))  # noqa: E731
        self.graphdef, abs_params = nnx.split(abstract_module(("decoder", repr(self.cfg), config.seed), make, mesh),
                                              nnx.Param)
        t = config.vae_train if phase == "vae" else config.train
        self.tx = _masked(_adam(t), abs_params, ("vae/.*",) if phase == "vae" else ("unet/.*",), f"decoder_{phase}")
        self.sched_cfg = diffusion.SchedulerConfig.from_diffusers(dict(config.scheduler))
        self.train_schedule = diffusion.make_train_schedule(self.sched_cfg)
        with_ema = phase == "unet" and config.train.ema_decay > 0

        def fresh(params):
            ema = jax.tree.map(jnp.copy, params["unet"]) if with_ema else None
            return DecoderState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params), ema=ema,
                                rng=jax.random.key_data(jax.random.key(config.seed + (1 if phase == "unet" else 0))))

        self.abstract, out_sh = _shardings(jax.eval_shape(fresh, abs_params), mesh, abs_params)
        if with_ema:  # the EMA is sharded as the UNet it averages (its paths lack the 'unet/' prefix,
            # so the path matching above left it replicated: 9.6 GiB on every chip at SDXL size)
            out_sh = out_sh.replace(ema=out_sh.params["unet"])
            self.abstract = self.abstract.replace(ema=jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.abstract.ema, out_sh.ema))
        step_fn = self._vae_step if phase == "vae" else self._unet_step
        # Functions of the config, the derived model config (the workdir's measured VAE scale) and
        # the mesh; weights are arguments.
        self._key = ("decoder", phase, config.to_json(), repr(self.cfg), mesh_key(mesh))
        self._fresh, self._step = reuse_programs(self._key, lambda: (
            _mesh_jit(fresh, mesh, out_shardings=out_sh, donate_argnums=(0,)),
            _mesh_jit(step_fn, mesh, out_shardings=(out_sh, None), donate_argnums=(0,))))
        # The random init is the same for both phases (the VAE scale measured between them is not
        # read by it), so both phases share one InitProgram.
        init_cfg = dataclasses.replace(self.cfg, vae=dataclasses.replace(self.cfg.vae, scaling_factor=1.0))

        def init_params():
            return nnx.state(dd.DiffusionDecoder(init_cfg, rngs=nnx.Rngs(config.seed)), nnx.Param)
        self._init_params = reuse_programs(
            ("decoder-init", repr(init_cfg), config.seed, mesh_key(mesh)),
            lambda: InitProgram(init_params, mesh, out_sh.params, self.abstract.params))
        self._sample = None
        self._features = None

    # -- state --------------------------------------------------------------------------------------
    def init_state(self) -> DecoderState:
        weights_from = self.config.model_init.get("weights_from", "")
        if weights_from and self.phase == "unet":  # fine-tuning converted official weights (VAE + UNet)
            from illume_jax.convert import weights
            weights.check_kind(weights_from, ("sdxl-decoder",), "config.model_init.weights_from")
            params, _ = weights.restore(weights_from, self.abstract.params)
            return self._fresh(params)
        state = self._fresh(self._init_params())
        if self.phase == "unet":  # the VAE comes from phase 1 or a converted checkpoint
            src = self.config.model_init.vae_from or (final_vae_path(self.workdir)
                                                      if self.config.vae_train.steps > 0 else "")
            if src:
                model = nnx.merge(self.graphdef, state.params)
                load_vae(model.vae, src)
                state = state.replace(params=nnx.state(model, nnx.Param))  # the EMA covers the UNet only
        return state

    # -- steps --------------------------------------------------------------------------------------
    def _vae_step(self, state: DecoderState, batch):
        t = self.config.vae_train
        x = batch["target"]
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        crop = int(t.get("crop", 0))
        if crop and crop < min(x.shape[1:3]):
            x = random_crops(x, crop, jax.random.fold_in(rng, 1))
        sample = t.get("sample_posterior", True)

        def loss_fn(params):
            vae = nnx.merge(self.graphdef, params).vae
            mean, logvar = vae.encode(x)
            z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype) if sample else mean
            rec = vae.decode(z).astype(jnp.float32)
            l2 = jnp.mean((rec - x) ** 2)
            l1 = jnp.mean(jnp.abs(rec - x))
            kl = 0.5 * jnp.mean(jnp.sum(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3)))
            loss = l2 + t.get("l1_weight", 0.0) * l1 + t.kl_weight * kl
            return loss, dict(l2=l2, l1=l1, kl=kl, psnr=-10.0 * jnp.log10(jnp.maximum(
                jnp.mean(((jnp.clip(rec, -1, 1) - x) / 2) ** 2), 1e-10)))

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        new = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state)
        return new, dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                         images=jnp.asarray(x.shape[0], jnp.float32))

    def _unet_step(self, state: DecoderState, batch, feats):
        """One UNet update; `feats` are the frozen tokenizer's condition features of batch['image']
        (computed by a separate jitted call, so this step is tokenizer-agnostic and compiles AOT alone)."""
        t = self.config.train
        sc = self.sched_cfg
        target = batch["target"]
        B = target.shape[0]
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        k_lat, k_t, k_noise, k_drop = jax.random.split(rng, 4)
        model = nnx.merge(self.graphdef, state.params)
        out_hw = target.shape[1:3]  # the time ids name the whole output size, also when training on crops
        crop = int(t.get("crop", 0))
        if crop and crop < min(out_hw):
            target, feats = crop_with_codes(target, feats, crop, self.cfg.latent_factor, jax.random.fold_in(rng, 1))
        # Posterior samples as SD trains, or the mode for a VAE trained without sampling.
        vae_rng = k_lat if self.config.vae_train.get("sample_posterior", True) else None
        latents = jax.lax.stop_gradient(model.vae.latents_from_images(target, rng=vae_rng))
        drop = jax.random.uniform(k_drop, (B,)) < t.cond_drop
        feats = jnp.where(drop.reshape((B,) + (1,) * (feats.ndim - 1)), 0.0, feats)
        cond = model.condition(feats, out_hw)
        timesteps = jax.random.randint(k_t, (B,), 0, sc.num_train_timesteps)
        noise = jax.random.normal(k_noise, latents.shape, latents.dtype)
        x_t = self.train_schedule.add_noise(latents, noise, timesteps)
        if sc.prediction_type == "epsilon":
            goal = noise
        elif sc.prediction_type == "v_prediction":
            goal = self.train_schedule.velocity(latents, noise, timesteps)
        else:
            goal = latents
        w = (diffusion.min_snr_weight(self.train_schedule.snr(timesteps), t.min_snr_gamma, sc.prediction_type)
             if t.min_snr_gamma > 0 else jnp.ones((B,), jnp.float32))

        def loss_fn(params):
            m = nnx.merge(self.graphdef, params)
            pred = m.denoise(x_t, timesteps, cond).astype(jnp.float32)
            per = jnp.mean((pred - goal) ** 2, axis=(1, 2, 3))
            return jnp.mean(w * per), jnp.mean(per)

        (loss, mse), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema
        if ema is not None:
            d = t.ema_decay
            ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params["unet"])
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema)
        return new, dict(loss=loss, mse=mse, grad_norm=optax.tree.norm(grads), cond_dropped=jnp.mean(drop),
                         images=jnp.asarray(B, jnp.float32))

    def step(self, state: DecoderState, batch: dict, host_step: int):
        del host_step
        if self.phase == "vae":
            return self._step(state, batch)
        return self._step(state, batch, self.features(batch["image"]))

    def features(self, images) -> jax.Array:
        """The frozen tokenizer's condition features of 1x images (code map or semantic features)."""
        if self._features is None:
            self._features = reuse_programs(
                ("decoder-features", self.tokenizer.kind, self.tokenizer.graphdef, mesh_key(self.mesh)),
                lambda: _mesh_jit(self.tokenizer.features, self.mesh))
        tok = self.tokenizer
        return self._features(tok.params, tok.buffers, images)

    # -- sampling and evaluation ---------------------------------------------------------------------
    def eval_params(self, state: DecoderState):
        """The parameters used for sampling: the UNet's EMA when there is one."""
        if state.ema is None:
            return state.params
        params = jax.tree.map(lambda x: x, state.params)
        params["unet"] = state.ema
        return params

    def sampler(self):
        """jitted (params, features, noise) -> uint8-range images [B,H,W,3] in [-1,1]."""
        if self._sample is None:
            e = self.config.eval
            sched_cfg = diffusion.SchedulerConfig.from_diffusers(dict(self.config.scheduler), sampler=e.sampler or None)
            schedule = diffusion.make_schedule(sched_cfg, e.steps)

            def run(params, feats, noise):
                model = nnx.merge(self.graphdef, params)
                out_hw = (noise.shape[1] * self.cfg.latent_factor, noise.shape[2] * self.cfg.latent_factor)
                cond = model.condition(feats, out_hw)
                latents = diffusion.sample(model.denoise, noise, schedule, sched_cfg, guidance_scale=e.guidance_scale,
                                           guidance_rescale=e.guidance_rescale, cond=cond,
                                           uncond=model.null_condition(cond))
                return model.vae.images_from_latents(latents)

            self._sample = reuse_programs(self._key + ("sampler",), lambda: _mesh_jit(run, self.mesh))
        return self._sample

    def decode_images(self, state: DecoderState, images_1x: np.ndarray, seed: int = 0) -> np.ndarray:
        """1x images [B,S,S,3] in [-1,1] -> their codes -> decoded 2x images (uint8)."""
        feats = self.features(jnp.asarray(images_1x))
        out_hw = (images_1x.shape[1] * self.cfg.scale, images_1x.shape[2] * self.cfg.scale)
        shape = self.cfg.latent_shape(images_1x.shape[0], out_hw)
        noise = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
        out = self.sampler()(self.eval_params(state), feats, noise)
        return images_lib.to_uint8(np.asarray(out))

    def decode_features(self, state: DecoderState, feats: jax.Array, image_hw: tuple[int, int],
                        seed: int = 0) -> np.ndarray:
        """Condition features (the DualViTok code map [B,h2,w2,C] of (h, w) = image_hw token
        images) -> images at `scale` x image_hw (uint8). The MLLM decodes its generated codes this
        way when a diffusion decoder is given."""
        h, w = image_hw
        shape = self.cfg.latent_shape(feats.shape[0], (h * self.cfg.scale, w * self.cfg.scale))
        noise = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
        return images_lib.to_uint8(np.asarray(self.sampler()(self.eval_params(state), feats, noise)))

    def evaluate(self, state: DecoderState, num: int | None = None) -> dict:
        c = self.config
        if not (num or c.eval.num_images):  # evaluation switched off (eval.num_images=0)
            return {}
        if self.phase == "vae":
            return self._evaluate_vae(state, num)
        num = num or c.eval.num_images
        src = images_lib.image_source(c.data, "validation", c.data.get("data_dir", ""), target_scale=self.cfg.scale)
        n = min(num, len(src))
        batch = c.eval.batch_size
        originals, decoded = [], []
        for start in range(0, n, batch):
            recs = [src[i] for i in range(start, min(start + batch, n))]
            x = np.stack([images_lib.to_model_range(images_lib.fit_resolution(r["image"], c.data.resolution))
                          for r in recs])
            pad = batch - len(x)
            if pad:
                x = np.concatenate([x, np.repeat(x[-1:], pad, 0)])
            decoded += list(self.decode_images(state, x, seed=start)[:len(recs)])
            originals += [r.get("target") if r.get("target") is not None else
                          images_lib.fit_resolution(r["image"], c.data.resolution * self.cfg.scale) for r in recs]
        # eval_scenes: how many scenes the figures are on (the first 128 of the split read ~0.035
        # under all 512 on the tiny decoder, README).
        out = {"val_psnr": recon_lib.psnr(np.stack(originals), np.stack(decoded)), "eval_scenes": n}
        if c.data.source == "shapecomp":
            det_kw = scorer.level_options(c.data.levels)
            out["decoder_agreement"], misses = recon_lib.agreement_and_misses(originals, decoded, **det_kw)
            out.update({f"decoder_miss_{r}": v for r, v in misses.items()})
        return out

    def _evaluate_vae(self, state: DecoderState, num: int | None) -> dict:
        c = self.config
        src = images_lib.image_source(c.data, "validation", c.data.get("data_dir", ""), target_scale=self.cfg.scale)
        n = min(num or c.eval.num_images, len(src))
        x = np.stack([images_lib.to_model_range(src[i]["target"] if src[i].get("target") is not None else
                                                images_lib.fit_resolution(src[i]["image"],
                                                                          c.data.resolution * self.cfg.scale))
                      for i in range(n)])
        graphdef = self.graphdef

        def rec_fn(params, x):
            vae = nnx.merge(graphdef, params).vae
            mean, _ = vae.encode(x)
            return vae.decode(mean), mean

        rec, mean = reuse_programs(self._key + ("vae-eval",), lambda: _mesh_jit(rec_fn, self.mesh))(
            state.params, jnp.asarray(x))
        orig_u8, rec_u8 = images_lib.to_uint8(x), images_lib.to_uint8(np.asarray(rec))
        out = {"val_psnr": recon_lib.psnr(orig_u8, rec_u8),
               "latent_std": float(np.std(np.asarray(mean)))}
        if c.data.source == "shapecomp":
            out["vae_agreement"], misses = recon_lib.agreement_and_misses(
                orig_u8, rec_u8, **scorer.level_options(c.data.levels))
            out.update({f"vae_miss_{r}": v for r, v in misses.items()})
        return out


def _windows(images: jax.Array, oy: jax.Array, ox: jax.Array, size: int) -> jax.Array:
    """The size x size window at (oy[b], ox[b]) of each image of [B,H,W,C]."""
    return jax.vmap(lambda im, y, x: jax.lax.dynamic_slice(im, (y, x, 0), (size, size, im.shape[-1])))(images, oy, ox)


def random_crops(images: jax.Array, size: int, rng: jax.Array) -> jax.Array:
    """One random size x size window per image of [B,H,W,C] (offsets drawn per image)."""
    B, H, W, _ = images.shape
    ky, kx = jax.random.split(rng)
    return _windows(images, jax.random.randint(ky, (B,), 0, H - size + 1),
                    jax.random.randint(kx, (B,), 0, W - size + 1), size)


def crop_with_codes(target: jax.Array, feats: jax.Array, crop: int, latent_factor: int, rng: jax.Array):
    """Random crop x crop windows of the 2x targets and, for a code map, the code cells under
    each window (offsets on the grid where code cells and latent pixels both align), so a
    UNet trained on crops sees exactly the conditioning it gets at full size, window by window.
    A semantic-feature context (illume) is global and stays whole."""
    B, H, W, _ = target.shape
    if feats.ndim != 4:
        return random_crops(target, crop, rng), feats
    cell = H // feats.shape[1]
    step = math.lcm(cell, latent_factor)
    if crop % step:
        raise ValueError(f"train.crop={crop}: expected a multiple of {step} (the code cells are {cell} output "
                         f"pixels, the latent pixels {latent_factor})")
    ky, kx = jax.random.split(rng)
    oy = jax.random.randint(ky, (B,), 0, (H - crop) // step + 1) * step
    ox = jax.random.randint(kx, (B,), 0, (W - crop) // step + 1) * step
    return _windows(target, oy, ox, crop), _windows(feats, oy // cell, ox // cell, crop // cell)


# -- VAE weights between phases ------------------------------------------------------------------------

def save_vae(vae_module, path: str, scaling_factor: float) -> None:
    path = os.path.abspath(path)
    ckpt_lib.save_tree(path, nnx.state(vae_module, nnx.Param))
    with open(os.path.join(os.path.dirname(path), "latent_scaling.json"), "w") as f:
        json.dump({"scaling_factor": scaling_factor}, f)


def load_vae(vae_module, path: str) -> None:
    """VAE parameters from an Orbax folder (phase 1's `final_vae`, or a converted diffusers VAE)."""
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise ValueError(f"no VAE weights at {path}: run the vae phase (config.vae_train.steps > 0) or set "
                         "config.model_init.vae_from to a converted VAE")
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)),
                            nnx.state(vae_module, nnx.Param))
    nnx.update(vae_module, ckpt_lib.restore_tree(path, abstract))


# -- the command ------------------------------------------------------------------------------------------

def _iterator(config: Any, batch_size: int, scale: int, seed: int):
    src = images_lib.image_source(config.data, "train", config.data.get("data_dir", ""), target_scale=scale)
    return images_lib.make_image_iterator(src, batch_size=batch_size, resolution=config.data.resolution, seed=seed,
                                          process_index=jax.process_index(), process_count=jax.process_count(),
                                          num_workers=config.data.num_workers, target_scale=scale)


def _with_eval_overrides(config, overrides: dict | None):
    """`config` with its eval block updated, before any trainer is built (the program cache keys on
    the config); a key the eval block lacks is refused by name rather than ignored."""
    unknown = set(overrides or {}) - set(config.eval.keys())
    if unknown:
        raise ValueError(f"eval_overrides {sorted(unknown)}: not keys of the decoder's eval config "
                         f"({sorted(config.eval.keys())})")
    config.eval.update(overrides or {})
    return config


def load_decoder(workdir: str, mesh, *, with_tokenizer: bool = False,
                 eval_overrides: dict | None = None) -> tuple[DecoderTrainer, DecoderState]:
    """A trained diffusion decoder (its UNet phase's latest checkpoint and config) for sampling.
    with_tokenizer: also load its frozen tokenizer, so `decode_images` can start from images (the
    MLLM passes code maps to `decode_features` and needs none). eval_overrides: keys of the
    config's `eval` block (guidance_scale, steps, sampler) to sample with instead of the saved ones."""
    import ml_collections as mlc

    from illume_jax.convert import weights
    workdir = os.path.abspath(workdir)
    if weights.is_converted(workdir):  # the official SDXL decoder, converted
        weights.check_kind(workdir, ("sdxl-decoder",), "diffusion decoder folder")
        config = _with_eval_overrides(weights.read_config(workdir), eval_overrides)
        trainer = DecoderTrainer(config, workdir, mesh, "unet")
        params, _ = weights.restore(workdir, trainer.abstract.params)
        return trainer, DecoderState(step=jnp.zeros((), jnp.int32), params=params, opt_state=None, ema=None,
                                     rng=jax.random.key_data(jax.random.key(config.seed)))
    ckpt = ckpt_lib.Checkpointer(os.path.join(unet_dir(workdir), "checkpoints"), async_save=False)
    step = ckpt.latest_step()
    if step is None:
        ckpt.close()
        raise ValueError(f"no trained diffusion decoder in {workdir} (no UNet checkpoint): run train-decoder first")
    try:
        config = _with_eval_overrides(mlc.ConfigDict(json.loads(ckpt.restore_meta(step)["config"])), eval_overrides)
    except ValueError:
        ckpt.close()
        raise
    trainer = DecoderTrainer(config, workdir, mesh, "unet",
                             tokenizer=FrozenTokenizer(config, mesh) if with_tokenizer else None)
    state = ckpt.restore_fields(step, trainer.abstract, ("step", "params", "ema", "rng"))  # no optimizer state
    ckpt.close()
    return trainer, state


def evaluate_checkpoint(workdir: str, *, num: int | None = None, mesh=None,
                        eval_overrides: dict | None = None) -> tuple[dict, str]:
    """Scores the latest UNet checkpoint in `workdir` as training's evaluation does (EMA weights,
    the same noise seeds per scene), on the first `num` validation scenes (default the config's
    eval.num_images), and writes the row to <workdir>/unet/eval_step<S>[_<overrides>].json:
    (row, path). Training evaluates few scenes to stay cheap; this gives a finished run its figure
    on the whole split, or under another guidance scale / sampler / step count (eval_overrides)."""
    if num is not None and num <= 0:  # before anything is loaded
        raise ValueError(f"eval-decoder: --num={num}; expected a positive number of validation scenes")
    workdir = os.path.abspath(workdir)
    mesh = mesh or sharding.make_mesh({"data": -1})
    trainer, state = load_decoder(workdir, mesh, with_tokenizer=True, eval_overrides=eval_overrides)
    step = int(state.step)
    e = trainer.config.eval
    row = dict(step=step, guidance_scale=e.guidance_scale, sampler_steps=e.steps,
               sampler=e.sampler or trainer.config.scheduler["_class_name"], **trainer.evaluate(state, num=num))
    suffix = "".join(f"_{k}{v}" for k, v in sorted((eval_overrides or {}).items()))
    path = os.path.join(unet_dir(workdir), f"eval_step{step}{suffix}.json")
    with open(path, "w") as f:
        json.dump(row, f, indent=1)
    return row, path


def train_decoder(config: Any, workdir: str, *, mesh=None, stop_after_steps: int | None = None) -> dict:
    """Runs (or resumes) the VAE phase (if configured) and the UNet phase; returns their final rows."""
    workdir = os.path.abspath(workdir)
    mesh = mesh or sharding.make_mesh(dict(config.mesh))
    summary: dict = {}
    scale = int(config.model.get("scale", 2))
    if config.vae_train.steps > 0:
        _check_batch("vae_train.batch_size", config.vae_train.batch_size, mesh)
        vt = DecoderTrainer(config, workdir, mesh, "vae")
        out = run_phase("vae", vae_dir(workdir), mesh=mesh, steps=config.vae_train.steps, abstract_state=vt.abstract,
                        init_state=vt.init_state, step_fn=vt.step,
                        iterator=_iterator(config, config.vae_train.batch_size, scale, config.seed + 2),
                        checkpoint=config.checkpoint, log_every=config.log_every, config_json=config.to_json(),
                        eval_fn=lambda s, _: vt.evaluate(s), eval_every=int(config.vae_train.get("eval_every", 0)),
                        stop_after_steps=stop_after_steps)
        summary["vae"] = {k: v for k, v in out.items() if k != "state"}
        if out["preempted"]:
            return dict(summary, preempted=True)
        if not os.path.exists(final_vae_path(workdir)):
            std = out.get("latent_std") or vt.evaluate(out["state"], num=64)["latent_std"]
            model = nnx.merge(vt.graphdef, out["state"].params)
            save_vae(model.vae, final_vae_path(workdir), scaling_factor=float(1.0 / max(std, 1e-6)))
    _check_batch("train.batch_size", config.train.batch_size, mesh)
    tokenizer = FrozenTokenizer(config, mesh)
    if tokenizer.resolution != config.data.resolution:
        raise ValueError(f"config.data.resolution={config.data.resolution} differs from the tokenizer's "
                         f"{tokenizer.resolution} (config.tokenizer.data.resolution)")
    ut = DecoderTrainer(config, workdir, mesh, "unet", tokenizer)
    out = run_phase("unet", unet_dir(workdir), mesh=mesh, steps=config.train.steps, abstract_state=ut.abstract,
                    init_state=ut.init_state, step_fn=ut.step,
                    iterator=_iterator(config, config.train.batch_size, scale, config.seed + 3),
                    checkpoint=config.checkpoint, log_every=config.log_every, config_json=config.to_json(),
                    eval_fn=lambda s, _: ut.evaluate(s), eval_every=config.train.eval_every,
                    stop_after_steps=stop_after_steps)
    summary["unet"] = {k: v for k, v in out.items() if k != "state"}
    return dict(summary, preempted=out["preempted"], state=out["state"], trainer=ut)
