"""Vision-tokenizer training: `python -m illume_jax train-tokenizer --config=configs/dualvitok.py:size=tiny`.

Two phases, each resumable in its own folder of the workdir:
  1. vit_pretrain  (tiny scale, `config.vit_pretrain.steps > 0`): the tokenizer's semantic ViT
     is trained contrastively (SigLIP sigmoid loss) against a small text tower on ShapeComp
     captions, so its features are text-aligned the way Qwen2-VL's or CLIP's are; optionally
     with a captioning loss and a dense per-token loss (each token names its object's shape and
     colour, `vit_pretrain.dense_weight`). Official shapes skip it and load the released ViT.
  2. tokenizer     DualViTok (ILLUME+) or the semantic VQ tokenizer (ILLUME), spec §1.10 / §5.1:
     generator loss = l2 + perceptual + d_w * hinge-GAN + commitment + semantic cosine /
     feature reconstruction (weights in `train.loss_weights`); a PatchGAN discriminator with
     its own Adam, switched on at `train.disc_start`; the semantic ViT frozen.
Frozen SimVQ codebooks and EMA statistics are NNX `Buffer` variables: outside the optimizer,
carried in the state and checkpointed with it.
"""
from __future__ import annotations

import os
import re
import types
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
from illume_jax.modules import quantizers
from illume_jax.train import optim
from illume_jax.train import checkpoint as ckpt_lib
from illume_jax.train.phase import run_phase
from illume_jax.train.state import shardings_like_params
from illume_jax.train.step import InitProgram, MeshJit, abstract_module, mesh_key, reuse_programs


@struct.dataclass
class TokenizerState:
    step: jax.Array
    params: Any          # nnx.Param state (frozen parts included; they get no update and no Adam state)
    buffers: Any         # every other variable: frozen codebooks, EMA statistics (None if none)
    opt_state: Any
    disc_params: Any     # PatchGAN parameters (None without a discriminator)
    disc_opt_state: Any
    rng: jax.Array       # raw PRNG key data
    code_age: Any = None  # codebook name -> int32 [K] steps since each code was chosen (dead-code restarts)


# -- construction -------------------------------------------------------------------------------

def make_model(model_cfg: Any, rngs: nnx.Rngs):
    """The tokenizer a config's `model` block describes (`kind`: dualvitok | semantic_vq)."""
    if model_cfg.kind == "dualvitok":
        from illume_jax.models.dualvitok import DualViTok, DualViTokConfig
        return DualViTok(DualViTokConfig.from_config(model_cfg), rngs=rngs)
    if model_cfg.kind == "semantic_vq":
        from illume_jax.models.semantic_vq import SemanticVQ, SemanticVQConfig
        return SemanticVQ(SemanticVQConfig.from_config(model_cfg), rngs=rngs)
    raise ValueError(f"config.model.kind={model_cfg.kind!r}: expected 'dualvitok' or 'semantic_vq'")


def _adam(t: Any, name: str = "tokenizer") -> optax.GradientTransformation:
    # The official trainer configures weight decay but never hands it to torch Adam (spec §5.1);
    # we apply what the config says (0 by default = what the official run did). The official LR is
    # constant after warm-up; `schedule` = cosine | linear decays it to lr * end_lr_ratio at `steps`.
    sched = optim.schedule(types.SimpleNamespace(
        name=name, lr=t.lr, warmup_steps=max(int(t.warmup_steps), 1), steps=t.steps,
        schedule=getattr(t, "schedule", "constant"), end_lr_ratio=getattr(t, "end_lr_ratio", 1.0)))
    chain = [optax.clip_by_global_norm(t.clip_norm)] if t.clip_norm > 0 else []
    chain.append(optax.adamw(sched, b1=t.b1, b2=t.b2, eps=1e-8, weight_decay=t.weight_decay))
    return optax.chain(*chain)


class _Stage:
    """The fields `optim.param_labels` reads from a stage config."""

    def __init__(self, name: str, trainable: tuple[str, ...]):
        self.name, self.trainable, self.lr_multipliers = name, tuple(trainable), ()


def _masked(tx: optax.GradientTransformation, params, trainable, name: str) -> optax.GradientTransformation:
    """`tx` on parameters matching a `trainable` regex; frozen ones get no update and no state."""
    labels = optim.param_labels(params, _Stage(name, trainable))
    return optax.chain(optim.zero_frozen(labels, {"frozen", "lr0"}),
                       optax.multi_transform({"frozen": optax.set_to_zero(), "lr0": tx}, labels))


def _shardings(abs_state, mesh, *param_trees):
    """Shardings for every leaf of a state: parameter-like leaves (optimizer moments included)
    follow their parameter, the rest is replicated. Returns (abstract state with them, shardings)."""
    with sharding.use_mesh(mesh):
        param_sh = [nnx.get_named_sharding(t, mesh) for t in param_trees if t is not None]
    out = shardings_like_params(abs_state, param_sh, mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_state, out)
    return abstract, out


def _mesh_jit(fn, mesh, **kw) -> MeshJit:
    return MeshJit(jax.jit(fn, **kw), mesh)


