"""The backend choices of the LMDIR network, read once from its config when the network is built.

- `model.kernels` (`KERNELS`): which functions its convolutions and dense layers compute with:
  'xla' lax's operations, 'cpu' the XLA:CPU forms of `models/backend_cpu.py` (same mathematics);
  'auto' is 'cpu' on CPUs, else 'xla'. `select_kernels` sets them on a built network. The layers
  (`models/layers.py`) are built with lax's operations and know nothing of this; parameters do not
  depend on it.
- `model.scan_unroll` (`SCAN_UNROLLS`): how a scanned stack of blocks is compiled (the parameters
  are stacked either way). 'loop': one block compiled and run n times (compile time independent of
  depth); 'unrolled': the n blocks compiled one after another (faster steps on XLA:CPU, longer
  compile; docs/benchmarks.md); 'auto': unrolled on CPUs, a loop elsewhere.
"""

from __future__ import annotations

import jax
from flax import nnx

from lmdir_jax.models import backend_cpu

KERNELS = ("auto", "xla", "cpu")
SCAN_UNROLLS = ("auto", "loop", "unrolled")


def _on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def resolve_kernels(name: str) -> str:
    """'xla' or 'cpu' for a `model.kernels` value."""
    if name not in KERNELS:
        raise ValueError(f"model.kernels must be one of {', '.join(KERNELS)}, got {name!r}")
    if name == "auto":
        return "cpu" if _on_cpu() else "xla"
    return name


def kernels_of(model_config) -> str:
    """The `model.kernels` value of a model config (a run saved with the key's former name,
    `conv_impl`, is read by that name)."""
    return str(model_config.get("kernels", model_config.get("conv_impl", "auto")))


def select_kernels(model: nnx.Module, name: str) -> nnx.Module:
    """Make every nnx.Conv and nnx.Linear in `model` compute with the kernels of `name`
    (`model.kernels`); returns `model`."""
    cpu = resolve_kernels(name) == "cpu"
    conv_fn = backend_cpu.conv_general_dilated if cpu else jax.lax.conv_general_dilated
    dot_fn = backend_cpu.dot_general if cpu else jax.lax.dot_general
    for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.Conv):
            module.conv_general_dilated = conv_fn
        elif isinstance(module, nnx.Linear):
            module.dot_general = dot_fn
    return model


def resolve_scan_unroll(name: str) -> bool:
    """Whether scanned blocks compile unrolled, for a `model.scan_unroll` value."""
    if name not in SCAN_UNROLLS:
        raise ValueError(f"model.scan_unroll must be one of {', '.join(SCAN_UNROLLS)}, got {name!r}")
    if name == "auto":
        return _on_cpu()
    return name == "unrolled"
