"""Partition specs of the model's parameters (from their nnx.with_partitioning metadata)."""

from __future__ import annotations

from flax import nnx


def partition_specs(model: nnx.Module, rules=None, filter=nnx.Param):
    """A state-shaped pytree of jax.sharding.PartitionSpec for the model's parameters.

    Without `rules` the specs hold the model's logical axis names (kernels ('embed', 'mlp') on
    their input and output dimensions, 'layers' on stacked blocks, 'heads'); with `rules`
    (pairs logical name -> mesh axis or None, as `train.axis_rules`) they name mesh axes.
    Unannotated parameters are PartitionSpec() (replicated).
    """
    state = nnx.state(model, filter)
    if rules is None:
        return nnx.get_partition_spec(state)
    with nnx.logical_axis_rules(tuple(rules)):
        return nnx.get_partition_spec(state)
