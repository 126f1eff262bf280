"""A converted-weights folder: what `python -m illume_jax convert` writes and every loader reads.

    DIR/config.json     the experiment config for the model (ml_collections JSON; `configs/converted.py:DIR`
                        turns it back into a config, so `train`, `aot` and the CLI take it like any other)
    DIR/weights/        Orbax checkpoint {'params': ..., 'buffers': ...}: the model's nnx variables nested
                        as in `nnx.State` (buffers: frozen SimVQ codebooks), in the stored dtype
    DIR/convert.json    provenance: kind, source, dtype, tensor and number counts
    DIR/tokenizer.json  the text tokenizer, when the source had one (LLM / MLLM)

Weights are saved as host numpy arrays (Orbax writes them as they are; nothing is copied to a
device first) and restored straight into the target shardings, cast to the target dtype — so
a bf16 7B checkpoint stored as bf16 restores as the fp32 master weights of a training run. The
folder is written under a temporary name and renamed when complete: a failed conversion leaves
nothing behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from typing import Any, Mapping

import jax
import ml_collections as mlc
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from illume_jax.convert.movq import nest

KINDS = ("llm", "mllm", "dualvitok", "sdxl-decoder")


def is_converted(path: str) -> bool:
    return bool(path) and os.path.exists(os.path.join(path, "convert.json")) and \
        os.path.isdir(os.path.join(path, "weights"))


def info(path: str) -> dict:
    with open(os.path.join(path, "convert.json")) as f:
        return json.load(f)


def read_config(path: str) -> mlc.ConfigDict:
    if not is_converted(path):
        raise ValueError(f"{path!r} is not a converted-weights folder (no convert.json + weights/): "
                         "run `python -m illume_jax convert` first")
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    if "stages" in raw:  # lists of ConfigDicts come back from JSON as lists of plain dicts
        raw["stages"] = [mlc.ConfigDict(s) for s in raw["stages"]]
    return mlc.ConfigDict(raw)


def check_kind(path: str, kinds: tuple[str, ...], what: str) -> dict:
    meta = info(path)
    if meta["kind"] not in kinds:
        raise ValueError(f"{what}={path!r} holds converted {meta['kind']!r} weights; expected {' or '.join(kinds)}")
    return meta


# Orbax deep-copies numpy leaves before writing them (so an async save may run while the caller
# mutates them). The conversion saves synchronously and owns its arrays: without the copy its
# peak host memory is one converted model, not two (measured: bench/convert_memory.py).
# Orbax releases without the option (e.g. the one beside jax 0.11 on GPU images) get its default.
try:
    _NUMPY_HANDLER = ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)
except TypeError:
    _NUMPY_HANDLER = ocp.type_handlers.NumpyHandler()
_NO_COPY_REGISTRY = ocp.type_handlers.create_type_handler_registry(
    (np.ndarray, _NUMPY_HANDLER),
    (jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False)))


def path_str(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def _split(module: nnx.Module) -> tuple[dict, dict]:
    """{path string: (path tuple, abstract leaf)} for the Params and for every other variable."""
    out = ({}, {})
    for path, var in nnx.to_flat_state(nnx.state(module)):
        leaf = var.get_value() if hasattr(var, "get_value") else var
        if not hasattr(leaf, "shape"):
            continue
        out[0 if isinstance(var, nnx.Param) else 1][path_str(path)] = (tuple(path), leaf)
    return out


@contextlib.contextmanager
def writing(dst: str, overwrite: bool):
    """Yields a fresh temporary folder that replaces `dst` once the block completes; on any failure
    it is removed and `dst` is untouched. A non-empty `dst` needs overwrite=True."""
    if os.path.exists(dst) and os.listdir(dst) and not overwrite:
        raise ValueError(f"--dst={dst!r} exists and is not empty (pass --overwrite to replace it)")
    dst = os.path.abspath(dst)
    tmp = f"{dst}.converting-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(dst):
        shutil.rmtree(dst)
    os.replace(tmp, dst)


def save(dst: str, *, kind: str, config: mlc.ConfigDict, module: nnx.Module, tensors: Mapping[str, np.ndarray],
         dtype: str | None, source: str, extra_files: Mapping[str, str] = (), overwrite: bool = False,
         extra_meta: Mapping[str, Any] = ()) -> dict:
    """Checks `tensors` ({path string: array}) against `module` (abstract is fine), then writes the folder.

    dtype: the stored dtype of floating Params ('bfloat16', 'float32'; None keeps each array's own).
    Buffers (frozen codebooks) are stored exactly as given. Every missing, unexpected and
    wrong-shape tensor is named in one error, and nothing is written."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {KINDS}")
    params, buffers = _split(module)
    expected = params | buffers
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [f"{k}: model expects {tuple(expected[k][1].shape)}, converted {tuple(np.shape(tensors[k]))}"
             for k in sorted(set(expected) & set(tensors)) if tuple(expected[k][1].shape) != tuple(np.shape(tensors[k]))]
    if missing or unexpected or wrong:
        parts = [f"missing {missing[:12]}" if missing else "", f"unexpected {unexpected[:12]}" if unexpected else "",
                 f"shape mismatches {wrong[:12]}" if wrong else ""]
        raise ValueError(f"converted {kind} weights do not fit the model: " + "; ".join(p for p in parts if p))

    def stored(a: np.ndarray) -> np.ndarray:
        a = np.asarray(a)
        if dtype and (np.issubdtype(a.dtype, np.floating) or a.dtype.name == "bfloat16"):
            return a.astype(jax.numpy.dtype(dtype), copy=False)
        return a

    tree = {"params": nest({p: stored(tensors[k]) for k, (p, _) in params.items()})}
    if buffers:
        tree["buffers"] = nest({p: np.asarray(tensors[k]) for k, (p, _) in buffers.items()})
    numbers = int(sum(np.size(tensors[k]) for k in expected))
    meta = dict(kind=kind, source=os.path.abspath(source) if os.path.exists(source) else source, dtype=dtype or "as-is",
                tensors=len(expected), numbers=numbers, created=time.strftime("%Y-%m-%d %H:%M:%S"), **dict(extra_meta))
    with writing(dst, overwrite) as tmp:
        from illume_jax.train.checkpoint import _serial_array_saves_on_cpu
        _serial_array_saves_on_cpu()
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=_NO_COPY_REGISTRY)) as ckpt:
            ckpt.save(os.path.join(tmp, "weights"), args=ocp.args.PyTreeSave(tree))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            f.write(config.to_json(indent=1))
        for name, src in dict(extra_files).items():
            shutil.copy(src, os.path.join(tmp, name))
        with open(os.path.join(tmp, "convert.json"), "w") as f:
            json.dump(meta, f, indent=1)
    return meta