# -- phase 1: contrastive pre-training of the semantic ViT ------------------------------------------

def pretrain_dir(workdir: str) -> str:
    return os.path.join(workdir, "vit_pretrain")


def pretrained_vit_path(workdir: str) -> str:
    return os.path.join(pretrain_dir(workdir), "final_vit")


def _check_batch(key: str, batch_size: int, mesh) -> None:
    """The batch is split over the data-parallel devices; say so before XLA does, less clearly."""
    n = sharding.data_parallel_size(mesh)
    if batch_size % n:
        raise ValueError(f"config.{key}={batch_size} must be a multiple of the {n} data-parallel devices "
                         f"(mesh {dict(mesh.shape)})")


def pretrain_vit(config: Any, workdir: str, mesh, *, stop_after_steps: int | None = None) -> dict:
    """SigLIP pre-training of the semantic ViT on ShapeComp captions; saves the final ViT
    parameters to `<workdir>/vit_pretrain/final_vit` for the tokenizer phase."""
    from illume_jax.models import siglip
    p = config.vit_pretrain
    twins = int(p.get("shape_twins", 0))
    if twins < 0 or p.batch_size % (1 + twins):
        raise ValueError(f"config.vit_pretrain.batch_size={p.batch_size}, shape_twins={twins}: expected "
                         f"shape_twins >= 0 and a batch that is a multiple of 1 + shape_twins = {1 + twins} "
                         "(each scene comes with its twins)")
    # With k twins a record carries 1 + k images, so batch_size / (1 + k) records make batch_size images.
    records = p.batch_size // (1 + twins)
    _check_batch("vit_pretrain.batch_size" + (f" / {1 + twins} (shape_twins)" if twins else ""), records, mesh)
    if config.data.source != "shapecomp":
        raise ValueError("config.vit_pretrain.steps > 0 needs captions: config.data.source must be 'shapecomp'")
    vocab = images_lib.CaptionVocab(config.data.levels)
    make = lambda: siglip.SigLIP(config, len(vocab), rngs=nnx.Rngs(config.seed))  # noqa: E731
    with sharding.use_mesh(mesh):
        graphdef, abs_params = nnx.split(nnx.eval_shape(make), nnx.Param)
    tx = _adam(p, "vit_pretrain")

    def fresh(params):
        return TokenizerState(step=jnp.zeros((), jnp.int32), params=params, buffers=None, opt_state=tx.init(params),
                              disc_params=None, disc_opt_state=None,
                              rng=jax.random.key_data(jax.random.key(config.seed)))

    abs_state, out_sh = _shardings(jax.eval_shape(fresh, abs_params), mesh, abs_params)
    init = InitProgram(lambda: fresh(nnx.state(make(), nnx.Param)), mesh, out_sh, abs_state)

    def step(state: TokenizerState, batch):
        images, text = batch["image"], batch["text"]
        if twins:  # the twins join the batch: each is a negative of its scene and of every other caption
            images = jnp.concatenate([images, batch["twin_image"].reshape((-1,) + images.shape[1:])], axis=0)
            text = jnp.concatenate([text, batch["twin_text"].reshape((-1,) + text.shape[1:])], axis=0)

        def loss_fn(params):
            return nnx.merge(graphdef, params).loss(images, text, batch.get("cell_shape"), batch.get("cell_color"))
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        return (state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              opt_state=opt_state),
                dict(metrics, loss=loss, images=jnp.asarray(images.shape[0], jnp.float32)))

    jitted = _mesh_jit(step, mesh, out_shardings=(out_sh, None), donate_argnums=(0,))
    dense = float(p.get("dense_weight", 0.0)) > 0  # per-cell labels over the ViT's token grid
    src = images_lib.ShapeCompImages(config.data.levels, "train", config.data.num_examples, shape_twins=twins,
                                     dense_captions=float(p.get("caption_weight", 0.0)) > 0,
                                     cell_grid=siglip.token_grid(config) if dense else None)
    it = images_lib.make_image_iterator(src, batch_size=records, resolution=config.data.resolution,
                                        seed=config.seed + 1, process_index=jax.process_index(),
                                        process_count=jax.process_count(), vocab=vocab, text_len=p.text_len,
                                        num_workers=config.data.num_workers)

    def evaluate(state, _):
        return siglip.retrieval_accuracy(nnx.merge(graphdef, state.params), config, vocab)

    out = run_phase("vit_pretrain", pretrain_dir(workdir), mesh=mesh, steps=p.steps, abstract_state=abs_state,
                    init_state=init, step_fn=lambda s, b, _: jitted(s, b), iterator=it,
                    checkpoint=config.checkpoint, log_every=config.log_every, config_json=config.to_json(),
                    eval_fn=evaluate, stop_after_steps=stop_after_steps)
    if not out["preempted"] and not os.path.exists(pretrained_vit_path(workdir)):
        vit_params = nnx.state(nnx.merge(graphdef, out["state"].params).vit, nnx.Param)
        ckpt_lib.save_tree(pretrained_vit_path(workdir), vit_params)
    return out


