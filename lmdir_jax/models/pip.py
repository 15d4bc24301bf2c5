"""PIP's prompt-in-prompt module (Li et al. 2023, "Prompt-In-Prompt Learning for Universal Image
Restoration"), on the decoder skips of the backbone (`model.prompt_module = "pip"`).

For the skip feature x (B, H, W, C) of level l (prompt width P, basic prompt size S, T kinds):

    w = degradation weights (B, T)        one-hot, averaged over the kinds of a mixture, 0 unknown
    d = mean_t(w[:, t] * degradation_prompts[t])                    (B, P)  degradation-aware
    f = align(resize(x, S x S), P)        bilinear; channels cut to P or zero-padded up to P
    p = prompt_to_prompt(basic_prompt, d * f)                       (B, S, S, P)
    prompt = out(resize(p, H x W))                                  3x3 conv P -> P, no bias
    x' = prompt_to_feature(x, prompt)

prompt_to_prompt is a Restormer cross-attention block (channel attention, queries from the basic
restoration prompt, keys and values from the degradation-modulated feature, then a GDFN);
prompt_to_feature is PIP's selective block: its channel attention keeps, per query channel, only
the top-k keys at k = C/2, 2C/3, 3C/4, 4C/5 of the C channels per head and mixes the four results
with learnable weights (init 0.2), followed by a dual-gated feed-forward. Convolutions have no
bias and LayerNorms a bias, as in PIP's released network.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lmdir_jax.architecture import L2_EPS, ffn_hidden, pip_topk
from lmdir_jax.axes import HEADS
from lmdir_jax.models.blocks import GatedFeedForward
from lmdir_jax.models.initializers import normal
from lmdir_jax.models.layers import conv, gelu, layer_norm


def resize_bilinear(x: jax.Array, height: int, width: int) -> jax.Array:
    """(B, H, W, C) -> (B, height, width, C), as torch's bilinear interpolate (half-pixel
    centres, no anti-aliasing)."""
    b, _, _, c = x.shape
    return jax.image.resize(x, (b, height, width, c), method="linear", antialias=False)


def align_channels(x: jax.Array, channels: int) -> jax.Array:
    """The first `channels` channels of x, zero-padded when x has fewer."""
    c = x.shape[-1]
    if c >= channels:
        return x[..., :channels]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, channels - c)))


def l2_normalize(x: jax.Array) -> jax.Array:
    """x / ||x|| over the last axis, and 0 with a zero gradient where ||x|| <= 1e-12.

    Equal to torch.nn.functional.normalize (eps 1e-12) but for vectors shorter than eps, which
    occur as exact zeros: the degradation-aware prompt of an unknown degradation (zero weights)
    makes the prompt-to-prompt keys zero, and x / eps would pass a 1e12 gradient back."""
    sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    live = sq > L2_EPS * L2_EPS
    return jnp.where(live, x * jax.lax.rsqrt(jnp.where(live, sq, 1.0)), 0.0)


def topk_mask(logits: jax.Array, k: int) -> jax.Array:
    """True where a logit is among the k largest of its row (last axis); ties at the k-th value are
    all kept."""
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return logits >= kth


def orthogonality(prompts: jax.Array) -> jax.Array:
    """PIP's cosine regulariser on (T, ...) prompts: sum |cos(p_i, p_j) - [i == j]| over all pairs.

    Zero exactly when the prompts are mutually orthogonal (and non-zero)."""
    p = l2_normalize(prompts.reshape(prompts.shape[0], -1).astype(jnp.float32))
    cos = p @ p.T
    return jnp.sum(jnp.abs(cos - jnp.eye(p.shape[0], dtype=cos.dtype)))


class ChannelCrossAttention(nnx.Module):
    """Restormer channel attention with queries from x_q and keys, values from x_kv.

    Parameters: temperature (heads,) init 1; q 1x1 conv, q_dw 3x3 depth-wise; kv 1x1 conv
    dim -> 2dim, kv_dw 3x3 depth-wise; out 1x1 conv. No biases. With `topk` (PIP's selective
    attention) each query channel keeps only its k largest logits, for each k in `pip_topk(C/heads)`,
    and the four attention results are summed with weights `mix` (4,), init 0.2.
    """

    def __init__(self, dim: int, heads: int, *, topk: bool, rngs: nnx.Rngs, dtype=jnp.float32):
        if dim % heads:
            raise ValueError(f"PIP attention width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.topk = pip_topk(dim // heads) if topk else ()
        self.temperature = nnx.Param(jnp.ones((heads,), jnp.float32), out_sharding=(HEADS,))
        self.q = conv(dim, dim, 1, use_bias=False, rngs=rngs, dtype=dtype)
        self.q_dw = conv(dim, dim, 3, groups=dim, use_bias=False, rngs=rngs, dtype=dtype)
        self.kv = conv(dim, 2 * dim, 1, use_bias=False, rngs=rngs, dtype=dtype)
        self.kv_dw = conv(2 * dim, 2 * dim, 3, groups=2 * dim, use_bias=False, rngs=rngs,
                          dtype=dtype)
        self.out = conv(dim, dim, 1, use_bias=False, rngs=rngs, dtype=dtype)
        self.mix = (nnx.Param(jnp.full((len(self.topk),), 0.2, jnp.float32)) if topk else None)

    def attention(self, logits: jax.Array, v: jax.Array) -> jax.Array:
        """softmax(logits) @ v for logits (B, heads, C, C) and v (B, heads, C, N); with top-k the
        mix-weighted sum over PIP's four masked softmaxes. float32."""
        if not self.topk:
            return jax.nn.softmax(logits, axis=-1) @ v
        out = 0.0
        for i, k in enumerate(self.topk):
            masked = jnp.where(topk_mask(logits, k), logits, -jnp.inf)
            out = out + (jax.nn.softmax(masked, axis=-1) @ v) * self.mix[...][i]
        return out

    def __call__(self, x_q: jax.Array, x_kv: jax.Array) -> jax.Array:
        """(B, H, W, C), (B, H, W, C) -> (B, H, W, C)."""
        b, h, w, c = x_q.shape
        q = self.q_dw(self.q(x_q))
        k, v = jnp.split(self.kv_dw(self.kv(x_kv)), 2, axis=-1)

        def heads(t):  # (B, H, W, C) -> (B, heads, C/heads, HW), float32
            t = t.reshape(b, h * w, self.heads, c // self.heads).astype(jnp.float32)
            return t.transpose(0, 2, 3, 1)

        q, k, v = heads(q), heads(k), heads(v)
        q, k = l2_normalize(q), l2_normalize(k)
        logits = (q @ k.swapaxes(-1, -2)) * self.temperature[...][None, :, None, None]
        out = self.attention(logits, v)  # (B, heads, C/heads, HW)
        out = out.transpose(0, 3, 1, 2).reshape(b, h, w, c).astype(x_q.dtype)
        return self.out(out)


class PromptToPrompt(nnx.Module):
    """PIP's prompt-to-prompt interaction: the basic prompt attends to the degradation-aware one.

        x = q + attn(norm_q(q), norm_kv(kv));  x = x + ffn(norm2(x))

    Sub-modules: norm_q, norm_kv, norm2 (LayerNorm P), attn (ChannelCrossAttention),
    ffn (GatedFeedForward P).
    """

    def __init__(self, dim: int, heads: int, expansion: float, *, rngs: nnx.Rngs,
                 dtype=jnp.float32):
        self.norm_q = layer_norm(dim, rngs=rngs, dtype=dtype)
        self.norm_kv = layer_norm(dim, rngs=rngs, dtype=dtype)
        self.attn = ChannelCrossAttention(dim, heads, topk=False, rngs=rngs, dtype=dtype)
        self.norm2 = layer_norm(dim, rngs=rngs, dtype=dtype)
        self.ffn = GatedFeedForward(dim, expansion, rngs=rngs, dtype=dtype)

    def __call__(self, q: jax.Array, kv: jax.Array) -> jax.Array:
        """(B, S, S, P), (B, S, S, P) -> (B, S, S, P)."""
        x = q + self.attn(self.norm_q(q), self.norm_kv(kv))
        return x + self.ffn(self.norm2(x))


class DualGatedFeedForward(nnx.Module):
    """1x1 conv C -> 2h, 3x3 depth-wise, gelu(b) * a + gelu(a) * b, 1x1 conv h -> C; no biases
    (LLFormer's feed-forward, which PIP's prompt-to-feature block uses)."""

    def __init__(self, dim: int, expansion: float, *, rngs: nnx.Rngs, dtype=jnp.float32):
        hidden = ffn_hidden(dim, expansion)
        self.inp = conv(dim, 2 * hidden, 1, use_bias=False, rngs=rngs, dtype=dtype)
        self.dw = conv(2 * hidden, 2 * hidden, 3, groups=2 * hidden, use_bias=False, rngs=rngs,
                       dtype=dtype)
        self.out = conv(hidden, dim, 1, use_bias=False, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, H, W, C) -> (B, H, W, C)."""
        a, g = jnp.split(self.dw(self.inp(x)), 2, axis=-1)
        return self.out(gelu(g) * a + gelu(a) * g)


class PromptToFeature(nnx.Module):
    """PIP's selective prompt-to-feature interaction on a skip feature x (width C) and its prompt
    (width P); the attention runs at width P:

        xq, pk = norm_x(x), norm_p(prompt)
        C > P: xq splits into (xa, xs) of P and C - P channels; y = cat(xa + attn(xa, pk), xs)
        C < P: xa = xq zero-padded to P;  y = reduce(xa + attn(xa, pk))      (1x1 conv P -> C)
        C = P: y = xq + attn(xq, pk)
        out = y + ffn(norm2(y))

    The residual starts from the normalised feature, as in PIP's block.
    """

    def __init__(self, feat_dim: int, prompt_dim: int, heads: int, expansion: float, *,
                 rngs: nnx.Rngs, dtype=jnp.float32):
        self.feat_dim, self.prompt_dim = feat_dim, prompt_dim
        self.norm_x = layer_norm(feat_dim, rngs=rngs, dtype=dtype)
        self.norm_p = layer_norm(prompt_dim, rngs=rngs, dtype=dtype)
        self.attn = ChannelCrossAttention(prompt_dim, heads, topk=True, rngs=rngs, dtype=dtype)
        self.reduce = (conv(prompt_dim, feat_dim, 1, use_bias=False, rngs=rngs, dtype=dtype)
                       if feat_dim < prompt_dim else None)
        self.norm2 = layer_norm(feat_dim, rngs=rngs, dtype=dtype)
        self.ffn = DualGatedFeedForward(feat_dim, expansion, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, prompt: jax.Array) -> jax.Array:
        """(B, H, W, C), (B, H, W, P) -> (B, H, W, C)."""
        xq, pk = self.norm_x(x), self.norm_p(prompt.astype(x.dtype))
        xa = align_channels(xq, self.prompt_dim)
        y = xa + self.attn(xa, pk)
        if self.feat_dim > self.prompt_dim:
            y = jnp.concatenate([y, xq[..., self.prompt_dim:]], axis=-1)
        elif self.reduce is not None:
            y = self.reduce(y)
        return y + self.ffn(self.norm2(y))


class PromptInPrompt(nnx.Module):
    """The prompt of one skip level (module docstring) and its prompt-to-feature interaction.

    Parameters: degradation_prompts (T, P) and basic_prompt (S, S, P), init normal(1) as PIP's
    torch.randn; interaction (PromptToPrompt); out (3x3 conv P -> P, no bias);
    to_feature (PromptToFeature).
    """

    def __init__(self, feat_dim: int, prompt_dim: int, size: int, kinds: int, *, heads: int,
                 prompt_heads: int, expansion: float, rngs: nnx.Rngs, dtype=jnp.float32):
        self.size, self.dtype = size, dtype
        init = normal(1.0)
        self.degradation_prompts = nnx.Param(init(rngs.params(), (kinds, prompt_dim), jnp.float32))
        self.basic_prompt = nnx.Param(init(rngs.params(), (size, size, prompt_dim), jnp.float32))
        self.interaction = PromptToPrompt(prompt_dim, prompt_heads, expansion, rngs=rngs,
                                          dtype=dtype)
        self.out = conv(prompt_dim, prompt_dim, 3, use_bias=False, rngs=rngs, dtype=dtype)
        self.to_feature = PromptToFeature(feat_dim, prompt_dim, heads, expansion, rngs=rngs,
                                          dtype=dtype)

    def prompt(self, x: jax.Array, weights: jax.Array) -> jax.Array:
        """The level's prompt (B, H, W, P) for skip feature x (B, H, W, C) and weights (B, T)."""
        b, h, w, _ = x.shape
        p = self.degradation_prompts.shape[-1]
        deg = jnp.mean(weights.astype(jnp.float32)[:, :, None] * self.degradation_prompts[...][None],
                       axis=1)  # (B, P)
        feature = align_channels(resize_bilinear(x.astype(jnp.float32), self.size, self.size), p)
        semantic = (deg[:, None, None, :] * feature).astype(self.dtype)
        basic = jnp.broadcast_to(self.basic_prompt[...], (b, *self.basic_prompt.shape))
        low = self.interaction(basic.astype(self.dtype), semantic)
        return self.out(resize_bilinear(low, h, w))

    def __call__(self, x: jax.Array, weights: jax.Array) -> jax.Array:
        """The skip feature x (B, H, W, C) after the prompt-to-feature interaction."""
        return self.to_feature(x, self.prompt(x, weights))

    def regulariser(self) -> jax.Array:
        """`orthogonality` of this level's degradation prompts."""
        return orthogonality(self.degradation_prompts[...])
