"""Device mesh, logical-axis rules and the shardings of state and batches.

One mesh with axes (`data`, `fsdp`, `tensor`). Model code names parameter axes logically
(`glide_jax.models.layers`); `DEFAULT_RULES` maps them to mesh axes. FSDP is the default:
every kernel's input dimension is split over `fsdp`, the batch over (`data`, `fsdp`), so
params + EMA + Adam state of a multi-billion-parameter model are spread over all chips.
A dimension that a mesh axis does not divide is replicated along that axis instead.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from glide_jax.models import layers

DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
MESH_AXES = (DATA, FSDP, TENSOR)
BATCH = "batch"

Rules = Sequence[tuple[str, Any]]

DEFAULT_RULES: Rules = (
    (BATCH, (DATA, FSDP)),
    (layers.IN, FSDP),
    (layers.OUT, TENSOR),
    (layers.VOCAB, TENSOR),
    (layers.EMBED, FSDP),
    (layers.POSITION, None),
    (layers.NORM, None),
)


class MeshError(ValueError):
    """A mesh shape that cannot be built on the available devices."""


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, int, int]:
    """Resolves axis sizes (at most one may be -1) against the device count.

    >>> mesh_shape({"data": 1, "fsdp": -1, "tensor": 1}, 8)
    (1, 8, 1)
    """
    unknown = [k for k in sizes if k not in MESH_AXES]
    if unknown:
        raise MeshError(f"unknown mesh axes {unknown}; the axes are {list(MESH_AXES)}")
    shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
    free = [i for i, s in enumerate(shape) if s == -1]
    if len(free) > 1:
        raise MeshError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, shape))}")
    if any(s == 0 or s < -1 for s in shape):
        raise MeshError(f"mesh axis sizes must be positive or -1, got {dict(zip(MESH_AXES, shape))}")
    fixed = math.prod(s for s in shape if s != -1)
    if free:
        if num_devices % fixed:
            raise MeshError(f"mesh {dict(zip(MESH_AXES, shape))} does not divide {num_devices} devices")
        shape[free[0]] = num_devices // fixed
    if math.prod(shape) != num_devices:
        raise MeshError(
            f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
            f"but {num_devices} are available"
        )
    return tuple(shape)


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axes (logical-rule sharding)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(sizes, len(devices))
    if devices == list(jax.devices()):
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def _spec_for(shape: Sequence[int], names: Sequence[str | None], mesh: Mesh, rules: Rules) -> P:
    """PartitionSpec for one array; axes that do not divide a dimension are dropped."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for dim, name in zip(shape, names):
        target = table.get(name) if name is not None else None
        axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        kept = []
        for ax in axes:
            size = mesh.shape[ax]
            if ax in used or size == 1:
                continue
            if dim % (math.prod(mesh.shape[a] for a in kept) * size) == 0:
                kept.append(ax)
        used.update(kept)
        spec.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
    return P(*spec)


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """NamedShardings for a (boxed) abstract tree; unboxed leaves without names are replicated.

    Args:
      abstract_tree: output of `jax.eval_shape` whose leaves may be `nn.LogicallyPartitioned`.
    Returns:
      The same (unboxed) structure with a NamedSharding per leaf.
    """

    def one(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            value = leaf.value
            return NamedSharding(mesh, _spec_for(value.shape, leaf.names, mesh, rules))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, abstract_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) axis over every data-parallel mesh axis, the rest replicated."""
    return NamedSharding(mesh, P((DATA, FSDP), *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape[DATA] * mesh.shape[FSDP]


def bytes_per_device(tree: Any) -> dict[Any, int]:
    """Bytes of every addressable shard of `tree`, summed per device."""
    out: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out
