"""Per-stage optimizer: AdamW with a schedule, LR groups, clipping, freezing and new-row-only updates.

Freezing goes through `optax.multi_transform` with `set_to_zero()` for frozen leaves, so
frozen parameters get neither an update nor optimizer state (`optax.masked` alone would
pass their raw gradients through: see shared/reference/nnx_patterns.md §3).
"new_vocab_only" (ILLUME stage 1) zeroes the *updates* of embedding / head rows below
`text_vocab_size` after AdamW, so decoupled weight decay cannot move them either.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

EMBED_PATH = "embed/embedding"   # [V, D]: rows are vocabulary entries
HEAD_PATH = "lm_head/kernel"     # [D, V]: columns are vocabulary entries


def path_str(path) -> str:
    """'/'-joined names of a pytree key path, e.g. 'layers/attn/q_proj/kernel'.

    The trailing `.value` of an NNX Variable (a pytree node of its own) is dropped, so the
    names are the parameter paths users write patterns against.
    """
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]
    parts = []
    for k in path:
        key = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
        parts.append(str(key))
    return "/".join(parts)


def schedule(stage: Any) -> optax.Schedule:
    """Linear warm-up to stage.lr, then cosine / linear / constant to lr * end_lr_ratio."""
    warmup, steps = int(stage.warmup_steps), int(stage.steps)
    end = stage.lr * stage.end_lr_ratio
    decay_steps = max(steps - warmup, 1)
    if stage.schedule == "cosine":
        after = optax.cosine_decay_schedule(stage.lr, decay_steps, alpha=stage.end_lr_ratio)
    elif stage.schedule == "linear":
        after = optax.linear_schedule(stage.lr, end, decay_steps)
    elif stage.schedule == "constant":
        after = optax.constant_schedule(stage.lr)
    else:
        raise ValueError(f"stage {stage.name!r}: schedule={stage.schedule!r}: expected cosine, linear or constant")
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, stage.lr, warmup), after], [warmup])


def _match_first(patterns, path: str):
    for p in patterns:
        if re.fullmatch(p, path):
            return p
    return None


def param_labels(params, stage: Any) -> Callable:
    """A callable labelling each parameter 'frozen' or 'lr<i>' (its LR-multiplier group).

    Checks every pattern against the parameter paths first: a pattern that matches nothing
    is almost certainly a typo and fails, naming the stage and the pattern.
    """
    paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    for kind, patterns in (("trainable", stage.trainable), ("lr_multipliers", tuple(p for p, _ in stage.lr_multipliers))):
        for pat in patterns:
            if not any(re.fullmatch(pat, p) for p in paths):
                raise ValueError(f"stage {stage.name!r}: {kind} pattern {pat!r} matches no parameter "
                                 f"(parameters look like {paths[:4]})")
    multipliers = tuple(stage.lr_multipliers)

    def label(path, _):
        s = path_str(path)
        if _match_first(stage.trainable, s) is None:
            return "frozen"
        for i, (pat, _) in enumerate(multipliers):
            if re.fullmatch(pat, s):
                return f"lr{i + 1}"
        return "lr0"

    return lambda tree: jax.tree_util.tree_map_with_path(label, tree)


def _zero_old_vocab_rows(text_vocab_size: int) -> optax.GradientTransformation:
    def update(updates, state, params=None):
        del params

        def mask(path, u):
            s = path_str(path)
            s = s[4:] if s.startswith("llm/") else s  # the MLLM's LLM lives under llm/
            if s == EMBED_PATH:
                keep = jnp.arange(u.shape[0]) >= text_vocab_size
                return jnp.where(keep[:, None], u, 0)
            if s == HEAD_PATH:
                keep = jnp.arange(u.shape[1]) >= text_vocab_size
                return jnp.where(keep[None, :], u, 0)
            return u
        return jax.tree_util.tree_map_with_path(mask, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def frozen_mask(params, stage: Any):
    """A pytree of Python bools like `params`: True where the stage does not train the parameter."""
    return jax.tree.map(lambda label: label == "frozen", param_labels(params, stage)(params))


def parameter_counts(params, stage: Any) -> tuple[int, int]:
    """(parameters the stage trains -- those in its optimizer --, all parameters); params may be abstract."""
    frozen = jax.tree.leaves(frozen_mask(params, stage))
    sizes = [math.prod(x.shape) for x in jax.tree.leaves(params)]
    return sum(n for n, f in zip(sizes, frozen) if not f), sum(sizes)


def trainable_summary(params, stage: Any) -> str:
    """'trains 1,234,567 of 4,567,890 parameters' for a stage (params may be abstract): the stage header
    says it, so a `trainable` override that froze or opened more than meant shows at once."""
    trained, total = parameter_counts(params, stage)
    rows = " (of the embedding and head, only the new vocabulary rows)" if stage.new_vocab_only else ""
    return f"trains {trained:,} of {total:,} parameters{rows}"


def drop_frozen(grads, frozen):
    """Constant zeros in place of frozen parameters' gradients. Applied in the step before anything
    reads the gradients (grad-norm metric, NaN guard, optimizer), nothing depends on those weight
    gradients and XLA drops their matmuls (a frozen vision tower's whole backward)."""
    return jax.tree.map(lambda g, f: jnp.zeros_like(g) if f else g, grads, frozen)


def zero_frozen(labels: Callable, groups: set[str]) -> optax.GradientTransformation:
    """Zeroes the gradients of frozen parameters (stateless)."""
    return optax.multi_transform({g: optax.set_to_zero() if g == "frozen" else optax.identity() for g in groups},
                                 labels)


def make_optimizer(config: Any, stage_index: int, params) -> optax.GradientTransformation:
    """The optimizer of one stage (its own schedule starting at the stage's step 0)."""
    stage = config.stages[stage_index]
    o = config.optim
    labels = param_labels(params, stage)
    sched = schedule(stage)
    mu_dtype = jnp.bfloat16 if o.mu_dtype == "bfloat16" else jnp.float32

    def adamw(multiplier: float):
        return optax.adamw(
            learning_rate=lambda step: sched(step) * multiplier, b1=o.b1, b2=o.b2, eps=o.eps,
            weight_decay=o.weight_decay, mu_dtype=mu_dtype)

    transforms = {"frozen": optax.set_to_zero(), "lr0": adamw(1.0)}
    for i, (_, mult) in enumerate(stage.lr_multipliers):
        transforms[f"lr{i + 1}"] = adamw(float(mult))
    # Frozen gradients are zeroed first, so they never count in the clipping norm. (Their matmuls
    # are dropped only if the step itself reads no raw gradient: see `drop_frozen`.)
    chain = [zero_frozen(labels, set(transforms))]
    if o.clip_norm > 0:
        chain.append(optax.clip_by_global_norm(o.clip_norm))
    chain.append(optax.multi_transform(transforms, labels))
    if stage.new_vocab_only:
        chain.append(_zero_old_vocab_rows(config.model.text_vocab_size))
    return optax.chain(*chain)


def learning_rate(config: Any, stage_index: int, stage_step) -> jax.Array:
    """The base LR of the stage at `stage_step` (for logging)."""
    return schedule(config.stages[stage_index])(stage_step)
