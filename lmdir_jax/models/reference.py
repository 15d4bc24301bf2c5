"""Reference encoder: a small trainable conv net turning the Stable Diffusion reference image into
`ref_tokens` tokens for the RTB.

    r = where(has_reference, reference, 0)                 (B, Hr, Wr, 3) in [0, 1]
    r = gelu(conv1(r))        3x3, 3 -> D, pad 1
    r = gelu(conv2(r))        3x3, D -> D, stride 2, pad 1 (torch padding=1)
    r = conv3(r)              3x3, D -> D, pad 1
    t = adaptive_avg_pool(r, s) -> (B, s, s, D), s = sqrt(ref_tokens), tokens in row-major order
    t = norm(t.reshape(B, s*s, D) + pos)      pos (s*s, D) init normal(0.02)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lmdir_jax.models.initializers import normal
from lmdir_jax.models.layers import adaptive_avg_pool, conv, gelu, layer_norm


def grid_side(ref_tokens: int) -> int:
    """The pooling grid side s with s*s == ref_tokens (a perfect square is required)."""
    s = math.isqrt(ref_tokens)
    if s * s != ref_tokens or s < 1:
        raise ValueError(f"model.ref_tokens must be a perfect square, got {ref_tokens}")
    return s


class ReferenceEncoder(nnx.Module):
    """Reference image (B, Hr, Wr, 3) + has_reference (B,) -> tokens (B, ref_tokens, D)."""

    def __init__(self, dim: int, ref_tokens: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.side = grid_side(ref_tokens)
        self.dtype = dtype
        self.conv1 = conv(3, dim, 3, rngs=rngs, dtype=dtype)
        self.conv2 = conv(dim, dim, 3, stride=2, rngs=rngs, dtype=dtype)
        self.conv3 = conv(dim, dim, 3, rngs=rngs, dtype=dtype)
        self.pos = nnx.Param(normal(0.02)(rngs.params(), (ref_tokens, dim)))
        self.norm = layer_norm(dim, rngs=rngs, dtype=dtype)

    def __call__(self, reference: jax.Array, has_reference: jax.Array) -> jax.Array:
        """Tokens of the reference; a missing reference is zeroed first (and the RTB ignores it)."""
        r = jnp.where(has_reference[:, None, None, None], reference, 0.0).astype(self.dtype)
        r = gelu(self.conv1(r))
        r = gelu(self.conv2(r))
        r = self.conv3(r)
        t = adaptive_avg_pool(r, self.side)
        b, s, _, d = t.shape
        t = t.reshape(b, s * s, d) + self.pos[...]
        return self.norm(t.astype(self.dtype))
