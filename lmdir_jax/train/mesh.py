"""The device mesh ('data', 'fsdp'), logical-axis parameter shardings and batch shardings
(multi-process start-up: distributed.py)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lmdir_jax.axes import MESH_AXES
from lmdir_jax.errors import UsageError
from lmdir_jax.train.config import DEFAULT_AXIS_RULES

BATCH_SPEC = P(MESH_AXES)


def make_mesh(mesh_data: int = -1, mesh_fsdp: int = 1, devices=None) -> jax.sharding.Mesh:
    """A ('data', 'fsdp') mesh; mesh_data=-1 uses all devices divided by mesh_fsdp.

    Both axes are `AxisType.Auto` (compiler-chosen sharding of intermediates; see ECOSYSTEM.md).
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if mesh_fsdp < 1 or n % mesh_fsdp:
        raise UsageError(f"train.mesh_fsdp={mesh_fsdp} does not divide the {n} devices")
    data = n // mesh_fsdp if mesh_data == -1 else mesh_data
    if data * mesh_fsdp != n:
        raise UsageError(
            f"mesh data={data} x fsdp={mesh_fsdp} = {data * mesh_fsdp} != {n} devices "
            "(set train.mesh_data=-1 to use all devices)"
        )
    return jax.make_mesh(
        (data, mesh_fsdp),
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * 2,
        devices=devices,
    )


def mesh_from_config(config, devices=None) -> jax.sharding.Mesh:
    """The mesh described by `config.train.mesh_data` / `mesh_fsdp`."""
    return make_mesh(int(config.train.mesh_data), int(config.train.mesh_fsdp), devices)


def fit_spec(spec: P, shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> P:
    """`spec` with every dimension that its mesh axes do not divide evenly replicated instead."""
    entries = list(spec) + [None] * (len(shape) - len(spec))
    out = []
    for dim, entry in zip(shape, entries[: len(shape)], strict=True):
        if entry is None:
            out.append(None)
            continue
        names = entry if isinstance(entry, tuple) else (entry,)
        size = int(np.prod([mesh.shape[a] for a in names]))
        out.append(entry if dim % size == 0 else None)
    return P(*out)


def logical_specs(abstract_state, rules) -> Any:
    """PartitionSpecs of an (abstract) nnx.State: each variable's logical axis names (its
    `out_sharding` metadata, e.g. ('layers', None, None, 'embed', 'mlp')) mapped to mesh axes by
    `rules`, pairs (logical name, mesh axis or None) as in `train.axis_rules`. Unannotated
    variables are replicated."""
    rules = tuple((str(name), None if axis is None else axis) for name, axis in rules)
    known = {name for name, _ in rules}
    with nnx.logical_axis_rules(rules):
        specs = nnx.get_partition_spec(abstract_state)
    for var in jax.tree.leaves(abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        names = (var.get_metadata().get("out_sharding") or ()) if isinstance(var, nnx.Variable) else ()
        missing = [n for n in names if n is not None and n not in known]
        if missing:
            raise UsageError(f"train.axis_rules has no rule for the logical axis {missing[0]!r} "
                             f"(rules: {', '.join(sorted(known))})")
    return specs


def state_shardings(abstract_state, mesh: jax.sharding.Mesh, rules=DEFAULT_AXIS_RULES):
    """NamedShardings for an (abstract) nnx.State: logical axes mapped by `rules`
    (`logical_specs`), then fitted to `mesh` (`fit_spec`: a dimension its mesh axes do not divide
    is replicated)."""
    for name, axis in rules:
        for a in (axis if isinstance(axis, tuple | list) else (axis,)):
            if a is not None and a not in mesh.axis_names:
                raise UsageError(f"train.axis_rules maps {name!r} to {a!r}, which is not a mesh "
                                 f"axis ({', '.join(mesh.axis_names)})")
    specs = logical_specs(abstract_state, rules)

    def one(x, spec):
        if not isinstance(spec, P):
            spec = P()
        return NamedSharding(mesh, fit_spec(spec, tuple(getattr(x, "shape", ())), mesh))

    return jax.tree.map(one, abstract_state, specs)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch) axis sharded over both mesh axes."""
    return NamedSharding(mesh, BATCH_SPEC)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Fully replicated sharding on `mesh`."""
    return NamedSharding(mesh, P())


def place_identical(tree: Any, shardings: Any) -> Any:
    """Arrays that every process holds whole and alike (a seeded eager creation) -> global arrays.

    One process: `jax.device_put`. Several: each process slices out its own shards
    (`jax.make_array_from_callback`). `device_put` would instead check that every array is the same
    on all processes: one cross-process gather per array (705 for the tiny config's train state)
    and one compile per array shape (a tiny-config process compiled 110 programs, now 22).
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(x, sharding):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree, shardings)


def global_batch(local: dict, mesh: jax.sharding.Mesh) -> dict:
    """Numeric arrays of a per-host batch -> global jax.Arrays sharded over the batch axis.

    String arrays (deg_text, key, source) and `source_id` stay on the host and are dropped here.
    """
    sharding = batch_sharding(mesh)
    out = {}
    for k, v in local.items():
        a = np.asarray(v)
        if a.dtype.kind in "USO" or k == "source_id":
            continue
        out[k] = jax.make_array_from_process_local_data(sharding, a)
    return out