def load_pretrained_vit(vit_module, workdir: str) -> None:
    """Loads phase 1's ViT into `vit_module` (same architecture)."""
    path = os.path.abspath(pretrained_vit_path(workdir))
    if not os.path.exists(path):
        raise ValueError(f"no pre-trained ViT at {path}: run train-tokenizer (it pre-trains the ViT first) or set "
                         "config.vit_pretrain.steps=0")
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)),
                            nnx.state(vit_module, nnx.Param))
    nnx.update(vit_module, ckpt_lib.restore_tree(path, abstract))


# -- perceptual losses ---------------------------------------------------------------------------------

def make_perceptual(config: Any, workdir: str, mesh):
    """(fn(pparams, x, y) -> scalar, pparams), or (None, None) for `train.perceptual='none'`.

    'lpips_vgg': LPIPS with VGG16 weights from `train.lpips_path` (the official loss; the file is
      converted from the public PyTorch weights, see `illume_jax/models/lpips.py`).
    'vit': the frozen, contrastively pre-trained semantic ViT of phase 1 (the offline default at
      tiny scale): LPIPS-style distance of its channel-normalised token features. It was trained
      on this world's images and captions, so it measures the differences the scorer and the
      MLLM care about (colour, shape, place), which an ImageNet VGG could not do better here.
    """
    kind = config.train.perceptual
    if kind == "none":
        return None, None
    with sharding.use_mesh(mesh):
        if kind == "lpips_vgg":
            from illume_jax.models import lpips
            net = lpips.LPIPS(rngs=nnx.Rngs(0))
            lpips.load_weights(net, config.train.lpips_path)
            graphdef, pparams = nnx.split(net, nnx.Param)
            return (lambda p, x, y: nnx.merge(graphdef, p)(x, y).mean()), pparams
        if kind == "vit":
            from illume_jax.models import siglip
            vit_module = siglip._vit_for(config, nnx.Rngs(config.seed))
            load_pretrained_vit(vit_module, perceptual_vit_dir(config, workdir))
            graphdef, pparams = nnx.split(vit_module, nnx.Param)
            return (lambda p, x, y: siglip.feature_distance(nnx.merge(graphdef, p), x, y, config)), pparams
    raise ValueError(f"config.train.perceptual={kind!r}: expected 'none', 'vit' or 'lpips_vgg'")


# -- phase 2: the tokenizer ---------------------------------------------------------------------------

def tokenizer_dir(workdir: str) -> str:
    return os.path.join(workdir, "tokenizer")


def _latest_tokenizer_step(workdir: str) -> int | None:
    directory = os.path.join(tokenizer_dir(os.path.abspath(workdir)), "checkpoints")
    if not os.path.isdir(directory):
        return None
    ckpt = ckpt_lib.Checkpointer(directory, async_save=False)
    step = ckpt.latest_step()
    ckpt.close()
    return step


def is_tokenizer_run(path: str) -> bool:
    """Whether `path` is a train-tokenizer workdir with at least one tokenizer checkpoint."""
    return bool(path) and _latest_tokenizer_step(path) is not None


def perceptual_vit_dir(config: Any, workdir: str) -> str:
    """Where the 'vit' perceptual loss reads its phase-1 ViT: model_init.vit_from, else the run
    that model_init.weights_from fine-tunes, else this workdir."""
    weights_from = config.model_init.get("weights_from", "")
    if config.model_init.vit_from:
        return config.model_init.vit_from
    return weights_from if weights_from and is_tokenizer_run(weights_from) else workdir


def restore_run_weights(config: Any, run: str, fresh: TokenizerState, mesh) -> tuple[Any, Any]:
    """(params, buffers) for a run that fine-tunes the train-tokenizer workdir `run`: every
    variable from run's latest checkpoint except those matching a `model_init.reinit` regex, which
    keep their fresh initialisation from `fresh` (a new, wider pixel decoder on a trained encoder,
    say). Without reinit the run's model config must equal config.model; with it, every variable
    that is not re-initialised must exist there with the same shape. Mismatches are named."""
    from illume_jax.train.optim import path_str
    reinit = [re.compile(p) for p in config.model_init.get("reinit", ())]
    source = saved_config(run)
    if source is None:
        raise ValueError(f"config.model_init.weights_from={run!r}: its latest tokenizer checkpoint has no saved config")
    mine, theirs = _flat_model(config), _flat_model(source)
    diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if not reinit and diff:
        raise ValueError(f"config.model_init.weights_from={run!r} was trained with a different model: "
                         + ", ".join(f"model.{k}={theirs.get(k)!r} there, {mine.get(k)!r} here" for k in diff[:6])
                         + " (model_init.reinit names the variables to initialise afresh)")
    src_trainer = TokenizerTrainer(source, run, mesh, training=False)
    ckpt = ckpt_lib.Checkpointer(os.path.join(tokenizer_dir(os.path.abspath(run)), "checkpoints"), async_save=False)
    try:
        got = ckpt.restore_fields(_latest_tokenizer_step(run), src_trainer.abstract, ("params", "buffers"))
    finally:
        ckpt.close()
    if not reinit:
        return got.params, got.buffers

    def merge(fresh_tree, loaded_tree, what):
        loaded = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(loaded_tree)[0]}
        flat, treedef = jax.tree_util.tree_flatten_with_path(fresh_tree)
        out, problems = [], []
        for p, x in flat:
            name = path_str(p)
            if any(r.search(name) for r in reinit):
                out.append(x)
            elif name not in loaded or loaded[name].shape != x.shape:
                problems.append(f"{what} {name} {tuple(x.shape)}: "
                                + (f"{tuple(loaded[name].shape)} in the run" if name in loaded else "not in the run"))
                out.append(x)
            else:
                out.append(jax.device_put(loaded[name], x.sharding))
        if problems:
            raise ValueError(f"config.model_init.weights_from={run!r} cannot fill these variables (add them to "
                             "model_init.reinit to initialise them afresh): " + "; ".join(problems[:6]))
        return jax.tree_util.tree_unflatten(treedef, out)

    return merge(fresh.params, got.params, "param"), merge(fresh.buffers, got.buffers, "buffer")


