"""The pure train step: loss, gradients (with accumulation), optax update, NaN guard, metrics.

`make_train_step` returns the jitted step with explicit in/out shardings and the state
donated, so the second call reuses the first compilation and peak memory holds one state.
Batches are dicts of [B,T] arrays: tokens, targets, loss_mask, segment_ids, positions, sources.
The loss is the token cross-entropy (fp32 logsumexp) averaged over trained tokens (a stage's
`loss_weighting="token"`, the official one), or (`"dataset"`) each mixture dataset's mean token
NLL weighted by its mixture weight, so a dataset's share of the gradient is its share of the
mixture rather than of the tokens (a 350-token image block otherwise outweighs a 5-token answer
70 to 1). Either way the metrics also split it into text tokens (targets < text_vocab_size) and
image/structure tokens, and by the mixture dataset each token came from (`sources`):
`loss/<dataset>` and `tokens/<dataset>` (token means), so a multi-task stage shows which task
gains or loses while the total moves little.
"""
from __future__ import annotations

import collections
from typing import Any, Callable, TypeVar

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from illume_jax import sharding
from illume_jax.data.pipeline import mixture_names
from illume_jax.train import optim
from illume_jax.train.state import TrainState, abstract_state

BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions", "sources")
SUM_KEYS = ("objective", "weight", "nll", "tokens", "text_nll", "text_tokens", "image_nll", "image_tokens")


def _source_onehot(sources: jax.Array, num_sources: int) -> jax.Array:
    """[B,T,num_sources] float one-hot of the 1-based source ids (0 and ids past the end: all zero),
    contracted over the tokens by the callers: K sums, no scatter (TPU-friendly)."""
    return jax.nn.one_hot(sources, num_sources + 1, dtype=jnp.float32)[..., 1:]


def token_losses(params, graphdef, batch: dict, text_vocab_size: int,
                 num_sources: int = 0) -> tuple[jax.Array, dict]:
    """The differentiated quantity `objective` = sum of NLL x `batch["loss_weight"]` (default: the
    loss mask, i.e. the summed NLL over trained tokens), its `weight` sum, and per-modality sums;
    with `num_sources` > 0 also per-dataset sums `source_nll`, `source_tokens` [num_sources]
    (source id s = 1..num_sources counts at s - 1; 0 and ids past the end count nowhere).

    Multimodal batches (with 'images') run the MLLM: projected image features at the
    continuous slots; their discrete slots already hold code ids (`VisionTokenizer.prepare`)."""
    model = nnx.merge(graphdef, params)
    if "images" in batch:
        logits = model(batch["tokens"], slots=batch["token_slots"], cells=batch["token_cells"],
                       images=batch["images"], positions=batch["positions"], segment_ids=batch["segment_ids"],
                       codes=batch.get("input_codes"))
    else:
        logits = model(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
    nll = logz - target_logit
    mask = batch["loss_mask"].astype(jnp.float32)
    image = (batch["targets"] >= text_vocab_size).astype(jnp.float32) * mask
    text = mask - image
    weight = batch.get("loss_weight", mask)
    sums = dict(objective=jnp.sum(nll * weight), weight=jnp.sum(weight),
                nll=jnp.sum(nll * mask), tokens=jnp.sum(mask), text_nll=jnp.sum(nll * text),
                text_tokens=jnp.sum(text), image_nll=jnp.sum(nll * image), image_tokens=jnp.sum(image))
    if num_sources:
        onehot = _source_onehot(batch["sources"], num_sources)
        sums["source_nll"] = jnp.einsum("bt,btk->k", jax.lax.stop_gradient(nll) * mask, onehot)
        sums["source_tokens"] = jnp.einsum("bt,btk->k", mask, onehot)
    return sums["objective"], sums


def dataset_balanced_weights(batch: dict, dataset_weights: tuple[float, ...]) -> jax.Array:
    """Per-token loss weights [B,T] that make the objective sum over datasets of (mixture weight x
    that dataset's mean token NLL), the weights renormalised over the datasets present in this global
    batch (they sum to 1; 0 if nothing is trained). Computed on the whole global batch before any
    micro-batching, so gradient accumulation leaves the objective exactly as it is. Tokens of source 0
    (padding, untagged records) weigh nothing."""
    mask = batch["loss_mask"].astype(jnp.float32)
    onehot = _source_onehot(batch["sources"], len(dataset_weights))
    counts = jnp.einsum("bt,btk->k", mask, onehot)
    w = jnp.asarray(dataset_weights, jnp.float32) * (counts > 0)
    w = w / jnp.maximum(jnp.sum(w), 1e-30)
    return mask * jnp.einsum("btk,k->bt", onehot, w / jnp.maximum(counts, 1.0))


def _grads(params, graphdef, batch, text_vocab_size: int, grad_accum: int, num_sources: int = 0):
    grad_fn = jax.value_and_grad(token_losses, has_aux=True)
    if grad_accum == 1:
        (_, sums), grads = grad_fn(params, graphdef, batch, text_vocab_size, num_sources)
        return grads, sums

    def split(x):
        return x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:])

    micro = jax.tree.map(split, batch)

    def body(carry, mb):
        g_acc, s_acc = carry
        (_, sums), g = grad_fn(params, graphdef, mb, text_vocab_size, num_sources)
        return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, s_acc, sums)), None

    zeros_g = jax.tree.map(jnp.zeros_like, params)
    zeros_s = {k: jnp.zeros((), jnp.float32) for k in SUM_KEYS}
    if num_sources:
        zeros_s.update(source_nll=jnp.zeros((num_sources,), jnp.float32),
                       source_tokens=jnp.zeros((num_sources,), jnp.float32))
    (grads, sums), _ = jax.lax.scan(body, (zeros_g, zeros_s), micro)
    return grads, sums


