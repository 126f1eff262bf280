"""`module_jit`: jit for read-only functions of an NNX module, without `nnx.jit`'s per-call copy.

`nnx.jit` hands the module's state back out of every call so that mutations inside propagate,
and that output is a copy of every parameter: 190 ms per call for the 169 M-parameter MLLM of
`bench/generate.py` on 2 CPU cores (~3% of a whole 367-token image at batch 1, paid by every
call, and more for callers that make many short calls), against 3.5 ms for `nnx.split` +
`jax.jit`. Inference functions never mutate the model, so they take
the split state as an ordinary (non-donated) argument and return only their results.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
from flax import nnx


def module_jit(fn: Callable, *, static_argnames: tuple[str, ...] = ()) -> Callable:
    """`fn(module, *args, **kwargs)` compiled once per (module structure, static args, shapes).

    The module must not be mutated by `fn` (its changes would be dropped); the jitted pure
    function is `.pure` (`.pure._cache_size()` counts compilations)."""

    @functools.partial(jax.jit, static_argnames=("graphdef", *static_argnames))
    def pure(state, *args, graphdef, **kwargs):
        return fn(nnx.merge(graphdef, state), *args, **kwargs)

    @functools.wraps(fn)
    def call(module, *args, **kwargs):
        graphdef, state = nnx.split(module)
        return pure(state, *args, graphdef=graphdef, **kwargs)

    call.pure = pure
    return call
