"""The LMDIR network in PyTorch: an exact mirror of `lmdir_jax.models.LMDIR` for exported weights.

Importable without JAX or Flax (only torch, numpy, safetensors and json). Module and parameter names
follow the Flax model one to one (`encoders.0.blocks.1.attn.qkv.weight` is the Flax
`encoders/0/blocks/1/attn/qkv/kernel`), so `lmdir_jax.export.convert` only transposes kernels.

Layout: the public `forward` takes and returns NHWC float32 images in [0, 1] (as the JAX model);
internally the network runs NCHW, the layout PyTorch convolutions are fast in. Priors are keyword
tensors; a prior that is not given is *masked* (the network then ignores it, exactly as JAX does):

    model = load("export_dir")                       # DIR/config.json + DIR/model.safetensors
    restored = model(lq)                             # lq (B, H, W, 3), any H, W
    restored = model(lq, deg_states=s, deg_mask=m)   # CLIP text states (B, T, text_dim), mask (B, T)
    restored = model(lq, reference=ref)              # (B, Hr, Wr, 3) in [0, 1]

The forward has no Python branch on tensor values or sizes (padding, pooling and the reference
switch are tensor arithmetic), so the module runs unchanged under `torch.export.export`,
`torch.compile` and `torch.onnx.export(..., dynamo=True)` with dynamic batch, height and width.
Which priors are given (None or a tensor) is the only structural choice: it picks the graph.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from lmdir_jax import architecture
from lmdir_jax.architecture import L2_EPS, LN_EPS, MASKED_LOGIT, MLP_EXPANSION, MULTIPLE
from lmdir_jax.export.folder import CONFIG_FILE, WEIGHTS_FILE


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="none")


def _conv(cin: int, cout: int, k: int, *, stride: int = 1, groups: int = 1,
          bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=bias)


class BiasFreeLayerNorm(nn.Module):
    """Restormer's bias-free LayerNorm: x / sqrt(var(x) + eps) * weight (x is not centred)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise over the last axis."""
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return x / torch.sqrt(var + LN_EPS) * self.weight


def block_norm(dim: int, kind: str) -> nn.Module:
    """The backbone blocks' LayerNorm: `with_bias` (nn.LayerNorm) or `bias_free` (Restormer)."""
    if kind == "with_bias":
        return nn.LayerNorm(dim, eps=LN_EPS)
    if kind == "bias_free":
        return BiasFreeLayerNorm(dim)
    raise ValueError(f"model.layernorm must be 'with_bias' or 'bias_free', got {kind!r}")


def _channel_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the channel axis of an NCHW tensor."""
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C), pixels in row-major order."""
    return x.flatten(2).transpose(1, 2)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
           mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention of q (B, Nq, C) over k, v (B, Nk, C); mask (B, Nk) bool, True = real.

    A masked key contributes nothing whatever its value; a query whose keys are all masked gets 0.
    """
    b, nq, c = q.shape
    nk = k.shape[1]
    dh = c // heads
    qh = q.reshape(b, nq, heads, dh).transpose(1, 2)
    kh = k.reshape(b, nk, heads, dh).transpose(1, 2)
    vh = v.reshape(b, nk, heads, dh).transpose(1, 2)  # (B, heads, Nk, dh)
    logits = (qh @ kh.transpose(-1, -2)) / math.sqrt(float(dh))
    if mask is not None:
        vh = torch.where(mask[:, None, :, None], vh, vh.new_zeros(()))
        logits = torch.where(mask[:, None, None, :], logits, logits.new_full((), MASKED_LOGIT))
    out = (torch.softmax(logits, dim=-1) @ vh).transpose(1, 2).reshape(b, nq, c)
    if mask is not None:
        out = torch.where(mask.any(dim=1)[:, None, None], out, out.new_zeros(()))
    return out


class MultiHeadAttention(nn.Module):
    """q/k/v/out projections around `attend` (Flax `models.attention.MultiHeadAttention`)."""

    def __init__(self, dim: int, kv_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(kv_dim, dim)
        self.v = nn.Linear(kv_dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Queries from x (B, N, dim) attend to context (B, M, kv_dim); with every key of an
        example masked the result is exactly 0 (the `out` bias is not added either)."""
        o = self.out(attend(self.q(x), self.k(context), self.v(context), self.heads, mask))
        if mask is not None:
            o = torch.where(mask.any(dim=1)[:, None, None], o, o.new_zeros(()))
        return o


