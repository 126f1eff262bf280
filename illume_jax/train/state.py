"""Train state: a plain pytree of fp32 master parameters, optimizer state, counters and RNG.

Functional NNX style: the model's graph definition is static (`nnx.split`), the state
flows through a pure, jitted, donated step. Parameters and optimizer state are created
already sharded: the init runs inside `jax.jit` with output shardings derived from the
logical axis names (never materialised on one device first).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from illume_jax import sharding
from illume_jax.models.llm import LLM, LLMConfig
from illume_jax.train import optim


@struct.dataclass
class TrainState:
    step: jax.Array          # global step (all stages), int32
    stage_step: jax.Array    # step within the current stage, int32
    params: Any              # nnx.State of nnx.Param (fp32 master weights)
    opt_state: Any
    rng: jax.Array           # typed PRNG key, folded with the step for per-step randomness
    nan_skips: jax.Array     # updates skipped because the loss or gradient was not finite


def stage_resolution(config: Any, stage_index: int) -> int:
    """The square image side of a multimodal stage: its own `resolution`, else `vision.resolution`."""
    return int(config.stages[stage_index].get("resolution", 0) or config.vision.resolution)


def model_config(config: Any):
    """`LLMConfig` for text-only configs; `MLLMConfig` when the config has a `vision` block.

    The MLLM's tower and codebooks follow the vision tokenizer: the config its checkpoint in
    `vision.tokenizer_workdir` was trained with, else `vision.tokenizer_model` (shape-only
    tools such as AOT, and runs whose tokenizer does not exist yet)."""
    if "vision" not in config:
        return LLMConfig.from_config(config.model)
    from illume_jax.models.mllm import MLLMConfig
    v = config.vision
    tok_model = v.tokenizer_model
    if v.get("tokenizer_workdir"):
        from illume_jax.train.tokenizer import saved_config
        saved = saved_config(v.tokenizer_workdir)
        if saved is not None:
            tok_model = saved.model
    if tok_model is None:
        raise ValueError("config.vision: no tokenizer checkpoint in vision.tokenizer_workdir="
                         f"{v.get('tokenizer_workdir')!r} and no vision.tokenizer_model to fall back on")
    tok_model = {k: val for k, val in dict(tok_model).items()}
    return MLLMConfig.create(config.model, tok_model, vit_trainable_from=int(v.get("vit_trainable_from", 0)),
                             projector_window=int(v.get("projector_window", 1)),
                             cell_embedding=bool(v.get("cell_embedding", False)),
                             neighbour_codes=bool(v.get("neighbour_codes", False)),
                             parent_codes=bool(v.get("parent_codes", False)),
                             source_cells=bool(v.get("source_cells", False)),
                             source_copy=bool(v.get("source_copy", False)),
                             copy_mixture=bool(v.get("copy_mixture", False)), tag_step=int(v.get("tag_step", 64)),
                             max_side=int(v.get("max_side", 1024)))


def build_model(cfg, rngs: nnx.Rngs):
    """LLM or MLLM for a config from `model_config`."""
    if isinstance(cfg, LLMConfig):
        return LLM(cfg, rngs=rngs)
    from illume_jax.models.mllm import MLLM
    return MLLM(cfg, rngs=rngs)


def abstract_model(cfg, mesh: Mesh, seed: int = 0):
    """(graphdef, abstract params) without allocating anything (traced once per config and mesh)."""
    from illume_jax.train.step import abstract_module
    model = abstract_module(("mllm", repr(cfg), seed), lambda: build_model(cfg, nnx.Rngs(seed)), mesh)
    return nnx.split(model, nnx.Param)


def shardings_like_params(abstract, param_shardings, mesh: Mesh):
    """Shardings for `abstract` (optimizer state, or a whole train state): leaves mirror their
    parameter's sharding (matched by key-path suffix and rank; `param_shardings` is one tree or
    a sequence of trees); counters, hyperparameters and the rest are replicated."""
    trees = param_shardings if isinstance(param_shardings, (list, tuple)) else [param_shardings]
    by_path = {optim.path_str(p): s for tree in trees if tree is not None
               for p, s in jax.tree_util.tree_flatten_with_path(tree)[0]}
    replicated = NamedSharding(mesh, P())

    def find(path, leaf):
        s = optim.path_str(path)
        for ppath, psh in by_path.items():
            if (s == ppath or s.endswith("/" + ppath)) and len(leaf.shape) == len(psh.spec):
                return psh
        return replicated

    return jax.tree_util.tree_map_with_path(find, abstract)


def state_shardings(abs_state: TrainState, mesh: Mesh) -> TrainState:
    with sharding.use_mesh(mesh):
        psh = nnx.get_named_sharding(abs_state.params, mesh)
    replicated = NamedSharding(mesh, P())
    return TrainState(step=replicated, stage_step=replicated, params=psh,
                      opt_state=shardings_like_params(abs_state.opt_state, psh, mesh), rng=replicated,
                      nan_skips=replicated)


def abstract_state(config: Any, stage_index: int, mesh: Mesh):
    """(graphdef, optimizer, abstract TrainState with shardings attached)."""
    cfg = model_config(config)
    graphdef, abs_params = abstract_model(cfg, mesh, config.seed)
    tx = optim.make_optimizer(config, stage_index, abs_params)
    abs_state = jax.eval_shape(lambda p: _fresh(p, tx, config.seed), abs_params)
    sh = state_shardings(abs_state, mesh)
    abs_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_state, sh)
    return graphdef, tx, abs_state


def load_converted_params(path: str, abstract_params: Any, multimodal: bool):
    """The parameters of a converted-weights folder (`python -m illume_jax convert`), restored into
    `abstract_params` (ShapeDtypeStructs with the run's shardings and dtype: bf16 files become fp32
    master weights). A folder of the wrong kind, or shapes that differ from the config, fail here."""
    from illume_jax.convert import weights
    kind = "mllm" if multimodal else "llm"
    weights.check_kind(path, (kind,), "config.model_init.weights_from")
    try:
        params, _ = weights.restore(path, abstract_params)
    except ValueError as e:
        raise ValueError(f"config.model_init.weights_from={path!r} does not fit config.model: {e}") from e
    return params


# The LLM fields a text checkpoint must share with an MLLM config to seed its LLM (vocabulary rows may grow).
_LLM_ARCH_FIELDS = ("family", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
                    "qkv_bias", "scan_layers")


def graft_text_llm(path: str, params: Any, config: Any) -> Any:
    """An MLLM's parameters with its LLM taken from a converted *text* LLM folder (Qwen2.5-3B/7B-Instruct for
    ILLUME+, Vicuna-7B for ILLUME): how the first stage of a 3B / 7B run starts.

    `params` are the run's freshly initialised, sharded MLLM parameters. The text LLM's weights replace
    `llm/` except the embedding / head rows beyond its vocabulary (the image, structure and tag ids), which
    keep their fresh initialisation (the official code grows the vocabulary by HF's resize, new rows freshly
    initialised). A tied text model (Qwen2.5-3B) seeds an untied head with its embedding. The tower and
    projector are untouched (the caller seeds the tower from the vision tokenizer)."""
    from illume_jax.convert import weights
    src = LLMConfig.from_config(weights.read_config(path).model)
    dst = LLMConfig.from_config(config.model)
    what = f"config.model_init.weights_from={path!r}"
    for field in _LLM_ARCH_FIELDS:
        if getattr(src, field) != getattr(dst, field):
            raise ValueError(f"{what}: its LLM has {field}={getattr(src, field)!r}, config.model has "
                             f"{getattr(dst, field)!r}; a text LLM seeds an MLLM of the same architecture")
    if not dst.text_vocab_size <= src.vocab_size <= dst.vocab_size:
        raise ValueError(f"{what}: its {src.vocab_size:,} vocabulary rows must cover config.model.text_vocab_size "
                         f"({dst.text_vocab_size:,}) and fit in config.model.vocab_size ({dst.vocab_size:,})")
    if src.tie_embeddings is False and dst.tie_embeddings:
        raise ValueError(f"{what}: its head is separate from its embedding, config.model ties them "
                         f"(tie_embeddings=True) and would lose it")
    rows = src.vocab_size
    pure = nnx.to_pure_dict(params)
    fresh = pure["llm"]
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), fresh)
    abstract["embed"]["embedding"] = jax.ShapeDtypeStruct((rows, dst.d_model), fresh["embed"]["embedding"].dtype,
                                                          sharding=fresh["embed"]["embedding"].sharding)
    if src.tie_embeddings:
        abstract.pop("lm_head", None)
    else:
        head = fresh["lm_head"]["kernel"]
        abstract["lm_head"]["kernel"] = jax.ShapeDtypeStruct((dst.d_model, rows), head.dtype, sharding=head.sharding)
    try:
        text, _ = weights.restore(path, abstract)
    except ValueError as e:
        raise ValueError(f"{what} does not fit config.model's LLM: {e}") from e

    def merge(fresh, text):
        out = dict(text)
        out["embed"] = {"embedding": fresh["embed"]["embedding"].at[:rows].set(text["embed"]["embedding"])}
        if "lm_head" in fresh:
            seed = text["embed"]["embedding"].T if src.tie_embeddings else text["lm_head"]["kernel"]
            out["lm_head"] = {"kernel": fresh["lm_head"]["kernel"].at[:, :rows].set(seed)}
        return out

    out_sh = jax.tree.map(lambda a: a.sharding, fresh)
    pure["llm"] = jax.jit(merge, out_shardings=out_sh, donate_argnums=(0,))(fresh, text)
    out = jax.tree.map(lambda x: x, params)
    nnx.replace_by_pure_dict(out, pure)
    return out


def is_train_run(path: str) -> bool:
    """Whether `path` is a `train` workdir with at least one checkpoint."""
    from illume_jax.train import checkpoint as ckpt_lib
    folder = os.path.join(path, "checkpoints")
    if not os.path.isdir(folder):
        return False
    ckpt = ckpt_lib.Checkpointer(folder, async_save=False)
    try:
        return ckpt.latest_step() is not None
    finally:
        ckpt.close()


def config_from_meta(meta: dict) -> Any:
    """The config a checkpoint was saved with (its meta's JSON; stage lists come back as ConfigDicts)."""
    import ml_collections as mlc
    raw = json.loads(meta["config"])
    raw["stages"] = [mlc.ConfigDict(st) for st in raw.get("stages", [])]  # lists stay plain in JSON
    return mlc.ConfigDict(raw)


def checkpoint_params(workdir: str, step: int | None, mesh: Mesh, *, where: str) -> tuple[Any, Any, int]:
    """(config, params, step) of a `train` workdir's checkpoint `step` (None: its latest), the params
    restored with the shapes and shardings of the config it was saved with. `where` names the input in
    errors."""
    from illume_jax.train import checkpoint as ckpt_lib
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):  # (the Checkpointer would create it)
        raise ValueError(f"{where}: neither a converted folder nor a workdir with checkpoints")
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
        if step is None:
            step = ckpt.latest_step()
            if step is None:
                raise ValueError(f"{where}: neither a converted folder nor a workdir with checkpoints")
        elif step not in ckpt.all_steps():
            raise ValueError(f"{where}: no checkpoint at step {step} (steps there: {ckpt.all_steps()})")
        meta = ckpt.restore_meta(step)
        config = config_from_meta(meta)
        _, _, abs_state = abstract_state(config, meta["stage_index"], mesh)
        return config, ckpt.restore_fields(step, abs_state, ("params",)).params, step
    finally:
        ckpt.close()