def train_step(state: TrainState, batch: dict, *, graphdef, tx: optax.GradientTransformation,
               text_vocab_size: int, grad_accum: int, lr_fn: Callable, frozen=None,
               source_names: tuple[str, ...] = (), dataset_weights: tuple[float, ...] | None = None
               ) -> tuple[TrainState, dict]:
    """frozen: a pytree of Python bools like the params (True = the stage does not train it), or None.
    source_names: the stage's mixture datasets in `sources` order (data/pipeline.mixture_names).
    dataset_weights: their mixture weights, in that order, for `loss_weighting="dataset"`; None: the
    mean over trained tokens."""
    if dataset_weights is not None:
        batch = {**batch, "loss_weight": dataset_balanced_weights(batch, dataset_weights)}
    grads, sums = _grads(state.params, graphdef, batch, text_vocab_size, grad_accum, len(source_names))
    if frozen is not None:  # the grad-norm metric and the NaN guard see what the optimizer sees
        grads = optim.drop_frozen(grads, frozen)
    # Gradients of the weighted NLL sum / the weight sum = gradient of the weighted mean over the
    # whole global batch, however it was split into micro-batches (the weights are data).
    denom = jnp.where(sums["weight"] > 0, sums["weight"], 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    loss = sums["objective"] / denom
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # NaN/Inf guard without a host sync: keep the old params and optimizer state.
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = state.replace(
        step=state.step + 1, stage_step=state.stage_step + 1,
        params=keep(new_params, state.params), opt_state=keep(new_opt, state.opt_state),
        nan_skips=state.nan_skips + (~finite).astype(jnp.int32))
    metrics = dict(
        loss=loss, grad_norm=grad_norm, lr=lr_fn(state.stage_step), nan_skipped=(~finite).astype(jnp.int32),
        tokens=sums["tokens"], text_loss=sums["text_nll"] / jnp.maximum(sums["text_tokens"], 1.0),
        text_tokens=sums["text_tokens"], image_loss=sums["image_nll"] / jnp.maximum(sums["image_tokens"], 1.0),
        image_tokens=sums["image_tokens"])
    for i, name in enumerate(source_names):
        metrics[f"loss/{name}"] = sums["source_nll"][i] / jnp.maximum(sums["source_tokens"][i], 1.0)
        metrics[f"tokens/{name}"] = sums["source_tokens"][i]
    return new_state, metrics


def batch_shapes(config: Any, stage_index: int, mesh: Mesh) -> dict:
    stage = config.stages[stage_index]
    B, T = stage.global_batch_size, stage.seq_len
    sh = sharding.batch_sharding(mesh, 2)
    out = {k: jax.ShapeDtypeStruct((B, T), jnp.float32 if k == "loss_mask" else jnp.int32, sharding=sh)
           for k in BATCH_KEYS}
    if "vision" in config:
        for k in ("token_slots", "token_cells", "target_slots", "target_cells"):
            out[k] = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=sh)
        from illume_jax.train.state import stage_resolution
        S, M = stage_resolution(config, stage_index), int(config.vision.max_images)
        out["images"] = jax.ShapeDtypeStruct((B, M, S, S, 3), jnp.float32, sharding=sharding.batch_sharding(mesh, 5))
    return out