class ChannelAttention(nn.Module):
    """MDTA: multi-head attention across channels (Flax `models.blocks.ChannelAttention`)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads))
        self.qkv = _conv(dim, 3 * dim, 1, bias=False)
        self.qkv_dw = _conv(3 * dim, 3 * dim, 3, groups=3 * dim, bias=False)
        self.out = _conv(dim, dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        b, c, h, w = x.shape
        q, k, v = self.qkv_dw(self.qkv(x)).chunk(3, dim=1)
        q, k, v = (t.reshape(b, self.heads, c // self.heads, h * w) for t in (q, k, v))
        q = F.normalize(q, dim=-1, eps=L2_EPS)
        k = F.normalize(k, dim=-1, eps=L2_EPS)
        logits = (q @ k.transpose(-1, -2)) * self.temperature[None, :, None, None]
        out = torch.softmax(logits, dim=-1) @ v
        return self.out(out.reshape(b, c, h, w))


class GatedFeedForward(nn.Module):
    """GDFN: 1x1 conv, 3x3 depth-wise conv, gelu(a) * g, 1x1 conv; no biases."""

    def __init__(self, dim: int, expansion: float):
        super().__init__()
        hidden = architecture.ffn_hidden(dim, expansion)
        self.inp = _conv(dim, 2 * hidden, 1, bias=False)
        self.dw = _conv(2 * hidden, 2 * hidden, 3, groups=2 * hidden, bias=False)
        self.out = _conv(hidden, dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        a, g = self.dw(self.inp(x)).chunk(2, dim=1)
        return self.out(_gelu(a) * g)


class Modulation(nn.Module):
    """DATB: pooled degradation prompt -> shift1, scale1, gate1, shift2, scale2, gate2."""

    def __init__(self, prompt_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Linear(prompt_dim, 6 * dim)

    def forward(self, pooled: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, P) -> six (B, dim, 1, 1) tensors."""
        return self.proj(pooled)[:, :, None, None].chunk(6, dim=1)


class SpatialCrossAttention(nn.Module):
    """CATB / RTB: pixels (after a LayerNorm) attend to tokens; returns the update."""

    def __init__(self, dim: int, token_dim: int, heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = MultiHeadAttention(dim, token_dim, heads)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W), tokens (B, N, token_dim) -> update (B, C, H, W)."""
        b, c, h, w = x.shape
        out = self.attn(self.norm(_tokens(x)), tokens)
        return out.transpose(1, 2).reshape(b, c, h, w)


class TransformerBlock(nn.Module):
    """DATB block with optional CATB (content) and RTB (reference) cross-attention."""

    def __init__(self, dim: int, heads: int, expansion: float, prompt_dim: int, ref_dim: int,
                 *, catb: bool, rtb: bool, layernorm: str = "with_bias", modulated: bool = True):
        super().__init__()
        self.norm1 = block_norm(dim, layernorm)
        self.attn = ChannelAttention(dim, heads)
        self.norm2 = block_norm(dim, layernorm)
        self.ffn = GatedFeedForward(dim, expansion)
        self.modulation = Modulation(prompt_dim, dim) if modulated else None
        self.content_attn = SpatialCrossAttention(dim, prompt_dim, heads) if catb else None
        self.ref_attn = SpatialCrossAttention(dim, ref_dim, heads) if rtb else None

    def forward(self, x: torch.Tensor, cond: dict) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W) conditioned on prompts and reference tokens."""
        if self.modulation is None:
            x = x + self.attn(_channel_norm(self.norm1, x))
        else:
            s1, a1, g1, s2, a2, g2 = self.modulation(cond["deg_pooled"])
            x = x + (1 + g1) * self.attn(_channel_norm(self.norm1, x) * (1 + a1) + s1)
        if self.content_attn is not None:
            x = x + self.content_attn(x, cond["content"])
        if self.ref_attn is not None and cond["ref_tokens"] is not None:
            updated = x + self.ref_attn(x, cond["ref_tokens"])
            x = torch.where(cond["has_reference"][:, None, None, None], updated, x)
        if self.modulation is None:
            return x + self.ffn(_channel_norm(self.norm2, x))
        return x + (1 + g2) * self.ffn(_channel_norm(self.norm2, x) * (1 + a2) + s2)


