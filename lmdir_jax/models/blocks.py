"""Restormer-style backbone pieces: channel attention (MDTA), gated depth-wise feed-forward (GDFN),
and the transformer block that hosts the DATB / CATB / RTB conditioning.

Block (width C, heads h), in order:
  s1, a1, g1, s2, a2, g2 = modulation(deg_pooled)                   (DATB; 0 when unmodulated)
  x = x + (1 + g1) * attn(norm1(x) * (1 + a1) + s1)
  x = x + content_attn(x, content_prompts)                          (CATB levels only)
  x = where(has_reference, x + ref_attn(x, ref_tokens), x)          (RTB levels only)
  x = x + (1 + g2) * ffn(norm2(x) * (1 + a2) + s2)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lmdir_jax.architecture import L2_EPS, ffn_hidden
from lmdir_jax.axes import HEADS, LAYERS
from lmdir_jax.models.conditioning import Conditions, Modulation, SpatialCrossAttention
from lmdir_jax.models.layers import conv, conv_parts, gelu
from lmdir_jax.models.norms import block_norm
from lmdir_jax.models.stacking import draw_stacked


def _pixel_norms(t: jax.Array) -> jax.Array:
    """max(||t||, 1e-12) over the pixel axis of (B, N, heads, d), in float32: (B, heads, d)."""
    n = jnp.sqrt(jnp.sum(jnp.square(t.astype(jnp.float32)), axis=1))
    return jnp.maximum(n, L2_EPS)


class ChannelAttention(nnx.Module):
    """MDTA: multi-head "transposed" attention across channels (attention map C/h x C/h per head).

    Parameters: temperature (heads,) init 1; qkv 1x1 conv C->3C (no bias); qkv_dw 3x3 depth-wise
    conv 3C->3C (groups 3C, no bias); out 1x1 conv C->C (no bias). q, k, v are the first, second and
    third C channels; head h owns channels [h*C/heads, (h+1)*C/heads). q and k are L2-normalised
    over the pixels (as torch.nn.functional.normalize, eps 1e-12), logits = (q @ k^T) *
    temperature[h], softmax over the last axis (float32).

    Computed without moving a full-size tensor: q, k and v come from their own slices of the qkv
    and qkv_dw kernels (`conv_parts`, so no 3C-wide tensor is split or concatenated), logits are the
    pixel Gram matrix of the raw q, k divided by the outer product of their norms, and every product
    contracts the pixel axis of the NHWC layout in place (no transposed copy of q, k, v).
    """

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.temperature = nnx.Param(jnp.ones((heads,), jnp.float32), out_sharding=(HEADS,))
        self.qkv = conv(dim, 3 * dim, 1, use_bias=False, rngs=rngs, dtype=dtype)
        self.qkv_dw = conv(3 * dim, 3 * dim, 3, groups=3 * dim, use_bias=False, rngs=rngs, dtype=dtype)
        self.out = conv(dim, dim, 1, use_bias=False, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C) -> (B, H, W, C)."""
        b, h, w, c = x.shape
        parts = conv_parts(self.qkv_dw, conv_parts(self.qkv, [x, x, x]))
        q, k, v = (t.reshape(b, h * w, self.heads, c // self.heads) for t in parts)
        gram = jnp.einsum("bnhc,bnhd->bhcd", q, k, preferred_element_type=jnp.float32)
        norms = _pixel_norms(q)[..., :, None] * _pixel_norms(k)[..., None, :]
        logits = gram / norms * self.temperature[...][None, :, None, None]
        attn = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhcd,bnhd->bnhc", attn, v)  # (B, HW, heads, C/heads): NHWC order
        return self.out(out.reshape(b, h, w, c))


class GatedFeedForward(nnx.Module):
    """GDFN: hidden = int(C * expansion); 1x1 conv C->2*hidden, 3x3 depth-wise conv, then
    gelu(first half) * second half, 1x1 conv hidden->C. No biases. The two halves are computed
    from their own kernel slices (`conv_parts`), not by splitting a 2*hidden-wide tensor.
    """

    def __init__(self, dim: int, expansion: float, *, rngs: nnx.Rngs, dtype=jnp.float32):
        hidden = ffn_hidden(dim, expansion)
        self.inp = conv(dim, 2 * hidden, 1, use_bias=False, rngs=rngs, dtype=dtype)
        self.dw = conv(2 * hidden, 2 * hidden, 3, groups=2 * hidden, use_bias=False, rngs=rngs,
                       dtype=dtype)
        self.out = conv(hidden, dim, 1, use_bias=False, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C) -> (B, H, W, C)."""
        a, g = conv_parts(self.dw, conv_parts(self.inp, [x, x]))
        return self.out(gelu(a) * g)


class TransformerBlock(nnx.Module):
    """One backbone block: a DATB, optionally with CATB and/or RTB cross-attention (module doc).

    Sub-modules: norm1, attn (ChannelAttention), norm2, ffn (GatedFeedForward), modulation (DATB,
    or None when `modulated` is False: no LMDIR prompt encoder), content_attn (CATB, or None),
    ref_attn (RTB, or None).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        expansion: float,
        prompt_dim: int,
        ref_dim: int,
        *,
        catb: bool,
        rtb: bool,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        layernorm: str = "with_bias",
        modulated: bool = True,
    ):
        self.norm1 = block_norm(dim, layernorm, rngs=rngs, dtype=dtype)
        self.attn = ChannelAttention(dim, heads, rngs=rngs, dtype=dtype)
        self.norm2 = block_norm(dim, layernorm, rngs=rngs, dtype=dtype)
        self.ffn = GatedFeedForward(dim, expansion, rngs=rngs, dtype=dtype)
        self.modulation = (Modulation(prompt_dim, dim, rngs=rngs, dtype=dtype) if modulated
                           else None)
        self.content_attn = (
            SpatialCrossAttention(dim, prompt_dim, heads, rngs=rngs, dtype=dtype) if catb else None
        )
        self.ref_attn = (
            SpatialCrossAttention(dim, ref_dim, heads, rngs=rngs, dtype=dtype) if rtb else None
        )

    def __call__(self, x: jax.Array, cond: Conditions) -> jax.Array:
        """(B, H, W, C) -> (B, H, W, C), conditioned on the prompts and the reference."""
        if self.modulation is None:
            s1 = a1 = g1 = s2 = a2 = g2 = jnp.zeros((), x.dtype)
        else:
            s1, a1, g1, s2, a2, g2 = self.modulation(cond.deg_pooled.astype(x.dtype))
        x = x + (1 + g1) * self.attn(self.norm1(x) * (1 + a1) + s1)
        if self.content_attn is not None:
            x = x + self.content_attn(x, cond.content)
        if self.ref_attn is not None:
            updated = x + self.ref_attn(x, cond.ref_tokens)
            x = jnp.where(cond.has_reference[:, None, None, None], updated, x)
        x = x + (1 + g2) * self.ffn(self.norm2(x) * (1 + a2) + s2)
        return x


REMAT_POLICIES = {"none": None, "block": "nothing_saveable"}
"""`model.remat` -> the `jax.checkpoint_policies` policy each block is rematerialised with ('block':
nothing inside a block is kept for the backward pass but its input; it is recomputed)."""


def remat_policy(name: str):
    """The jax.checkpoint policy of a `model.remat` value (None for 'none')."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"model.remat must be one of {', '.join(REMAT_POLICIES)}, got {name!r}")
    policy = REMAT_POLICIES[name]
    return None if policy is None else getattr(jax.checkpoint_policies, policy)


class BlockStack(nnx.Module):
    """The n TransformerBlocks of one U-Net level, run in order.

    Unscanned (`scan=False`): `blocks` is an nnx.List of n blocks, parameters blocks/0/...,
    blocks/1/... Scanned: `blocks` is one TransformerBlock whose parameters carry a leading axis
    of n (logical axis 'layers'; drawn block by block like the unscanned blocks and stacked, so a
    seed gives the same network in both layouts), run by nnx.scan: one block is traced and
    compiled whatever n is. `models.stacking` converts between the two parameter layouts.
    `unroll=True` compiles the scan unrolled (`backend.SCAN_UNROLLS`), the same parameters.
    `remat='block'` wraps each block in nnx.remat (jax.checkpoint, `REMAT_POLICIES`).
    """

    def __init__(self, n: int, *, rngs: nnx.Rngs, scan: bool = False, remat: str = "none",
                 unroll: bool = False, **block_kwargs):
        remat_policy(remat)  # validate
        self.remat = remat
        self.unroll = bool(unroll)
        self.scanned = bool(scan) and n > 0
        if self.scanned:  # one block after another, as unscanned: the same seed, the same network
            self.blocks = draw_stacked(lambda: TransformerBlock(**block_kwargs, rngs=rngs), n, LAYERS)
            self.length = n
        else:
            self.blocks = nnx.List([TransformerBlock(**block_kwargs, rngs=rngs) for _ in range(n)])

    def block(self, i: int) -> TransformerBlock:
        """Block i as a TransformerBlock of its own (scanned: a slice of the stacked parameters)."""
        if not self.scanned:
            return self.blocks[i]
        graphdef, state = nnx.split(self.blocks)
        return nnx.merge(graphdef, jax.tree.map(lambda x: x[i], state))

    def __call__(self, x: jax.Array, cond: Conditions) -> jax.Array:
        """Run the blocks in order."""

        def apply(block: TransformerBlock, x: jax.Array) -> jax.Array:
            return block(x, cond)

        looped = self.scanned and self.length > 1
        if self.remat != "none":
            apply = nnx.remat(apply, policy=remat_policy(self.remat), prevent_cse=not looped)
        if not looped:  # a single scanned block is called on its slice: no scan to trace
            for i in range(self.length if self.scanned else len(self.blocks)):
                x = apply(self.block(i), x)
            return x

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, unroll=True if self.unroll else 1)
        def body(x: jax.Array, block: TransformerBlock) -> jax.Array:
            return apply(block, x)

        return body(x, self.blocks)