def make_train_step(config: Any, stage_index: int, mesh: Mesh, graphdef=None, tx=None, abs_state=None,
                    vision=None):
    """The jitted, donated step for one stage: `step(state, batch) -> (state, metrics)`.

    `vision` (a train.multimodal.VisionTokenizer) is required for multimodal configs: its
    parameters ride along as a non-donated argument and its codes fill the batch in the step."""
    if abs_state is None:
        graphdef, tx, abs_state = abstract_state(config, stage_index, mesh)
    stage = config.stages[stage_index]
    if stage.global_batch_size % (config.optim.grad_accum * sharding.data_parallel_size(mesh)):
        raise ValueError(f"stage {stage.name!r}: global_batch_size={stage.global_batch_size} must be a multiple of "
                         f"optim.grad_accum x data-parallel devices = {config.optim.grad_accum} x "
                         f"{sharding.data_parallel_size(mesh)}")
    state_sh = jax.tree.map(lambda a: a.sharding, abs_state)
    batch_sh = {k: v.sharding for k, v in batch_shapes(config, stage_index, mesh).items()}
    frozen = optim.frozen_mask(abs_state.params, stage)
    kw = dict(graphdef=graphdef, tx=tx, text_vocab_size=config.model.text_vocab_size,
              grad_accum=config.optim.grad_accum, lr_fn=lambda s: optim.learning_rate(config, stage_index, s),
              frozen=frozen, source_names=tuple(mixture_names(stage)),
              dataset_weights=(tuple(float(stage.mixture[n]) for n in mixture_names(stage))
                               if stage.get("loss_weighting", "token") == "dataset" else None))
    key = ("train_step", config.to_json(), stage_index, mesh_key(mesh))
    if "vision" not in config:
        jitted = reuse_programs(key, lambda: jax.jit(
            lambda state, batch: train_step(state, batch, **kw), in_shardings=(state_sh, batch_sh),
            out_shardings=(state_sh, None), donate_argnums=(0,)))
        return MeshJit(jitted, mesh)
    if vision is None:
        raise ValueError("a multimodal config (config.vision) needs its vision tokenizer to build the train step")
    from illume_jax.models import mllm
    from illume_jax.train.state import model_config
    vocab = model_config(config).vocab

    code_noise = float(config.vision.get("code_noise", 0.0))   # in [0, 1): config_check

    def step(state, batch, tok_params):
        batch = vision.prepare(tok_params, batch, vocab)
        if code_noise > 0:   # wrong codes in the context, true targets (models/mllm.py noisy_code_inputs)
            rng = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step), 1)
            batch = {**batch, "tokens": mllm.noisy_code_inputs(batch["tokens"], batch["token_slots"], vocab,
                                                               code_noise, rng)}
        return train_step(state, batch, **kw)

    tok_sh = jax.tree.map(lambda a: a.sharding, vision.params)
    # The tokenizer's graph is part of the program (its weights are an argument).
    jitted = reuse_programs(key + (vision.graphdef,), lambda: jax.jit(
        step, in_shardings=(state_sh, batch_sh, tok_sh), out_shardings=(state_sh, None), donate_argnums=(0,)))
    return _BoundMeshJit(jitted, mesh, vision.params)


# Random-init programs run once per training run but are thousands of tiny RNG kernels; XLA's
# backend optimisation roughly halves their CPU compile time when switched off (14 s -> 7 s for
# the tiny decoder UNet) and costs nothing that matters for a program that runs once.
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

# States up to this size are initialised op by op (`InitProgram`).
EAGER_INIT_MAX_BYTES = 1 << 30


class InitProgram:
    """A fresh training state: `fn()` (random parameters, optimizer state, ...) placed with
    `out_shardings`; `abstract` is fn's eval_shape and only decides how it runs.

    Up to EAGER_INIT_MAX_BYTES it runs op by op under the mesh and is placed afterwards. One init
    program is a threefry per parameter: for the micro DualViTok 110k lines of HLO that take XLA:CPU
    ~30 s to compile even at -O0, while op-by-op creation compiles one small program per shape,
    shared by every model of the process (~10 s the first time, ~1.5 s after). Bigger states are
    one sharded program, as creating them op by op would materialise every full parameter on one
    device before sharding it. Both paths draw the same random numbers."""

    def __init__(self, fn: Callable[[], Any], mesh: Mesh, out_shardings, abstract):
        from illume_jax.train.state import count_bytes
        self.fn, self.mesh, self.out_shardings = fn, mesh, out_shardings
        self.eager = count_bytes(abstract) <= EAGER_INIT_MAX_BYTES
        self.jitted = None if self.eager else jax.jit(fn, out_shardings=out_shardings,
                                                      compiler_options=INIT_COMPILER_OPTIONS)

    def __call__(self):
        with sharding.use_mesh(self.mesh):
            if self.eager:
                return jax.device_put(self.fn(), self.out_shardings)
            return self.jitted()


