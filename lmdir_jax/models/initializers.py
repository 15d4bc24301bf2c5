"""The LMDIR parameters' initialisers, the same for every kernel choice (`model.kernels`).

Eagerly the numbers come from numpy seeded by the key's data (`host_init`): one XLA compile per
parameter shape made eager initialisation with jax.random take minutes on a busy CPU. Under
tracing (the jitted, sharded creation of a train state; eval_shape) jax.random's initialiser draws
them instead: a host callback would create every parameter whole on one device. The two draw
different numbers from the same distribution; a model built eagerly from a seed has the same
parameters whichever kernels it runs.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

TRUNC_STD = 0.87962566103423978  # std of a unit normal truncated to [-2, 2]


def host_init(sample, traced):
    """Wrap `sample(rng: np.random.Generator, shape) -> np.ndarray` as a JAX initializer that
    falls back to the jax.random initializer `traced` under tracing (module doc)."""

    def init(key, shape, dtype=jnp.float32):
        shape = tuple(int(d) for d in shape)
        data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
        if isinstance(data, jax.core.Tracer):
            return traced(key, shape, dtype)
        rng = np.random.default_rng(np.asarray(data, np.uint32).ravel().tolist())
        # device_put, not jnp.asarray: jax compiles an identity program per shape for the latter.
        return jax.device_put(sample(rng, shape).astype(np.float32).astype(jnp.dtype(dtype)))

    return init


def _truncated(rng: np.random.Generator, shape) -> np.ndarray:
    """Unit normal samples truncated to [-2, 2] (rejection)."""
    x = rng.standard_normal(shape)
    bad = np.abs(x) > 2
    while bad.any():
        x[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(x) > 2
    return x


def _lecun(rng: np.random.Generator, shape) -> np.ndarray:
    fan_in = math.prod(shape[:-1])  # HWIO / (in, out): all but the output dim
    return _truncated(rng, shape) * (math.sqrt(1.0 / fan_in) / TRUNC_STD)


lecun_normal = host_init(_lecun, jax.nn.initializers.lecun_normal())
"""LeCun normal (truncated to 2 std, variance 1/fan_in), flax's default kernel init."""


def normal(std: float):
    """Normal(0, std) initializer."""
    return host_init(lambda rng, shape: rng.standard_normal(shape) * std,
                     jax.nn.initializers.normal(std))