class BlockStack(nn.Module):
    """The TransformerBlocks of one U-Net level (`blocks`)."""

    def __init__(self, n: int, **kwargs):
        super().__init__()
        self.blocks = nn.ModuleList([TransformerBlock(**kwargs) for _ in range(n)])

    def forward(self, x: torch.Tensor, cond: dict) -> torch.Tensor:
        """Run the blocks in order."""
        for blk in self.blocks:
            x = blk(x, cond)
        return x


class PromptEncoder(nn.Module):
    """Learnable queries read the CLIP text priors -> (degradation, content) prompts."""

    def __init__(self, text_dim: int, dim: int, heads: int, num_deg: int, num_content: int):
        super().__init__()
        self.num_deg = num_deg
        self.deg_queries = nn.Parameter(torch.zeros(num_deg, dim))
        self.content_queries = nn.Parameter(torch.zeros(num_content, dim))
        self.proj_deg = nn.Linear(text_dim, dim)
        self.proj_scene = nn.Linear(text_dim, dim)
        for name in ("norm_qd", "norm_kd", "norm_qc", "norm_ks", "norm_sa", "norm_mlp",
                     "norm_out"):
            setattr(self, name, nn.LayerNorm(dim, eps=LN_EPS))
        self.cross_deg = MultiHeadAttention(dim, dim, heads)
        self.cross_scene = MultiHeadAttention(dim, dim, heads)
        self.self_attn = MultiHeadAttention(dim, dim, heads)
        self.mlp_in = nn.Linear(dim, MLP_EXPANSION * dim)
        self.mlp_out = nn.Linear(MLP_EXPANSION * dim, dim)

    def forward(self, deg_states, deg_mask, scene_states, scene_mask):
        """Prompts (B, Nd, P) and (B, Nc, P); masked tokens never reach the output."""
        b = deg_mask.shape[0]

        def tokens(states, mask, proj, norm):
            return norm(proj(torch.where(mask[..., None], states, states.new_zeros(()))))

        deg_tok = tokens(deg_states, deg_mask, self.proj_deg, self.norm_kd)
        scene_tok = tokens(scene_states, scene_mask, self.proj_scene, self.norm_ks)
        qd = self.deg_queries.expand(b, -1, -1)
        qc = self.content_queries.expand(b, -1, -1)
        qd = qd + self.cross_deg(self.norm_qd(qd), deg_tok, deg_mask)
        qc = qc + self.cross_scene(self.norm_qc(qc), scene_tok, scene_mask)
        q = torch.cat([qd, qc], dim=1)
        n = self.norm_sa(q)
        q = q + self.self_attn(n, n)
        q = q + self.mlp_out(_gelu(self.mlp_in(self.norm_mlp(q))))
        q = self.norm_out(q)
        return q[:, : self.num_deg], q[:, self.num_deg :]


def _bilinear(x: torch.Tensor, height, width) -> torch.Tensor:
    """Bilinear resize of NCHW x (half-pixel centres, no anti-aliasing), as the JAX model."""
    return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)


def _align_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """The first `channels` channels of NCHW x, zero-padded when x has fewer."""
    c = x.shape[1]
    if c >= channels:
        return x[:, :channels]
    return F.pad(x, (0, 0, 0, 0, 0, channels - c))


