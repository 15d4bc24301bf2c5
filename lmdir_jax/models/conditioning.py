"""How the priors enter the backbone blocks: DATB modulation, CATB and RTB cross-attention.

- DATB (`Modulation`): the pooled degradation prompt (mean of the degradation prompts) is projected
  to (shift1, scale1, gate1, shift2, scale2, gate2), each of the block's width, in that order along
  the output axis; the block applies `norm(x) * (1 + scale) + shift` before each branch and adds
  the branch as `x + (1 + gate) * branch`.
- CATB (`SpatialCrossAttention`): pixels of the level (queries, after a LayerNorm) attend to the
  content prompts; the result is added to x.
- RTB (`SpatialCrossAttention`): the same to the reference tokens, and the update is applied only
  where `has_reference` is True (`jnp.where`, so a missing reference changes nothing, exactly).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from lmdir_jax.models.attention import MultiHeadAttention
from lmdir_jax.models.initializers import normal
from lmdir_jax.models.layers import layer_norm, linear


@flax.struct.dataclass
class Conditions:
    """What every block may read: outputs of the prompt and reference encoders.

    deg_pooled: (B, P) mean of the degradation prompts.
    content:    (B, Nc, P) content prompts.
    ref_tokens: (B, R, Dr) reference tokens.
    has_reference: (B,) bool.
    """

    deg_pooled: jax.Array
    content: jax.Array
    ref_tokens: jax.Array
    has_reference: jax.Array


class Modulation(nnx.Module):
    """DATB: pooled degradation prompt -> per-channel shift/scale/gate for both block branches.

    Parameter: proj (prompt_dim, 6*dim), kernel init normal(0.02), bias zero.
    """

    def __init__(self, prompt_dim: int, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.proj = linear(
            prompt_dim, 6 * dim, rngs=rngs, dtype=dtype,
            kernel_init=normal(0.02),
        )

    def __call__(self, pooled: jax.Array) -> tuple[jax.Array, ...]:
        """(B, P) -> six (B, 1, 1, dim) arrays: shift1, scale1, gate1, shift2, scale2, gate2."""
        m = self.proj(pooled)[:, None, None, :]
        return tuple(jnp.split(m, 6, axis=-1))


class SpatialCrossAttention(nnx.Module):
    """CATB / RTB: x (B, H, W, dim) attends to tokens (B, N, token_dim); returns the update.

    Parameters: norm (LayerNorm over dim), attn (MultiHeadAttention(dim, token_dim, heads)).
    """

    def __init__(self, dim: int, token_dim: int, heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.norm = layer_norm(dim, rngs=rngs, dtype=dtype)
        self.attn = MultiHeadAttention(dim, token_dim, heads, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, tokens: jax.Array) -> jax.Array:
        """The cross-attention update (same shape as x), not yet added."""
        b, h, w, c = x.shape
        q = self.norm(x).reshape(b, h * w, c)
        return self.attn(q, tokens.astype(q.dtype)).reshape(b, h, w, c)
