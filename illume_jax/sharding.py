"""Device mesh, logical-axis rules and global batches.

One table (`LOGICAL_AXIS_RULES`) maps the logical names every parameter and activation
carries to mesh axes; layers never mention mesh axes themselves (flax gemma / MaxText
style). Mesh axes are ('data', 'fsdp', 'tensor'), created with Auto axis types: the
default Explicit axes of `jax.make_mesh` break NNX's sharding propagation.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (or tuple of axes, or None = replicated).
# Batch is split over data *and* fsdp (ZeRO-3 style: fsdp shards params and data alike).
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("layers", None),      # scanned layer axis: never sharded (each step reads one layer)
    ("embed", "fsdp"),     # model width D
    ("mlp", "tensor"),     # MLP hidden F
    ("heads", "tensor"),   # query heads N
    ("kv_heads", "tensor"),  # key/value heads K
    ("head_dim", None),    # H
    ("vocab", "tensor"),   # V
    ("conv_out", "tensor"),  # output channels of CNN kernels (HWIO)
    ("conv_in", "fsdp"),     # input channels of CNN kernels: storage only (gathered before the conv)
    ("norm", None),
    # Activations. Hidden states are replicated over 'tensor' between blocks (Megatron
    # style) and never sharded over 'fsdp' (their batch axis already is).
    ("act_seq", None),     # T (a 'sequence' axis could be added here for context parallelism)
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("cache_len", None),   # S of the KV cache
)


def _resolve_mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Turns {'data': -1, 'fsdp': 2, 'tensor': 1} into a concrete shape (at most one -1)."""
    sizes = [int(mesh_config.get(a, 1)) for a in MESH_AXES]
    unknown = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
    if len(unknown) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1 (the rest), got {dict(zip(MESH_AXES, sizes))}")
    for a, s in zip(MESH_AXES, sizes):
        if s == 0 or s < -1:
            raise ValueError(f"config.mesh.{a}={s}: expected a positive size or -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if unknown:
        if num_devices % known:
            raise ValueError(
                f"config.mesh={dict(zip(MESH_AXES, sizes))}: {num_devices} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise ValueError(
            f"config.mesh={dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, have {num_devices}")
    return tuple(sizes)


def make_mesh(mesh_config: Mapping[str, int], devices: list | None = None) -> Mesh:
    """Builds the ('data', 'fsdp', 'tensor') mesh from config.mesh (-1 = all remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = _resolve_mesh_shape(mesh_config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


@contextlib.contextmanager
def use_mesh(mesh: Mesh):
    """Activates the mesh and the logical-axis rules (needed for sharded NNX creation)."""
    from flax import nnx
    with jax.set_mesh(mesh), nnx.logical_axis_rules(LOGICAL_AXIS_RULES):
        yield mesh


def logical_axis_size(name: str) -> int:
    """Devices the logical axis `name` is split over on the current mesh (1 outside a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = dict(LOGICAL_AXIS_RULES).get(name)
    if mesh is None or mesh.empty or axes is None:
        return 1
    return int(np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)]))


def shares_mesh_axis(a: str | None, b: str | None) -> bool:
    """Whether logical axes `a` and `b` map onto a common mesh axis (one spec cannot use both)."""
    rules = dict(LOGICAL_AXIS_RULES)
    as_set = lambda n: set() if n is None or rules.get(n) is None else (  # noqa: E731
        {rules[n]} if isinstance(rules[n], str) else set(rules[n]))
    return bool(as_set(a) & as_set(b))


def logical_to_spec(logical_axes: tuple[str | None, ...]) -> P:
    rules = dict(LOGICAL_AXIS_RULES)
    return P(*[rules.get(a) if a is not None else None for a in logical_axes])


def named_sharding(mesh: Mesh, *logical_axes: str | None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(tuple(logical_axes)))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading batch axis over ('data', 'fsdp'), the rest replicated."""
    return named_sharding(mesh, "batch", *([None] * (ndim - 1)))


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def global_batch(mesh: Mesh, local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """Per-process numpy batch -> global jax.Arrays sharded over the batch axes.

    Each process passes only the rows it loaded (its Grain shard); the global batch is
    `process_count` times larger.
    """
    out = {}
    for k, v in local_batch.items():
        v = np.asarray(v)
        out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
    return out


def maybe_initialize_distributed() -> bool:
    """Calls jax.distributed.initialize() when the environment asks for several processes.

    Recognised: JAX_COORDINATOR_ADDRESS + JAX_PROCESS_COUNT + JAX_PROCESS_ID (local or
    generic clusters); on TPU pods / SLURM, JAX_DISTRIBUTED_AUTO=1 lets jax detect them.
    """
    if getattr(maybe_initialize_distributed, "_done", False):
        return True
    count = int(os.environ.get("JAX_PROCESS_COUNT", "1"))
    if count > 1:
        coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS")
        if not coordinator:
            raise ValueError("JAX_PROCESS_COUNT > 1 needs JAX_COORDINATOR_ADDRESS (host:port of process 0)")
        if "JAX_PROCESS_ID" not in os.environ:
            raise ValueError("JAX_PROCESS_COUNT > 1 needs JAX_PROCESS_ID (0 .. count-1)")
        kwargs = {}
        if os.environ.get("JAX_LOCAL_DEVICE_IDS"):
            kwargs["local_device_ids"] = [int(x) for x in os.environ["JAX_LOCAL_DEVICE_IDS"].split(",")]
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=count,
                                   process_id=int(os.environ["JAX_PROCESS_ID"]), **kwargs)
    elif os.environ.get("JAX_DISTRIBUTED_AUTO") == "1":
        jax.distributed.initialize()
    else:
        return False
    maybe_initialize_distributed._done = True
    return True


def constrain(x: jax.Array, *logical_axes: str | None) -> jax.Array:
    """with_sharding_constraint by logical names; a no-op outside a mesh (eager tests, one device)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(tuple(logical_axes)))