# Model keys that choose how to compute, not what the weights are: a run trained with the 'xla'
# attention kernel (or before the key existed) fine-tunes under a config that picks 'cpu'.
COMPUTE_ONLY_KEYS = ("attention", "remat", "splash_interpret")


def _flat_model(config: Any) -> dict:
    """config.model as {'a.b': value}, lists as tuples (a saved config comes back from JSON),
    without the COMPUTE_ONLY_KEYS."""
    from flax import traverse_util
    flat = traverse_util.flatten_dict(config.model.to_dict(), sep=".")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in flat.items()
            if k.rsplit(".", 1)[-1] not in COMPUTE_ONLY_KEYS}


class TokenizerTrainer:
    """Builds the model, optimizers and jitted steps of the tokenizer phase for a config."""

    def __init__(self, config: Any, workdir: str, mesh, *, training: bool = True):
        """`training=False` (encoding, evaluation, loading) skips the perceptual network."""
        self.config, self.workdir, self.mesh = config, workdir, mesh
        t = config.train
        make = lambda: make_model(config.model, nnx.Rngs(config.seed))  # noqa: E731
        abstract_model = abstract_module(("tokenizer", config.model.to_json(), config.seed), make, mesh)
        self.graphdef, abs_params, abs_buffers = nnx.split(abstract_model, nnx.Param, ...)
        self.codebook_sizes = abstract_model.codebook_sizes
        self.tx = _masked(_adam(t), abs_params, t.trainable, "tokenizer")
        self.frozen = optim.frozen_mask(abs_params, _Stage("tokenizer", t.trainable))
        self.use_disc = t.disc_start >= 0
        if self.use_disc:
            from illume_jax.models.patchgan import PatchGAN
            make_disc = lambda: PatchGAN(3, t.disc_ndf, t.disc_layers, rngs=nnx.Rngs(config.seed + 7))  # noqa: E731
            with sharding.use_mesh(mesh):
                self.disc_graphdef, abs_disc = nnx.split(nnx.eval_shape(make_disc), nnx.Param)
            self.disc_tx = _adam(t, "discriminator")
        else:
            make_disc, abs_disc = None, None
        self.perceptual, self.pparams = make_perceptual(config, workdir, mesh) if training else (None, None)
        weights = dict(t.loss_weights)
        self.weights = weights
        # Dead-code restarts: a code unused for `patience` steps is moved onto an encoder output
        # (off = 0; older configs have no such field).
        self.restart_patience = int(t.get("dead_code_patience", 0))
        self.restart_until = int(t.get("dead_code_until", 0)) or int(t.steps)

        def fresh(params, buffers, disc):
            age = ({k: jnp.zeros((n,), jnp.int32) for k, n in self.codebook_sizes.items()}
                   if self.restart_patience > 0 else None)
            return TokenizerState(
                step=jnp.zeros((), jnp.int32), params=params, buffers=buffers, opt_state=self.tx.init(params),
                disc_params=disc, disc_opt_state=self.disc_tx.init(disc) if disc is not None else None,
                rng=jax.random.key_data(jax.random.key(config.seed)), code_age=age)

        self.abstract, out_sh = _shardings(jax.eval_shape(fresh, abs_params, abs_buffers, abs_disc), mesh,
                                           abs_params, abs_buffers, abs_disc)
        self.out_shardings = out_sh

        def init():
            model = make()
            _, params, buffers = nnx.split(model, nnx.Param, ...)
            disc = nnx.state(make_disc(), nnx.Param) if make_disc is not None else None
            return fresh(params, buffers, disc)

        # Programs are functions of the config and mesh only (weights are arguments); the steps
        # also of `training` (the perceptual network).
        key = ("tokenizer", config.to_json(), mesh_key(mesh))
        self._init, self._forward, self._unquantized = reuse_programs(key, lambda: (
            InitProgram(init, mesh, out_sh, self.abstract),
            _mesh_jit(self._eval_forward, mesh), _mesh_jit(self._eval_unquantized, mesh)))
        self._steps = reuse_programs(key + ("steps", training), lambda: {
            d: _mesh_jit(self._make_step(d), mesh, out_shardings=(out_sh, None), donate_argnums=(0,))
            for d in ((False, True) if self.use_disc else (False,))})

    # -- state -------------------------------------------------------------------------------------
    def init_state(self) -> TokenizerState:
        state = self._init()
        weights_from = self.config.model_init.get("weights_from", "")
        if weights_from and is_tokenizer_run(weights_from):
            # Fine-tuning one of our runs (say a GAN phase after an L2 + perceptual one): its model
            # weights, frozen ViT and codebooks included; a fresh optimizer, discriminator and code ages.
            params, buffers = restore_run_weights(self.config, weights_from, state, self.mesh)
            return state.replace(params=params, buffers=buffers)
        if weights_from:  # fine-tuning converted official weights: every variable comes from there
            from illume_jax.convert import weights
            weights.check_kind(weights_from, ("dualvitok",), "config.model_init.weights_from")
            params, buffers = weights.restore(weights_from, self.abstract.params, self.abstract.buffers)
            return state.replace(params=params, buffers=buffers)
        vit_path = self._vit_source()
        if vit_path is not None:  # the frozen semantic ViT comes from phase 1 (or a given folder)
            model = nnx.merge(self.graphdef, state.params, state.buffers)
            load_pretrained_vit(model.semantic_vit(), vit_path)
            state = state.replace(params=nnx.state(model, nnx.Param))
        return state

    def _vit_source(self) -> str | None:
        if self.config.model_init.vit_from:
            return self.config.model_init.vit_from
        return self.workdir if self.config.vit_pretrain.steps > 0 else None

    # -- steps ---------------------------------------------------------------------------------------
    def _generator_terms(self, params, buffers, disc_params, pparams, images, rng, disc_on: bool):
        model = nnx.merge(self.graphdef, params, buffers)
        out = model(images, train=True, rng=rng)
        terms = dict(out.losses)
        if out.recon is not None:
            rec = out.recon.astype(jnp.float32)
            terms["l2"] = jnp.mean((images - rec) ** 2)
            if self.weights.get("l1", 0.0) > 0:  # taming-VQGAN's pixel loss; the median keeps edges sharper
                terms["l1"] = jnp.mean(jnp.abs(images - rec))
            if self.perceptual is not None:
                terms["perceptual"] = self.perceptual(pparams, images, rec)
            if disc_on:
                from illume_jax.models.patchgan import hinge_g_loss
                terms["gan"] = hinge_g_loss(nnx.merge(self.disc_graphdef, disc_params)(rec))
        missing = sorted(set(terms) - set(self.weights))
        if missing:
            raise ValueError(f"config.train.loss_weights has no weight for the losses {missing} "
                             f"(it has {sorted(self.weights)})")
        total = sum(self.weights[k] * v for k, v in terms.items())
        _, _, new_buffers = nnx.split(model, nnx.Param, ...)  # EMA statistics may have moved
        return total, (terms, new_buffers, out)

    def _make_step(self, disc_on: bool):
        def step(state: TokenizerState, batch, pparams):
            images = batch["image"]
            rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
            (loss, (terms, buffers, out)), grads = jax.value_and_grad(self._generator_terms, has_aux=True)(
                state.params, state.buffers, state.disc_params, pparams, images, rng, disc_on)
            grads = optim.drop_frozen(grads, self.frozen)  # e.g. a frozen encoder's backward is dropped
            updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            metrics = dict(terms, loss=loss, grad_norm=optax.tree.norm(grads),
                           images=jnp.asarray(images.shape[0], jnp.float32))
            for name, size in self.codebook_sizes.items():
                counts = quantizers.code_counts(out.codes[name], size)
                metrics[f"{name}_usage_batch"] = quantizers.usage(counts)
                metrics[f"{name}_perplexity"] = quantizers.perplexity(counts)
            new = state.replace(step=state.step + 1, params=params, buffers=buffers, opt_state=opt_state)
            if self.restart_patience > 0:
                new = self._restart_dead_codes(new, state, out, jax.random.fold_in(rng, 1), metrics)
            if disc_on:
                from illume_jax.models.patchgan import hinge_d_loss
                fake = jax.lax.stop_gradient(out.recon.astype(jnp.float32))

                def d_loss_fn(dp):
                    d = nnx.merge(self.disc_graphdef, dp)
                    # One d_w for both sides, as the official loss: loss_weights.gan.
                    return self.weights["gan"] * hinge_d_loss(d(images), d(fake))
                d_loss, d_grads = jax.value_and_grad(d_loss_fn)(state.disc_params)
                d_updates, d_opt = self.disc_tx.update(d_grads, state.disc_opt_state, state.disc_params)
                new = new.replace(disc_params=optax.apply_updates(state.disc_params, d_updates), disc_opt_state=d_opt)
                metrics["disc_loss"] = d_loss
            if out.recon is not None:
                rec = jnp.clip(out.recon.astype(jnp.float32), -1, 1)
                mse = jnp.mean(((images - rec) / 2.0) ** 2)
                metrics["psnr"] = -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))
            return new, metrics

        return step

    def _restart_dead_codes(self, new: TokenizerState, old: TokenizerState, out, key, metrics) -> TokenizerState:
        """Codes no image of the last `dead_code_patience` steps chose are moved onto this batch's
        worst-served encoder outputs (drawn by quantisation error), until `dead_code_until`.
        Applied after the optimizer update, so a SimVQ code lands exactly on its vector under the
        new transform. Not in the official recipe: at tiny scale the books otherwise settle with a
        third or more of their codes never used (README, tokenizer section)."""
        model = nnx.merge(self.graphdef, new.params, new.buffers)
        ages = {}
        for i, (name, quantizer) in enumerate(model.quantizers.items()):
            codes = out.codes[name].reshape(-1)
            z = jax.lax.stop_gradient(out.latents[name]).astype(jnp.float32)
            z = z.reshape(-1, z.shape[-1])
            counts = quantizers.code_counts(codes, self.codebook_sizes[name])
            ages[name], dead = quantizers.update_code_age(old.code_age[name], counts, self.restart_patience,
                                                          old.step < self.restart_until)
            err = jax.lax.stop_gradient(quantizer.squared_error(z, codes))
            vectors = quantizers.restart_candidates(z, err, jax.random.fold_in(key, i), self.codebook_sizes[name])
            quantizer.replace_codes(dead, vectors)
            metrics[f"{name}_restarted"] = jnp.sum(dead).astype(jnp.float32)
        _, params, buffers = nnx.split(model, nnx.Param, ...)
        return new.replace(params=params, buffers=buffers, code_age=ages)

    def step(self, state: TokenizerState, batch: dict, host_step: int):
        disc_on = self.use_disc and host_step >= self.config.train.disc_start
        return self._steps[disc_on](state, batch, self.pparams)

    # -- evaluation ------------------------------------------------------------------------------------
    def _eval_forward(self, params, buffers, images):
        model = nnx.merge(self.graphdef, params, buffers)
        out = model(images, train=False)
        return out.recon, out.codes

    def _eval_unquantized(self, params, buffers, images):
        return nnx.merge(self.graphdef, params, buffers).reconstruct_unquantized(images)

    def reconstruct(self, state: TokenizerState, images: np.ndarray):
        return self._forward(state.params, state.buffers, jnp.asarray(images))

    def evaluate(self, state: TokenizerState, num: int | None = None, batch: int = 64, *,
                 unquantized: bool = False, edit_pairs: int | None = None) -> dict:
        """Validation: PSNR, SSIM, codebook usage / perplexity over all codes produced, and on
        ShapeComp the scorer agreement between originals and reconstructions (tokenizer ceiling)
        and the editing ceiling on `edit_pairs` held-out pairs per level (default
        config.train.eval_edit_pairs; `recon.edit_ceiling`).
        `unquantized`: also the same figures for images decoded with the quantisers bypassed
        (`unquantized_*`): if they are no better, the encoder/decoder limit the ceiling, not the
        codebooks."""
        c = self.config
        num = num or c.train.eval_images
        src = images_lib.image_source(c.data, "validation", c.data.get("data_dir", ""))
        n = min(num, len(src))
        originals, recons, bypassed = [], [], []
        counts = {k: np.zeros(v, np.int64) for k, v in self.codebook_sizes.items()}
        # On ShapeComp, also per kind of cell: a flat canvas written with many codes ("synonyms") is
        # one more thing a generator must guess (README, "Told where it draws").
        by_kind = {(k, kind): np.zeros(v, np.int64) for k, v in self.codebook_sizes.items()
                   for kind in ("object", "background")} if c.data.source == "shapecomp" else {}
        for start in range(0, n, batch):
            recs = [src[i] for i in range(start, min(start + batch, n))]
            imgs = [images_lib.fit_resolution(r["image"], c.data.resolution) for r in recs if r["image"] is not None]
            x = np.stack([images_lib.to_model_range(i) for i in imgs])
            pad = batch - len(x) if len(x) < batch and start > 0 else 0
            if pad:  # keep one compiled shape
                x = np.concatenate([x, np.repeat(x[-1:], pad, 0)])
            rec, codes = self.reconstruct(state, x)
            for k in counts:
                grid = np.asarray(codes[k])[:len(imgs)]
                counts[k] += np.bincount(grid.ravel(), minlength=counts[k].size)
                if by_kind:
                    _count_codes_by_cell_kind(by_kind, k, grid, imgs)
            if rec is not None:
                recons += list(images_lib.to_uint8(np.asarray(rec)[:len(imgs)]))
                if unquantized:
                    rec_u = self._unquantized(state.params, state.buffers, jnp.asarray(x))
                    bypassed += list(images_lib.to_uint8(np.asarray(rec_u)[:len(imgs)]))
            originals += imgs
        out = {}
        for k, cnt in counts.items():
            out[f"{k}_usage"] = float((cnt > 0).mean())
            out[f"{k}_perplexity"] = float(quantizers.perplexity(cnt))
        for (k, kind), cnt in by_kind.items():
            out[f"{k}_{kind}_codes"] = int((cnt > 0).sum())
            out[f"{k}_{kind}_perplexity"] = float(quantizers.perplexity(cnt))
        for prefix, images in (("", recons), ("unquantized_", bypassed)):
            if not images:
                continue
            out[f"{prefix}val_psnr"] = recon_lib.psnr(np.stack(originals), np.stack(images))
            out[f"{prefix}val_ssim"] = recon_lib.ssim(np.stack(originals), np.stack(images))
            if c.data.source == "shapecomp":
                # The shapes the levels can hold, rotation only where they rotate objects.
                det_kw = scorer.level_options(c.data.levels)
                ceiling, misses = recon_lib.agreement_and_misses(originals, images, **det_kw)
                out[f"{prefix}tokenizer_ceiling"] = ceiling
                # Why the rest fail (count / color / shape / offset): where a tokenizer needs work.
                out.update({f"{prefix}ceiling_miss_{r}": v for r, v in misses.items()})
        edit_pairs = c.train.get("eval_edit_pairs", 0) if edit_pairs is None else edit_pairs
        if c.data.source == "shapecomp" and recons and edit_pairs > 0:
            target_codes = []          # the targets' codes, level by level, kept for `_edit_codes_kept`

            def round_trip(imgs):
                recs, codes = self._round_trip(state, imgs, min(batch, n))
                target_codes.append(codes)
                return recs
            out.update(recon_lib.edit_ceiling(round_trip, levels=c.data.levels, pairs=edit_pairs))
            codes_a = {book: np.concatenate([t[book] for t in target_codes]) for book in target_codes[0]}
            out.update(self._edit_codes_kept(state, edit_pairs, min(batch, n), codes_a))
        return out

    def _edit_codes_kept(self, state: TokenizerState, pairs: int, batch: int, codes_a: dict) -> dict:
        """`recon.codes_kept` of every codebook over the editing suite's held-out pairs of each level, given
        their targets' codes `codes_a` (in `recon.edit_ceiling`'s order: level by level, pair by pair):
        edit_kept_<book> (cells the edit left as they were) and edit_kept_<book>_object (those on objects)."""
        from illume_jax.data import shapecomp
        before, after = [], []
        for level in self.config.data.levels:
            edit_pairs = [shapecomp.edit_pair(int(level), "test", i) for i in range(pairs)]
            before += [shapecomp.render(p.before) for p in edit_pairs]
            after += [shapecomp.render(p.after) for p in edit_pairs]
        res = self.config.data.resolution
        before = [images_lib.fit_resolution(i, res) for i in before]
        after = [images_lib.fit_resolution(i, res) for i in after]
        codes_b = self._round_trip(state, before, batch)[1]
        out = {}
        for book in codes_b:
            kept = recon_lib.codes_kept(codes_b[book], codes_a[book], before, after)
            out[f"edit_kept_{book}"], out[f"edit_kept_{book}_object"] = kept["all"], kept["object"]
        return out

    def _round_trip(self, state: TokenizerState, images: list, batch: int) -> tuple[list, dict]:
        """uint8 images -> (their reconstructions, uint8, each at its own size; each codebook's codes
        [N, h, w]), `batch` at a time, padded to `batch` (the validation loop's shape: nothing new to compile)."""
        res = self.config.data.resolution
        out, codes = [], {}
        for start in range(0, len(images), batch):
            chunk = images[start:start + batch]
            x = np.stack([images_lib.to_model_range(images_lib.fit_resolution(i, res)) for i in chunk])
            x = np.concatenate([x, np.repeat(x[-1:], batch - len(x), 0)])
            rec, grid = self.reconstruct(state, x)
            rec = images_lib.to_uint8(np.asarray(rec)[:len(chunk)])
            out += [r if r.shape == i.shape else images_lib.fit_resolution(r, i.shape[0]) for r, i in zip(rec, chunk)]
            for book, g in grid.items():
                codes.setdefault(book, []).append(np.asarray(g)[:len(chunk)])
        return out, {book: np.concatenate(g) for book, g in codes.items()}