def load_run_params(run: str, fresh_params: Any, mesh: Mesh, *, step: int | None = None,
                    reinit: tuple[str, ...] = (), workdir: str | None = None) -> Any:
    """`fresh_params` (a new model's, sharded) with every parameter taken from the checkpoint of the
    `train` workdir `run` (its latest, or `step`), except those matching a `reinit` regex: these keep
    their fresh values. Forks a trained run into a changed model, say one with a new module
    (`reinit=('cell_embed/.*',)`). Every other parameter must exist in the run with the same shape;
    mismatches are named. The run and `workdir` must share the text tokenizer (else the ids mean
    other words)."""
    where = f"config.model_init.weights_from={run!r}"
    if workdir is not None:
        mine, theirs = (os.path.join(d, "tokenizer", "spm.model") for d in (workdir, run))
        if os.path.exists(mine) and os.path.exists(theirs) and Path(mine).read_bytes() != Path(theirs).read_bytes():
            raise ValueError(f"{where}: its text tokenizer ({theirs}) differs from this run's ({mine}); "
                             f"copy the run's tokenizer/ folder into the new workdir before training")
    _, loaded, step = checkpoint_params(run, step, mesh, where=where)
    patterns = [re.compile(p) for p in reinit]
    have = {optim.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(loaded)[0]}
    flat, treedef = jax.tree_util.tree_flatten_with_path(fresh_params)
    out, problems, kept = [], [], []
    for p, x in flat:
        name = optim.path_str(p)
        if any(r.search(name) for r in patterns):
            kept.append(name)
            out.append(x)
        elif name not in have or have[name].shape != x.shape:
            problems.append(f"{name} {tuple(x.shape)}: "
                            + (f"{tuple(have[name].shape)} in the run" if name in have else "not in the run"))
        else:
            out.append(jax.device_put(have[name].astype(x.dtype), x.sharding))
    if problems:
        raise ValueError(f"{where} (step {step}) does not fit config.model: " + "; ".join(problems[:6])
                         + (f" (+{len(problems) - 6} more)" if len(problems) > 6 else "")
                         + "; config.model_init.reinit names the parameters to initialise afresh")
    unused = [r.pattern for r in patterns if not any(r.search(k) for k in kept)]
    if unused:
        raise ValueError(f"config.model_init.reinit: {unused} match no parameter of config.model")
    print(f"parameters from {run} step {step}; initialised afresh: {len(kept)} "
          f"({', '.join(kept[:4])}{', ...' if len(kept) > 4 else ''})", flush=True)
    return jax.tree_util.tree_unflatten(treedef, out)