class ChannelCrossAttention(nn.Module):
    """Channel cross-attention, with PIP's top-k selection when `topk` (`models.pip`)."""

    def __init__(self, dim: int, heads: int, *, topk: bool):
        super().__init__()
        self.heads = heads
        self.topk = architecture.pip_topk(dim // heads) if topk else ()
        self.temperature = nn.Parameter(torch.ones(heads))
        self.q = _conv(dim, dim, 1, bias=False)
        self.q_dw = _conv(dim, dim, 3, groups=dim, bias=False)
        self.kv = _conv(dim, 2 * dim, 1, bias=False)
        self.kv_dw = _conv(2 * dim, 2 * dim, 3, groups=2 * dim, bias=False)
        self.out = _conv(dim, dim, 1, bias=False)
        self.mix = nn.Parameter(torch.full((len(self.topk),), 0.2)) if topk else None

    def forward(self, x_q: torch.Tensor, x_kv: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W), (B, C, H, W) -> (B, C, H, W)."""
        b, c, h, w = x_q.shape
        q = self.q_dw(self.q(x_q))
        k, v = self.kv_dw(self.kv(x_kv)).chunk(2, dim=1)
        q, k, v = (t.reshape(b, self.heads, c // self.heads, h * w) for t in (q, k, v))
        q = F.normalize(q, dim=-1, eps=L2_EPS)
        k = F.normalize(k, dim=-1, eps=L2_EPS)
        logits = (q @ k.transpose(-1, -2)) * self.temperature[None, :, None, None]
        if not self.topk:
            out = torch.softmax(logits, dim=-1) @ v
        else:
            out = 0.0
            for i, n in enumerate(self.topk):
                kth = torch.topk(logits, n, dim=-1).values[..., -1:]
                masked = logits.masked_fill(logits < kth, float("-inf"))
                out = out + (torch.softmax(masked, dim=-1) @ v) * self.mix[i]
        return self.out(out.reshape(b, c, h, w))


class PromptToPrompt(nn.Module):
    """PIP's prompt-to-prompt block: the basic prompt attends to the degradation-aware one."""

    def __init__(self, dim: int, heads: int, expansion: float):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim, eps=LN_EPS)
        self.norm_kv = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = ChannelCrossAttention(dim, heads, topk=False)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.ffn = GatedFeedForward(dim, expansion)

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """NCHW (B, P, S, S) twice -> (B, P, S, S)."""
        x = q + self.attn(_channel_norm(self.norm_q, q), _channel_norm(self.norm_kv, kv))
        return x + self.ffn(_channel_norm(self.norm2, x))