def restore(path: str, abstract_params: Any, abstract_buffers: Any = None) -> tuple[Any, Any]:
    """(params, buffers) restored into the given abstract trees (nnx.State or nested dicts of
    ShapeDtypeStructs carrying their target shardings; buffers None if the model has none)."""
    def pure(tree):
        return nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree

    target = {"params": pure(abstract_params)}
    if abstract_buffers is not None and jax.tree.leaves(pure(abstract_buffers)):
        target["buffers"] = pure(abstract_buffers)
    from illume_jax.train.checkpoint import restore_tree
    out = restore_tree(os.path.join(path, "weights"), target)

    def back(abstract, restored):
        if isinstance(abstract, nnx.State):
            state = jax.tree.map(lambda x: x, abstract)
            nnx.replace_by_pure_dict(state, restored)
            return state
        return restored

    params = back(abstract_params, out["params"])
    buffers = back(abstract_buffers, out["buffers"]) if "buffers" in out else abstract_buffers
    return params, buffers


def flat_numpy(state: Any) -> dict[str, np.ndarray]:
    """{path string: host numpy array} of an nnx.State / module's variables (for the export direction)."""
    if isinstance(state, nnx.Module):
        state = nnx.state(state)
    out = {}
    for path, var in nnx.to_flat_state(state):
        leaf = var.get_value() if hasattr(var, "get_value") else var
        if hasattr(leaf, "shape"):
            out[path_str(path)] = np.asarray(jax.device_get(leaf))
    return out