def _fresh(params, tx: optax.GradientTransformation, seed: int, step=0) -> TrainState:
    return TrainState(step=jnp.asarray(step, jnp.int32), stage_step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), rng=jax.random.key_data(jax.random.key(seed)),
                      nan_skips=jnp.zeros((), jnp.int32))


def create_state(config: Any, stage_index: int, mesh: Mesh, params=None, step: int = 0, abstract=None):
    """A new TrainState for `stage_index`, created sharded.

    params=None initialises the model from config.seed; otherwise the given (sharded)
    parameters carry over from the previous stage and only a new optimizer state is made.
    `abstract`: the stage's `abstract_state(...)` result when the caller already has it.
    Returns (graphdef, tx, state).
    """
    cfg = model_config(config)
    graphdef, tx, abs_state = abstract or abstract_state(config, stage_index, mesh)
    out_sh = jax.tree.map(lambda a: a.sharding, abs_state)
    from illume_jax.train.step import InitProgram, mesh_key, reuse_programs
    key = ("create_state", config.to_json(), stage_index, step, params is None, mesh_key(mesh))
    with sharding.use_mesh(mesh):
        if params is None:
            def init():
                model = build_model(cfg, nnx.Rngs(config.seed))
                return _fresh(nnx.state(model, nnx.Param), tx, config.seed, step)
            state = reuse_programs(key, lambda: InitProgram(init, mesh, out_sh, abs_state))()
        else:
            state = reuse_programs(key, lambda: jax.jit(lambda p: _fresh(p, tx, config.seed, step),
                                                        out_shardings=out_sh, donate_argnums=(0,)))(params)
    return graphdef, tx, state


def count_bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))