class DualGatedFeedForward(nn.Module):
    """1x1 conv, 3x3 depth-wise, gelu(b) * a + gelu(a) * b, 1x1 conv; no biases."""

    def __init__(self, dim: int, expansion: float):
        super().__init__()
        hidden = architecture.ffn_hidden(dim, expansion)
        self.inp = _conv(dim, 2 * hidden, 1, bias=False)
        self.dw = _conv(2 * hidden, 2 * hidden, 3, groups=2 * hidden, bias=False)
        self.out = _conv(hidden, dim, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, H, W)."""
        a, g = self.dw(self.inp(x)).chunk(2, dim=1)
        return self.out(_gelu(g) * a + _gelu(a) * g)


class PromptToFeature(nn.Module):
    """PIP's selective prompt-to-feature block on a skip feature (`models.pip.PromptToFeature`)."""

    def __init__(self, feat_dim: int, prompt_dim: int, heads: int, expansion: float):
        super().__init__()
        self.feat_dim, self.prompt_dim = feat_dim, prompt_dim
        self.norm_x = nn.LayerNorm(feat_dim, eps=LN_EPS)
        self.norm_p = nn.LayerNorm(prompt_dim, eps=LN_EPS)
        self.attn = ChannelCrossAttention(prompt_dim, heads, topk=True)
        self.reduce = (_conv(prompt_dim, feat_dim, 1, bias=False) if feat_dim < prompt_dim
                       else None)
        self.norm2 = nn.LayerNorm(feat_dim, eps=LN_EPS)
        self.ffn = DualGatedFeedForward(feat_dim, expansion)

    def forward(self, x: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W), (B, P, H, W) -> (B, C, H, W)."""
        xq, pk = _channel_norm(self.norm_x, x), _channel_norm(self.norm_p, prompt)
        xa = _align_channels(xq, self.prompt_dim)
        y = xa + self.attn(xa, pk)
        if self.feat_dim > self.prompt_dim:
            y = torch.cat([y, xq[:, self.prompt_dim:]], dim=1)
        elif self.reduce is not None:
            y = self.reduce(y)
        return y + self.ffn(_channel_norm(self.norm2, y))


class PromptInPrompt(nn.Module):
    """PIP's prompt of one skip level and its prompt-to-feature interaction (`models.pip`)."""

    def __init__(self, feat_dim: int, prompt_dim: int, size: int, kinds: int, *, heads: int,
                 prompt_heads: int, expansion: float):
        super().__init__()
        self.size = size
        self.degradation_prompts = nn.Parameter(torch.zeros(kinds, prompt_dim))
        self.basic_prompt = nn.Parameter(torch.zeros(size, size, prompt_dim))
        self.interaction = PromptToPrompt(prompt_dim, prompt_heads, expansion)
        self.out = _conv(prompt_dim, prompt_dim, 3, bias=False)
        self.to_feature = PromptToFeature(feat_dim, prompt_dim, heads, expansion)

    def forward(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The skip feature x (B, C, H, W) after PIP, for prompt weights (B, T)."""
        b, _, h, w = x.shape
        p = self.degradation_prompts.shape[-1]
        deg = (weights[:, :, None] * self.degradation_prompts[None]).mean(dim=1)  # (B, P)
        feature = _align_channels(_bilinear(x, self.size, self.size), p)
        basic = self.basic_prompt.permute(2, 0, 1)[None].expand(b, -1, -1, -1)
        low = self.interaction(basic, deg[:, :, None, None] * feature)
        return self.to_feature(x, self.out(_bilinear(low, h, w)))


class ReferenceEncoder(nn.Module):
    """Reference image (B, 3, Hr, Wr) -> tokens (B, ref_tokens, D)."""

    def __init__(self, dim: int, ref_tokens: int):
        super().__init__()
        self.side = math.isqrt(ref_tokens)
        if self.side * self.side != ref_tokens:
            raise ValueError(f"ref_tokens must be a perfect square, got {ref_tokens}")
        self.conv1 = _conv(3, dim, 3)
        self.conv2 = _conv(dim, dim, 3, stride=2)
        self.conv3 = _conv(dim, dim, 3)
        self.pos = nn.Parameter(torch.zeros(ref_tokens, dim))
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, reference: torch.Tensor, has_reference: torch.Tensor) -> torch.Tensor:
        """Tokens of the reference (a missing reference is zeroed first)."""
        r = torch.where(has_reference[:, None, None, None], reference, reference.new_zeros(()))
        r = _gelu(self.conv1(r))
        r = _gelu(self.conv2(r))
        r = self.conv3(r)
        wh = _pool_weights(r.shape[2], self.side, r.device)
        ww = _pool_weights(r.shape[3], self.side, r.device)
        t = wh @ r @ ww.transpose(0, 1)  # adaptive average pooling to (side, side)
        return self.norm(_tokens(t) + self.pos)


def _pool_weights(n, side: int, device) -> torch.Tensor:
    """(side, n) averaging matrix of torch.nn.AdaptiveAvgPool bins: bin i covers
    [floor(i*n/side), ceil((i+1)*n/side)). n may be a symbolic size."""
    k = torch.arange(n, device=device)
    i = torch.arange(side, device=device)
    lo = torch.div(i * n, side, rounding_mode="floor")
    hi = -torch.div(-(i + 1) * n, side, rounding_mode="floor")
    inside = (k[None, :] >= lo[:, None]) & (k[None, :] < hi[:, None])
    return inside.float() / (hi - lo).float()[:, None]


def _reflect_index(n, size, device) -> torch.Tensor:
    """Indices of numpy/jnp `reflect` padding of an axis of length n at its end to length `size`.

    Index arithmetic (period 2n - 2) rather than np.pad or F.pad, so n and size may be symbolic
    sizes and the padding may exceed n - 1 (numpy reflects repeatedly; F.pad refuses).
    """
    last = torch.arange(n, device=device)[-1:]  # n - 1 as a tensor (ONNX-friendly)
    period = (2 * last).clamp(min=1)
    j = torch.remainder(torch.arange(size, device=device), period)
    return torch.where(j <= last, j, period - j)


class LMDIRTorch(nn.Module):
    """The LMDIR restoration network in PyTorch, built from the `model` config section (a dict).

    `forward(lq, **priors)`: lq (B, H, W, 3) float32 in [0, 1] (NHWC, any H, W) -> restored
    (B, H, W, 3) float32. Priors (all optional; a missing one is masked):
      deg_states (B, Td, text_dim), deg_mask (B, Td) bool (default: all True when states are given);
      scene_states (B, Ts, text_dim), scene_mask (B, Ts) bool;
      reference (B, Hr, Wr, 3) float32 in [0, 1], has_reference (B,) bool (default True);
      deg_weights (B, T) float32, PIP's prompt weights over the degradation kinds (only with
      prompt_module "pip"; default zeros, an unknown degradation).
    Parameters are float32; the config's `dtype` (the JAX compute dtype) is not used.
    """

    def __init__(self, model_config: dict):
        super().__init__()
        c = dict(model_config)
        stages = {st.name: st for st in architecture.stages(c)}  # ValueError for a bad table
        self.config = c
        self.layout = architecture.layout(c)
        self.text_dim = int(c["text_dim"])
        self.ref_tokens = int(c["ref_tokens"])
        self.ref_dim = int(c["ref_dim"])
        width = int(c["width"])
        widths = architecture.level_widths(c)
        layernorm = str(c.get("layernorm", "with_bias"))
        # Restormer layout: the level-1 decoder, refinement and output run at 2C (no reduce conv).
        top = architecture.top_width(c)
        self.prompt_module = architecture.prompt_module(c)
        self.num_kinds = int(c.get("pip_kinds", 0))

        def stack(name: str) -> BlockStack:
            st = stages[name]
            return BlockStack(
                st.blocks, dim=st.width, heads=st.heads,
                expansion=float(c["ffn_expansion"]), prompt_dim=int(c["prompt_dim"]),
                ref_dim=self.ref_dim, catb=st.catb, rtb=st.rtb, layernorm=layernorm,
                modulated=self.prompt_module == "lmdir",
            )

        self.prompt = (PromptEncoder(self.text_dim, int(c["prompt_dim"]), int(c["prompt_heads"]),
                                     int(c["num_deg_queries"]), int(c["num_content_queries"]))
                       if self.prompt_module == "lmdir" else None)
        self.reference = ReferenceEncoder(self.ref_dim, self.ref_tokens)
        self.embed = _conv(3, width, 3, bias=bool(c.get("embed_bias", True)))
        self.encoders = nn.ModuleList([stack(f"encoders.{i}") for i in range(3)])
        self.downs = nn.ModuleList([Downsample(widths[i]) for i in range(3)])
        self.latent = stack("latent")
        self.ups = nn.ModuleList([Upsample(widths[i]) for i in (3, 2, 1)])
        reduce_levels = (2, 1) if self.layout == "restormer" else (2, 1, 0)
        self.reduces = nn.ModuleList([_conv(2 * widths[i], widths[i], 1, bias=False)
                                      for i in reduce_levels])
        self.decoders = nn.ModuleList([stack(f"decoders.{k}") for k in range(3)])
        self.refinement = stack("refinement")
        self.skip_prompts = nn.ModuleList([
            PromptInPrompt(widths[lvl - 1], int(c["pip_prompt_dims"][lvl - 1]),
                           int(c["pip_prompt_sizes"][lvl - 1]), self.num_kinds,
                           heads=int(c["pip_heads"]), prompt_heads=int(c["pip_prompt_heads"]),
                           expansion=float(c["ffn_expansion"]))
            for lvl in (3, 2, 1)
        ]) if self.prompt_module == "pip" else None
        self.output = _conv(top, 3, 3, bias=bool(c.get("output_bias", True)))

    def _conditions(self, lq: torch.Tensor, deg_states, deg_mask, scene_states, scene_mask, reference,
                    has_reference) -> dict:
        b, dev = lq.shape[0], lq.device

        def text(states, mask):
            if states is None:
                return (torch.zeros(b, 1, self.text_dim, device=dev),
                        torch.zeros(b, 1, dtype=torch.bool, device=dev))
            states = states.float()
            mask = (torch.ones(states.shape[:2], dtype=torch.bool, device=dev) if mask is None
                    else mask.bool())
            return states, mask

        deg_states, deg_mask = text(deg_states, deg_mask)
        scene_states, scene_mask = text(scene_states, scene_mask)
        if self.prompt is None:  # unmodulated blocks without CATB read neither
            deg, content = lq.new_zeros(b, 1, 1), None
        else:
            deg, content = self.prompt(deg_states, deg_mask, scene_states, scene_mask)
        # No reference given: the encoder and the RTB are left out of the graph (the RTB would
        # discard their result). A given reference always runs them; `has_reference` then selects
        # per example with tensor arithmetic, never a Python branch on its values.
        ref_tokens = None
        if reference is not None:
            has_reference = (torch.ones(b, dtype=torch.bool, device=dev) if has_reference is None
                             else has_reference.bool())
            ref_tokens = self.reference(reference.float().permute(0, 3, 1, 2), has_reference)
        return {"deg_pooled": deg.mean(dim=1), "content": content, "ref_tokens": ref_tokens,
                "has_reference": has_reference}

    def forward(
        self,
        lq: torch.Tensor,
        deg_states: torch.Tensor | None = None,
        deg_mask: torch.Tensor | None = None,
        scene_states: torch.Tensor | None = None,
        scene_mask: torch.Tensor | None = None,
        reference: torch.Tensor | None = None,
        has_reference: torch.Tensor | None = None,
        deg_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Restore lq (B, H, W, 3) in [0, 1] given the (optional) priors; NHWC float32 output."""
        if lq.ndim != 4 or lq.shape[-1] != 3:
            raise ValueError(f"lq must be NHWC (B, H, W, 3), got {tuple(lq.shape)}")
        b, h, w, _ = lq.shape
        x_in = lq.float().permute(0, 3, 1, 2)
        # Padded sizes as multiples of 8 (not h + (-h) % 8), so symbolic shapes stay divisible.
        hp, wp = (h + MULTIPLE - 1) // MULTIPLE * MULTIPLE, (w + MULTIPLE - 1) // MULTIPLE * MULTIPLE
        x_in = x_in.index_select(2, _reflect_index(h, hp, x_in.device))
        x_in = x_in.index_select(3, _reflect_index(w, wp, x_in.device))
        cond = self._conditions(lq, deg_states, deg_mask, scene_states, scene_mask, reference,
                                has_reference)
        if self.skip_prompts is not None:
            deg_weights = (x_in.new_zeros(b, self.num_kinds) if deg_weights is None
                           else deg_weights.float())
        x = self.embed(x_in)
        skips = []
        for enc, down in zip(self.encoders, self.downs, strict=True):
            x = enc(x, cond)
            skips.append(x)
            x = down(x)
        x = self.latent(x, cond)
        for i, (up, dec, skip) in enumerate(zip(self.ups, self.decoders, skips[::-1],
                                                strict=True)):
            if self.skip_prompts is not None:
                skip = self.skip_prompts[i](skip, deg_weights)
            x = torch.cat([up(x), skip], dim=1)
            if i < len(self.reduces):
                x = self.reduces[i](x)
            x = dec(x, cond)
        x = self.refinement(x, cond)
        restored = x_in + self.output(x)
        # Crop by gathering (a slice [:h] would make torch.export guard on h == hp).
        restored = restored.index_select(2, torch.arange(h, device=x_in.device))
        restored = restored.index_select(3, torch.arange(w, device=x_in.device))
        return restored.permute(0, 2, 3, 1)


