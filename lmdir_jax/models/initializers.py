"""The LMDIR parameters' initialisers: jax.random's numbers, the same for a seed however the network
is built (eagerly or inside jit, sharded or not, with any `model.kernels`; tested bit for bit on
CPUs). Another backend draws the same random bits (threefry is integer arithmetic) and turns them
into normals with its own float arithmetic, to within rounding.

With threefry's partitionable bits (jax's default) the numbers of a draw depend only on the key
and each number's flat index: a draw of shape S holds, in order, the first prod(S) numbers of any
longer flat draw from the same key. Eagerly, one small jitted program per power-of-four size
(`_bucket`) therefore serves every parameter of that size class: about ten compiles for a whole
network, where one per parameter shape took minutes on a busy CPU. Inside jit (the sharded
creation of a train state, eval_shape) the draw of the parameter's own shape is traced into the one
creation program and gives the same numbers.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

TRUNC_STD = 0.87962566103423978  # std of a unit normal truncated to [-2, 2]

Initializer = Callable[..., jax.Array]


def _truncated(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)


def _normal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.normal(key, shape, jnp.float32)


def _bucket(n: int) -> int:
    """The eager draw's length for n numbers: the next power of four, or n itself where jax's
    random bits are not partitionable (then a longer draw's first n differ from a draw of n)."""
    if not jax.config.jax_threefry_partitionable:
        return n
    return 4 ** max(2, math.ceil(math.log(max(n, 1), 4)))


@functools.partial(jax.jit, static_argnums=(0, 2))
def _eager_draw(sample: Callable[[jax.Array, tuple[int, ...]], jax.Array], key: jax.Array,
                n: int) -> jax.Array:
    return sample(key, (n,))


def _scaled(sample: Callable[[jax.Array, tuple[int, ...]], jax.Array],
            scale: Callable[[tuple[int, ...]], float]) -> Initializer:
    """The initializer drawing `sample(key, shape)` times `scale(shape)` (a float32 product, the
    same on host and device); eagerly cut from a flat draw of `_bucket(n)` numbers."""

    def init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
        shape = tuple(int(d) for d in shape)
        n, factor = math.prod(shape), np.float32(scale(shape))
        if isinstance(key, jax.core.Tracer):
            # The barrier keeps XLA from folding the factor into the draw's own constants, which
            # would round differently from the eager product.
            return (jax.lax.optimization_barrier(sample(key, shape)) * factor).astype(dtype)
        flat = np.asarray(_eager_draw(sample, key, _bucket(n)))[:n]
        # device_put, not jnp.asarray: jax compiles an identity program per shape for the latter.
        return jax.device_put((flat.reshape(shape) * factor).astype(jnp.dtype(dtype)))

    return init


def _lecun_std(shape: tuple[int, ...]) -> float:
    fan_in = math.prod(shape[:-1])  # HWIO / (in, out): all but the output dim
    return math.sqrt(1.0 / fan_in) / TRUNC_STD


lecun_normal = _scaled(_truncated, _lecun_std)
"""LeCun normal (truncated to 2 std, variance 1/fan_in), flax's default kernel init."""


@functools.cache
def normal(std: float) -> Initializer:
    """Normal(0, std) initializer."""
    return _scaled(_normal, lambda shape: std)
