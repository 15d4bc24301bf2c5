"""FSDP partition specs of the model's parameters (from the nnx.with_partitioning metadata)."""

from __future__ import annotations

from flax import nnx


def partition_specs(model: nnx.Module, filter=nnx.Param):
    """A state-shaped pytree of jax.sharding.PartitionSpec for the model's parameters.

    Large kernels name the mesh axis 'fsdp' on their output dimension; everything else is
    PartitionSpec() (replicated). The caller replicates any dim not divisible by the fsdp size.
    """
    return nnx.get_partition_spec(nnx.state(model, filter))
