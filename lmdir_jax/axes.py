"""The names of the sharding axes, defined here and nowhere else (JAX-free).

Mesh axes (`train/mesh.py` builds the mesh): DATA, data parallelism, and FSDP, fully sharded
parameters; a batch is sharded over both. Logical axes, named by the model's parameters and mapped
to mesh axes by `train.axis_rules`: EMBED (a kernel's input dimension), MLP (its output
dimension), HEADS (per-head parameters) and LAYERS (the leading axis of stacked blocks).
"""

DATA, FSDP = "data", "fsdp"
MESH_AXES = (DATA, FSDP)

EMBED, MLP, HEADS, LAYERS = "embed", "mlp", "heads", "layers"
