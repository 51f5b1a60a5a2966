"""Device mesh, logical-axis rules and the shardings of state, batches and activations.

One mesh with axes (`data`, `fsdp`, `tensor`). Model code names parameter axes logically
(`glide_jax.models.layers`) and constrains activations at block boundaries to the logical
`batch` axis; the rules (`config.mesh.rules`, data: a list of (logical name, mesh axis or axes
or None)) map them to mesh axes, converted with flax's `logical_to_mesh_axes`. FSDP is the
default (`DEFAULT_RULES`): every kernel's input dimension is split over `fsdp`, the batch over
(`data`, `fsdp`), so params + EMA + Adam state of a multi-billion-parameter model are spread
over all chips. A dimension that a mesh axis does not divide is replicated along that axis.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from glide_jax.models import layers

DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
MESH_AXES = (DATA, FSDP, TENSOR)
BATCH = layers.BATCH

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


def mesh_from_config(mesh_config: Mapping[str, Any], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh of `config.mesh` (its axis sizes; `rules` are not axes)."""
    return make_mesh({a: mesh_config[a] for a in MESH_AXES if a in mesh_config}, devices)


def normalize_rules(rules: Rules | None) -> tuple[tuple[str, Any], ...]:
    """Rules as flax wants them (tuples; lists from a JSON-saved config become tuples)."""
    if rules is None:
        return tuple(DEFAULT_RULES)
    out = []
    for rule in rules:
        name, target = rule
        if isinstance(target, (list, tuple)):
            target = tuple(target)
        out.append((str(name), target))
    return tuple(out)


class RulesError(ValueError):
    """Sharding rules that name unknown logical or mesh axes."""


def check_rules(rules: Rules | None) -> None:
    """Raises RulesError (one line) for a rule that is not (logical name, mesh axes)."""
    known_logical = {BATCH, layers.IN, layers.OUT, layers.VOCAB, layers.EMBED, layers.POSITION, layers.NORM}
    for rule in rules or ():
        if len(rule) != 2:
            raise RulesError(f"mesh.rules: {rule!r} is not a (logical axis, mesh axes) pair")
        name, target = rule
        targets = layers.entry_axes(target)
        if name not in known_logical:
            raise RulesError(f"mesh.rules: unknown logical axis {name!r}; known: {sorted(known_logical)}")
        bad = [t for t in targets if t not in MESH_AXES]
        if bad:
            raise RulesError(f"mesh.rules: {name!r} -> unknown mesh axes {bad}; the axes are {list(MESH_AXES)}")


def _divisible(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """Drops, per dimension, the mesh axes that do not divide it (or have size 1)."""
    used: set[str] = set()
    out = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = layers.entry_axes(entry)
        kept = []
        for ax in axes:
            size = mesh.shape[ax]
            if ax in used or size == 1:
                continue
            if dim % (math.prod(mesh.shape[a] for a in kept) * size) == 0:
                kept.append(ax)
        used.update(kept)
        out.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
    return P(*out)


def spec_for(shape: Sequence[int], names: Sequence[str | None], mesh: Mesh, rules: Rules | None = None) -> P:
    """PartitionSpec of one array with logical axis `names` (flax's conversion, then axes that
    do not divide their dimension are dropped)."""
    spec = nn.logical_to_mesh_axes(tuple(names), normalize_rules(rules))
    return _divisible(spec, shape, mesh)


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
    """NamedShardings for a (boxed) abstract tree; unboxed leaves without names are replicated.

    Args:
      abstract_tree: output of `jax.eval_shape` whose leaves may be `nn.LogicallyPartitioned`.
      rules: logical -> mesh axes (`config.mesh.rules`); None = DEFAULT_RULES.
    Returns:
      The same (unboxed) structure with a NamedSharding per leaf.
    """

    def one(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            return NamedSharding(mesh, spec_for(leaf.value.shape, leaf.names, mesh, rules))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, abstract_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def split_over_data(abstract_tree: Any, shardings: Any) -> Any:
    """The shardings with each array also split over the `data` axis (ZeRO-1 for the optimizer
    state and EMA: every data-parallel replica updates only its part).

    Per leaf, the largest dimension that the `data` axis (times the axes already on it) divides
    gets it; scalars, leaves already split over `data` and leaves no dimension of which divides
    are left as they are. A mesh whose `data` axis has size 1 changes nothing.

    Args:
      abstract_tree: arrays or ShapeDtypeStructs; shardings: the same tree of NamedShardings.
    """

    def one(leaf, sh):
        mesh = sh.mesh
        d = mesh.shape.get(DATA, 1)
        shape = np.shape(leaf)
        spec = list(tuple(sh.spec) + (None,) * (len(shape) - len(sh.spec)))
        entries = [layers.entry_axes(e) for e in spec]
        if d == 1 or any(DATA in e for e in entries):
            return sh
        for i in sorted(range(len(shape)), key=lambda i: -shape[i]):
            if shape[i] % (math.prod(mesh.shape[a] for a in entries[i]) * d) == 0:
                axes = entries[i] + (DATA,)
                spec[i] = axes[0] if len(axes) == 1 else axes
                return NamedSharding(mesh, P(*spec))
        return sh

    return jax.tree.map(one, abstract_tree, shardings)


def batch_axes(mesh: Mesh, rules: Rules | None = None) -> Any:
    """The mesh axes the leading (batch) axis is split over, per the rules' `batch` entry."""
    entry = nn.logical_to_mesh_axes((BATCH,), normalize_rules(rules))[0]
    axes = layers.entry_axes(entry)
    axes = tuple(a for a in axes if a in mesh.axis_names)
    return axes[0] if len(axes) == 1 else (axes or None)


def batch_sharding(mesh: Mesh, ndim: int = 1, rules: Rules | None = None, *, leading: int = 0) -> NamedSharding:
    """Batch axis (after `leading` unsharded axes) over the rules' batch axes, the rest replicated."""
    spec = [None] * leading + [batch_axes(mesh, rules)] + [None] * (ndim - leading - 1)
    return NamedSharding(mesh, P(*spec))


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules: Rules | None = None):
    """Context in which the models' `layers.constrain_batch` calls become sharding constraints
    on `mesh` (outside it they are no-ops). Enter it inside the jitted function, around the
    trace (the abstract mesh is what may be set under jit)."""
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(normalize_rules(rules)):
        yield


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape[DATA] * mesh.shape[FSDP]


def bytes_per_device(tree: Any) -> dict[Any, int]:
    """Bytes of every addressable shard of `tree`, summed per device."""
    out: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out
