"""lmdir_jax.models: the LMDIR network (Flax NNX) and the Priors it consumes.

Names are imported lazily so that `lmdir_jax.models.config` (read by every config load) does not
pull in JAX.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LMDIR": "lmdir_jax.models.lmdir",
    "build_model": "lmdir_jax.models.lmdir",
    "Priors": "lmdir_jax.models.priors",
    "drop_priors": "lmdir_jax.models.priors",
    "count_params": "lmdir_jax.models.summary",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lmdir_jax.models' has no attribute {name!r}")
