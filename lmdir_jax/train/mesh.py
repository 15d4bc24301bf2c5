"""The device mesh ('data', 'fsdp'), parameter and batch shardings (multi-process start-up: distributed.py)."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lmdir_jax.errors import UsageError

AXES = ("data", "fsdp")
BATCH_SPEC = P(("data", "fsdp"))


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
        AXES,
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


def state_shardings(abstract_state, mesh: jax.sharding.Mesh):
    """NamedShardings for an (abstract) nnx.State from its partition annotations, fitted to mesh."""
    from flax import nnx

    specs = nnx.get_partition_spec(abstract_state)

    def one(x, spec):
        if not isinstance(spec, P):
            spec = P()
        shape = getattr(x, "shape", ())
        return NamedSharding(mesh, fit_spec(spec, tuple(shape), mesh))

    return jax.tree.map(one, abstract_state, specs)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch) axis sharded over both mesh axes."""
    return NamedSharding(mesh, BATCH_SPEC)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Fully replicated sharding on `mesh`."""
    return NamedSharding(mesh, P())


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
