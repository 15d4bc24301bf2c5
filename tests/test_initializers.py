"""The parameters' initialisers: one set of numbers for a key, eager or traced, with the
distribution they are named for."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmdir_jax.models import initializers

SHAPES = [(7,), (3, 3, 5, 11), (48, 96), (1, 1, 64, 192), (300, 17)]


@pytest.mark.parametrize("name", ["lecun", "normal"])
def test_eager_draw_equals_the_traced_draw(name):
    """Eagerly a parameter is cut from a longer, cached draw; inside jit it is drawn at its own
    size: the same numbers, bit for bit, for every shape and dtype."""
    init = initializers.lecun_normal if name == "lecun" else initializers.normal(0.02)
    key = jax.random.key(11)
    for i, shape in enumerate(SHAPES):
        k = jax.random.fold_in(key, i)
        for dtype in (jnp.float32, jnp.bfloat16):
            eager = init(k, shape, dtype)
            traced = jax.jit(lambda k, s=shape, d=dtype: init(k, s, d))(k)
            assert eager.shape == shape and eager.dtype == dtype
            np.testing.assert_array_equal(np.asarray(eager), np.asarray(traced),
                                          err_msg=f"{name} {shape} {dtype}")
    a, b = (init(jax.random.key(s), (64, 64)) for s in (1, 2))
    assert not np.array_equal(np.asarray(a), np.asarray(b))  # the key matters


def test_distributions():
    """LeCun normal: truncated at 2 std, variance 1/fan_in; normal(std): the std it is given."""
    x = np.asarray(initializers.lecun_normal(jax.random.key(0), (3, 3, 32, 256)))
    std = math.sqrt(1.0 / (3 * 3 * 32))
    assert abs(x.std() / std - 1) < 0.02 and abs(x.mean()) < 0.02 * std
    assert np.abs(x).max() <= 2 * std / initializers.TRUNC_STD * (1 + 1e-6)
    y = np.asarray(initializers.normal(0.5)(jax.random.key(1), (256, 256)))
    assert abs(y.std() / 0.5 - 1) < 0.02 and np.abs(y).max() > 3 * 0.5  # not truncated
