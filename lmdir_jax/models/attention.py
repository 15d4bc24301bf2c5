"""Token multi-head attention (scaled dot product, optional key mask) used by the prompt encoder,
the CATB and the RTB.

Masking contract: a masked key contributes nothing, whatever its value (its logit is replaced by
-1e9 and its value by 0); when all keys of an example are masked the attention output is an exact
zero (after the output projection too), so a missing prior contributes nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lmdir_jax.architecture import MASKED_LOGIT
from lmdir_jax.models.layers import linear


def attend(
    q: jax.Array, k: jax.Array, v: jax.Array, heads: int, mask: jax.Array | None = None
) -> jax.Array:
    """Multi-head attention of q (B, Nq, C) over k, v (B, Nk, C); mask (B, Nk) bool (True = real).

    Heads split the channel axis head-major (channel h*C/heads + d is head h, dim d); logits are
    scaled by 1/sqrt(C/heads) and the softmax runs in float32.
    """
    b, nq, c = q.shape
    nk = k.shape[1]
    dh = c // heads
    qh = q.reshape(b, nq, heads, dh)
    kh = k.reshape(b, nk, heads, dh)
    vh = v.reshape(b, nk, heads, dh)
    if mask is not None:
        vh = jnp.where(mask[:, :, None, None], vh, jnp.zeros((), vh.dtype))
    logits = jnp.einsum("bqhd,bkhd->bhqk", qh, kh).astype(jnp.float32) / jnp.sqrt(float(dh))
    if mask is not None:
        logits = jnp.where(mask[:, None, None, :], logits, MASKED_LOGIT)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, vh).reshape(b, nq, c)
    if mask is not None:
        any_real = jnp.any(mask, axis=1)[:, None, None]
        out = jnp.where(any_real, out, jnp.zeros((), out.dtype))
    return out


class MultiHeadAttention(nnx.Module):
    """q/k/v/out projections around `attend`.

    Parameters: q (dim, dim), k (kv_dim, dim), v (kv_dim, dim), out (dim, dim), all with bias.
    """

    def __init__(self, dim: int, kv_dim: int, heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q = linear(dim, dim, rngs=rngs, dtype=dtype)
        self.k = linear(kv_dim, dim, rngs=rngs, dtype=dtype)
        self.v = linear(kv_dim, dim, rngs=rngs, dtype=dtype)
        self.out = linear(dim, dim, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, context: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """Queries from x (B, N, dim) attend to context (B, M, kv_dim) (mask (B, M)).

        With every key masked the result is exactly 0 (the `out` bias is not added either).
        """
        o = self.out(attend(self.q(x), self.k(context), self.v(context), self.heads, mask))
        if mask is not None:
            o = jnp.where(jnp.any(mask, axis=1)[:, None, None], o, jnp.zeros((), o.dtype))
        return o
