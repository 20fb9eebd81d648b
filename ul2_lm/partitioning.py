"""Device meshes, logical-axis rules and sharded arrays.

T5X's partitioner in `jax.sharding` terms: parameters and activations carry *logical* axis names
('embed', 'mlp', 'activation_batch', ...); an ordered list of rules, which is data in the config,
maps each logical name to mesh axes ('data', 'fsdp', 'tensor'). The first rule for a name wins,
and a mesh axis is used at most once per array (later dimensions fall back to replication), as in
T5X and Flax's `logical_to_mesh_axes`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Parameters are created unsharded (abstractly or inside a jit with out_shardings); the project
# never relies on Flax placing variables eagerly.
nnx.use_eager_sharding(False)

MeshAxes = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, MeshAxes]]

# Batch over data and fsdp (FSDP shards weights along 'embed' and gathers them per layer);
# heads / mlp / vocab over tensor. One K/V head (MQA) cannot be split, so 'kv_heads' replicates.
DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", None),
    ("activation_head_dim", None),
    ("activation_vocab", "tensor"),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", None),
    ("head_dim", None),
    ("layers", None),
    ("prompt", None),
    ("lora_rank", None),
)


class MeshError(ValueError):
    """A mesh shape that the available devices cannot satisfy."""


def resolve_mesh_shape(axes: Sequence[tuple[str, int]], num_devices: int) -> dict[str, int]:
    """Fills in the one axis of size -1 so that the product equals `num_devices`."""
    names = [name for name, _ in axes]
    if len(set(names)) != len(names):
        raise MeshError(f"config.mesh.axes: duplicate axis name in {names}")
    unknown = [name for name, size in axes if size == -1]
    if len(unknown) > 1:
        raise MeshError(f"config.mesh.axes: at most one axis may be -1, got {unknown}")
    for name, size in axes:
        if size != -1 and (not isinstance(size, int) or size < 1):
            raise MeshError(f"config.mesh.axes: axis {name!r} has size {size!r}; use a positive int or -1")
    known = math.prod(size for _, size in axes if size != -1)
    if unknown:
        if num_devices % known:
            raise MeshError(
                f"config.mesh.axes: the fixed axes multiply to {known}, which does not divide the "
                f"{num_devices} available devices")
        return {name: (num_devices // known if size == -1 else size) for name, size in axes}
    if known != num_devices:
        raise MeshError(
            f"config.mesh.axes: mesh {dict(axes)} has {known} devices but {num_devices} are available")
    return dict(axes)


def make_mesh(axes: Sequence[tuple[str, int]], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with the named axes; sizes of -1 are inferred from the device count."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(axes, len(devices))
    sizes = tuple(shape.values())
    try:
        device_array = mesh_utils.create_device_mesh(sizes, devices=devices)
    except Exception:  # noqa: BLE001 - fake CPU devices have no physical topology.
        device_array = np.asarray(devices).reshape(sizes)
    return Mesh(device_array, tuple(shape))


def logical_to_mesh_spec(names: Sequence[str | None] | None, rules: Rules) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec; each mesh axis is used at most once."""
    if names is None:
        return PartitionSpec()
    table: dict[str, MeshAxes] = {}
    for logical, mesh_axes in rules:
        table.setdefault(logical, mesh_axes)
    used: set[str] = set()
    spec = []
    for name in names:
        mesh_axes = table.get(name) if name is not None else None
        if mesh_axes is None:
            spec.append(None)
            continue
        axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec)


def _drop_indivisible(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Replicates dimensions that the assigned mesh axes do not divide (e.g. one KV head)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            out.append(None)
            continue
        names = (axes,) if isinstance(axes, str) else tuple(axes)
        size = math.prod(mesh.shape[a] for a in names)
        out.append(axes if dim % size == 0 else None)
    return PartitionSpec(*out)


def _logical_names(variable: Any) -> tuple[str | None, ...] | None:
    if isinstance(variable, nnx.Variable):
        metadata = variable.get_metadata()
        names = metadata.get("out_sharding") or metadata.get("sharding_names")
        return tuple(names) if names is not None else None
    return None


def _is_leaf(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for an (abstract) nnx.State or pytree, from its logical axis metadata.

    The result has the structure of `state` with each Variable replaced by a Variable whose value
    is a NamedSharding (what `jax.jit(out_shardings=...)` takes for nnx.State); plain arrays map to
    a replicated NamedSharding.
    """

    def one(leaf):
        if isinstance(leaf, nnx.Variable):
            names = _logical_names(leaf)
            spec = _drop_indivisible(logical_to_mesh_spec(names, rules), leaf.get_value().shape, mesh)
            return leaf.replace(NamedSharding(mesh, spec))
        shape = getattr(leaf, "shape", ())
        return NamedSharding(mesh, PartitionSpec(*([None] * len(shape))))

    return jax.tree.map(one, state, is_leaf=_is_leaf)


# The active mesh and rules, for activation constraints inside the model.
_ACTIVE: contextvars.ContextVar[tuple[Mesh, tuple] | None] = contextvars.ContextVar(
    "ul2_lm_partitioning", default=None)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """Makes `constrain` shard activations over `mesh` by `rules` while tracing in this block."""
    token = _ACTIVE.set((mesh, tuple((k, v) for k, v in rules)))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Constrains an activation's sharding by logical names; a no-op without an active mesh."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    if mesh.size == 1:
        return x
    spec = _drop_indivisible(logical_to_mesh_spec(names, rules), x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 2) -> NamedSharding:
    """Sharding of a [batch, length, ...] input batch."""
    names = ("activation_batch",) + (None,) * (ndim - 1)
    return NamedSharding(mesh, logical_to_mesh_spec(names, rules))


def data_parallel_size(mesh: Mesh, rules: Rules) -> int:
    """How many ways the batch dimension is split."""
    axes = logical_to_mesh_spec(("activation_batch",), rules)[0]
    if axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[a] for a in names)


def host_batch_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh, rules: Rules,
                         global_batch_size: int) -> dict[str, jax.Array]:
    """Assembles each host's slice of the batch into global arrays sharded over the mesh.

    Every host passes the rows it loaded itself (per-host data loading); on one host this is the
    whole batch.
    """
    out = {}
    for key, value in batch.items():
        sharding = batch_sharding(mesh, rules, value.ndim)
        global_shape = (global_batch_size,) + value.shape[1:]
        out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out