def _count_codes_by_cell_kind(by_kind: dict, book: str, codes: np.ndarray, images) -> None:
    """Adds each image's codes [N, h, w] (both tokenizers' code grids) of codebook `book` to
    by_kind[(book, 'object' | 'background')], by whether the cell shows any object pixel."""
    from illume_jax.data import shapecomp
    h, w = codes.shape[1:]
    for image, grid in zip(images, codes):
        on = shapecomp.object_cells(image, h, w)
        flat = grid.reshape(-1)
        for kind, m in (("object", on), ("background", ~on)):
            cnt = by_kind[(book, kind)]
            cnt += np.bincount(flat[m], minlength=cnt.size)


def train_tokenizer(config: Any, workdir: str, *, mesh=None, stop_after_steps: int | None = None) -> dict:
    """Runs (or resumes) ViT pre-training (if configured) and tokenizer training; returns the
    final evaluation row (plus `preempted`)."""
    workdir = os.path.abspath(workdir)
    mesh = mesh or sharding.make_mesh(dict(config.mesh))
    summary = {}
    # Fine-tuning a run or converted weights: the frozen ViT comes with them, phase 1 is skipped.
    if config.vit_pretrain.steps > 0 and not config.model_init.get("weights_from", ""):
        pre = pretrain_vit(config, workdir, mesh, stop_after_steps=stop_after_steps)
        summary["vit_pretrain"] = {k: v for k, v in pre.items() if k != "state"}
        if pre["preempted"]:
            return dict(summary, preempted=True)
    _check_batch("train.batch_size", config.train.batch_size, mesh)
    trainer = TokenizerTrainer(config, workdir, mesh)
    src = images_lib.image_source(config.data, "train", config.data.get("data_dir", ""))
    it = images_lib.make_image_iterator(src, batch_size=config.train.batch_size, resolution=config.data.resolution,
                                        seed=config.seed, process_index=jax.process_index(),
                                        process_count=jax.process_count(), num_workers=config.data.num_workers)
    out = run_phase("tokenizer", tokenizer_dir(workdir), mesh=mesh, steps=config.train.steps,
                    abstract_state=trainer.abstract, init_state=trainer.init_state, step_fn=trainer.step,
                    iterator=it, checkpoint=config.checkpoint, log_every=config.log_every,
                    config_json=config.to_json(), eval_fn=lambda s, _: trainer.evaluate(s),
                    eval_every=config.train.eval_every, stop_after_steps=stop_after_steps)
    summary["tokenizer"] = {k: v for k, v in out.items() if k != "state"}
    return dict(summary, preempted=out["preempted"], state=out["state"], trainer=trainer)