def _pixel_unshuffle(x: torch.Tensor) -> torch.Tensor:
    """F.pixel_unshuffle(x, 2) as reshape/permute (its decomposition guards on sizes under
    torch.export): channel c*4 + i*2 + j holds x[c, 2y+i, 2x+j]."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, c * 4, h // 2, w // 2)


def _pixel_shuffle(x: torch.Tensor) -> torch.Tensor:
    """F.pixel_shuffle(x, 2) as reshape/permute, the inverse of `_pixel_unshuffle`."""
    b, c4, h, w = x.shape
    x = x.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c4 // 4, h * 2, w * 2)


class Downsample(nn.Module):
    """3x3 conv Cl -> Cl/2 (no bias), then pixel-unshuffle(2)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = _conv(dim, dim // 2, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Halve the resolution, double the width."""
        return _pixel_unshuffle(self.conv(x))


class Upsample(nn.Module):
    """3x3 conv Cl -> 2Cl (no bias), then pixel-shuffle(2)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = _conv(dim, dim * 2, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Double the resolution, halve the width."""
        return _pixel_shuffle(self.conv(x))


def load(directory: str | Path, map_location: str = "cpu") -> LMDIRTorch:
    """An exported model ready for inference: DIR/config.json + DIR/model.safetensors, eval mode.

    Raises FileNotFoundError when either file is missing and RuntimeError (from
    `load_state_dict(strict=True)`) when the weights do not fit the config.
    """
    directory = Path(directory)
    meta = json.loads((directory / CONFIG_FILE).read_text())
    model = LMDIRTorch(meta["model"])
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE), device=map_location),
                          strict=True)
    return model.to(map_location).eval()