T = TypeVar("T")

# Programs built by trainers, kept across trainer objects in one process (least recently used
# dropped first). A trainer is rebuilt whenever a run restarts in the same process — a notebook
# cell re-run after an interrupt, the demo's preemption, the stop-and-resume tests — and its
# jitted functions are new Python objects, so jax's in-memory cache misses and every program
# compiles again (the micro DualViTok: ~50 s of 2-core CPU per restart). The persistent
# compilation cache would cover it, but reading XLA:CPU executables back from disk has crashed.
_PROGRAMS: "collections.OrderedDict[tuple, Any]" = collections.OrderedDict()
PROGRAM_CACHE_SIZE = 64


def mesh_key(mesh: Mesh) -> tuple:
    """What identifies a mesh for compiled programs: axis names, shape, device order."""
    return (tuple(mesh.axis_names), tuple(mesh.devices.shape), tuple(int(d.id) for d in mesh.devices.flat))


def reuse_programs(key: tuple, build: Callable[[], T]) -> T:
    """The programs `build()` made earlier in this process for `key`, else a fresh build().

    `key` must hold everything the programs are a function of — in practice the config JSON, the
    derived model config where a workdir changes it, and `mesh_key(mesh)`; the programs must take
    every array that differs between runs (parameters, checkpoint-loaded weights) as an argument,
    never close over it."""
    if key in _PROGRAMS:
        _PROGRAMS.move_to_end(key)
        return _PROGRAMS[key]
    value = _PROGRAMS[key] = build()
    while len(_PROGRAMS) > PROGRAM_CACHE_SIZE:
        _PROGRAMS.popitem(last=False)
    return value


def abstract_module(key: tuple, make: Callable[[], Any], mesh: Mesh):
    """`nnx.eval_shape(make)` under the mesh, traced once per (key, mesh) in this process (read-only).
    Tracing a model's creation costs 1.5-2.5 s, and every trainer, phase, restarted run and loader
    of the same config needs it; `key` must identify what `make` builds."""
    def build():
        with sharding.use_mesh(mesh):
            return nnx.eval_shape(make)
    return reuse_programs(("abstract-module",) + tuple(key) + (mesh_key(mesh),), build)


class MeshJit:
    """A jitted function always traced and called under its mesh and the logical-axis rules
    (`jax.set_mesh` cannot be entered inside jit; the layers' sharding constraints need it)."""

    def __init__(self, jitted, mesh: Mesh):
        self.jitted, self.mesh = jitted, mesh

    def __call__(self, *args):
        with sharding.use_mesh(self.mesh):
            return self.jitted(*args)

    def lower(self, *args):
        with sharding.use_mesh(self.mesh):
            return self.jitted.lower(*args)

    def cache_size(self) -> int:
        return self.jitted._cache_size()


class _BoundMeshJit(MeshJit):
    """A MeshJit whose last argument (frozen parameters) is bound."""

    def __init__(self, jitted, mesh: Mesh, bound):
        super().__init__(jitted, mesh)
        self.bound = bound

    def __call__(self, *args):
        return super().__call__(*args, self.bound)

    def lower(self, *args):
        return super().lower(*args, self.bound)


def lower_train_step(config: Any, stage_index: int, mesh: Mesh):
    """Lowers the real step on abstract inputs (used by the AOT command for TPU topologies). A multimodal
    config's frozen vision tokenizer enters as shapes from `config.vision.tokenizer_model`."""
    graphdef, tx, abs_state = abstract_state(config, stage_index, mesh)
    vision = None
    if "vision" in config:
        from illume_jax.train.multimodal import VisionTokenizer
        vision = VisionTokenizer.abstract(config, mesh)
    step = make_train_step(config, stage_index, mesh, graphdef, tx, abs_state, vision=vision)
    return step.lower(abs_state, batch_shapes(config, stage_index, mesh))
