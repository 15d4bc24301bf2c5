"""The backbone blocks' LayerNorm: with bias (the default) or Restormer's bias-free variant.

`model.layernorm = "with_bias"`: nnx.LayerNorm (models.layers.layer_norm), parameters scale, bias.
`model.layernorm = "bias_free"`: x / sqrt(var(x) + 1e-5) * scale, x *not* centred (Restormer's
BiasFree_LayerNorm, used by its denoising models); parameter scale only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lmdir_jax.models.layers import LN_EPS, layer_norm

KINDS = ("with_bias", "bias_free")


class BiasFreeLayerNorm(nnx.Module):
    """Restormer's bias-free LayerNorm over the channel (last) axis, statistics in float32."""

    def __init__(self, features: int, *, dtype=jnp.float32):
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((features,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        """(..., C) -> (..., C)."""
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        return (x32 * jax.lax.rsqrt(var + LN_EPS) * self.scale[...]).astype(self.dtype)


def block_norm(features: int, kind: str, *, rngs: nnx.Rngs, dtype=jnp.float32) -> nnx.Module:
    """The LayerNorm of a backbone block for `model.layernorm` = kind."""
    if kind == "with_bias":
        return layer_norm(features, rngs=rngs, dtype=dtype)
    if kind == "bias_free":
        return BiasFreeLayerNorm(features, dtype=dtype)
    raise ValueError(f"model.layernorm must be one of {', '.join(KINDS)}, got {kind!r}")