def saved_config(workdir: str):
    """The config a tokenizer in `workdir` was trained with (from its latest checkpoint), or None."""
    import json

    import ml_collections as mlc
    from illume_jax.convert import weights
    if weights.is_converted(workdir):  # official weights converted by `python -m illume_jax convert`
        return weights.read_config(workdir)
    directory = os.path.join(tokenizer_dir(os.path.abspath(workdir)), "checkpoints")
    step = _latest_tokenizer_step(workdir)
    meta = os.path.join(directory, str(step), "meta", "metadata") if step is not None else ""
    if not meta or not os.path.exists(meta):
        return None
    with open(meta) as f:
        text = json.load(f).get("config")
    return mlc.ConfigDict(json.loads(text)) if text else None


def load_tokenizer(config: Any, workdir: str, mesh=None):
    """(model, trainer, state) from the latest tokenizer checkpoint in `workdir`, or from a
    converted-weights folder (for encode-dataset, the MLLM, the decoder and the demo)."""
    from illume_jax.convert import weights
    mesh = mesh or sharding.make_mesh(dict(config.mesh))
    trainer = TokenizerTrainer(config, workdir, mesh, training=False)
    if weights.is_converted(workdir):
        weights.check_kind(workdir, ("dualvitok",), "tokenizer folder")
        params, buffers = weights.restore(workdir, trainer.abstract.params, trainer.abstract.buffers)
        state = TokenizerState(step=jnp.zeros((), jnp.int32), params=params, buffers=buffers, opt_state=None,
                               disc_params=None, disc_opt_state=None,
                               rng=jax.random.key_data(jax.random.key(config.seed)))
        return nnx.merge(trainer.graphdef, params, buffers), trainer, state
    ckpt = ckpt_lib.Checkpointer(os.path.join(tokenizer_dir(workdir), "checkpoints"), async_save=False)
    step = ckpt.latest_step()
    if step is None:
        ckpt.close()
        raise ValueError(f"no tokenizer checkpoint in {tokenizer_dir(workdir)}: run train-tokenizer first")
    # Everything but the optimizer and discriminator (a consumer encodes, decodes or evaluates).
    # Not the dead-code ages either: a training-only statistic, saved only when restarts were on,
    # so a run trained without them loads under a config that has them (and the other way round).
    state = ckpt.restore_fields(step, trainer.abstract, ("step", "params", "buffers", "rng"))
    ckpt.close()
    return nnx.merge(trainer.graphdef, state.params, state.buffers), trainer, state


def evaluate_checkpoint(config: Any, workdir: str, *, num: int | None = None, mesh=None,
                        unquantized: bool = False) -> tuple[dict, str]:
    """Scores the latest tokenizer checkpoint in `workdir` on `num` validation images (default
    config.train.eval_images) as training's evaluation does, and writes the row to
    <workdir>/tokenizer/eval_step<S>.json: (row, path). Re-scores a finished run after the
    scorer or the metrics change, without retraining. `unquantized`: see `TokenizerTrainer.evaluate`."""
    import json
    _, trainer, state = load_tokenizer(config, workdir, mesh)
    num = config.train.eval_images if num is None else num
    if num <= 0:
        raise ValueError(f"eval-tokenizer: --num={num}; expected a positive number of validation images")
    step = int(state.step)
    row = dict(step=step, images=num, **trainer.evaluate(state, num=num, unquantized=unquantized))
    path = os.path.join(tokenizer_dir(os.path.abspath(workdir)), f"eval_step{step}.json")
    with open(path, "w") as f:
        json.dump(row, f, indent=1)
    return row, path
