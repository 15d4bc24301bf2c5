"""Stable Diffusion's UNet (SD 1.x and 2.x) in Flax NNX, with diffusers' parameter names.

The modules carry the attribute names of diffusers' `UNet2DConditionModel`
(`down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k`, `mid_block.resnets.1.conv2`, ...), so a
parameter's path is its name in a diffusers checkpoint and `clip_weights`' PyTorch<->ours layout
mapping reads the released safetensors as they are (`sd_weights`). Activations are NHWC.

    timestep -> sinusoidal embedding -> time_embedding (linear, SiLU, linear)
    conv_in -> down_blocks [ResnetBlock2D (+ Transformer2DModel)] x layers, Downsample2D
            -> mid_block: resnet, transformer, resnet
            -> up_blocks [concat skip, ResnetBlock2D (+ Transformer2DModel)] x (layers + 1), Upsample2D
            -> conv_norm_out, SiLU, conv_out

SD 1.x and 2.x differ only in config values: the number of heads per block (diffusers' config calls
it `attention_head_dim`: 8 heads for SD 1.x, [5, 10, 20, 20] for SD 2.x, i.e. 64-wide heads), a 1x1
convolution or a linear `proj_in`/`proj_out` (`use_linear_projection`), the cross-attention width
(768 or 1024) and what the network predicts (epsilon or v: the scheduler's business).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from lmdir_jax.errors import UsageError
from lmdir_jax.priors.attention import attention_fn, kernels

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")


@dataclass(frozen=True)
class UNetConfig:
    """Shape of a UNet2DConditionModel (the values of its diffusers config.json that SD uses)."""

    in_channels: int = 4
    out_channels: int = 4
    sample_size: int = 64
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    heads: tuple[int, ...] = (8, 8, 8, 8)
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0

    @classmethod
    def from_diffusers(cls, d: dict) -> UNetConfig:
        """From a diffusers `UNet2DConditionModel` config.json; one clear line for what SD never uses."""
        unsupported = {
            "class_embed_type": None, "addition_embed_type": None, "encoder_hid_dim": None,
            "time_embedding_type": "positional", "resnet_time_scale_shift": "default",
            "act_fn": "silu", "center_input_sample": False, "dual_cross_attention": False,
            "only_cross_attention": False, "mid_block_type": "UNetMidBlock2DCrossAttn",
            "conv_in_kernel": 3, "conv_out_kernel": 3, "downsample_padding": 1,
            "mid_block_scale_factor": 1, "transformer_layers_per_block": 1,
            "reverse_transformer_layers_per_block": None, "attention_type": "default",
            "num_class_embeds": None, "time_cond_proj_dim": None,
        }
        for key, want in unsupported.items():
            got = d.get(key, want)
            if isinstance(want, bool) and isinstance(got, list):
                got = any(got)
            if got != want and not (key == "transformer_layers_per_block" and got == [1] * len(got)):
                raise UsageError(f"unsupported UNet config: {key}={got!r} (Stable Diffusion 1.x/2.x use {want!r})")
        blocks = tuple(int(c) for c in d.get("block_out_channels", cls.block_out_channels))
        heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
        heads = tuple(int(h) for h in heads) if isinstance(heads, list | tuple) else (int(heads),) * len(blocks)
        cross = d.get("cross_attention_dim", 768)
        if isinstance(cross, list | tuple):
            if len(set(cross)) != 1:
                raise UsageError(f"unsupported UNet config: cross_attention_dim={cross!r}")
            cross = cross[0]
        cfg = cls(
            in_channels=int(d.get("in_channels", 4)), out_channels=int(d.get("out_channels", 4)),
            sample_size=int(d.get("sample_size", 64)),
            down_block_types=tuple(d.get("down_block_types", cls.down_block_types)),
            up_block_types=tuple(d.get("up_block_types", cls.up_block_types)),
            block_out_channels=blocks, layers_per_block=int(d.get("layers_per_block", 2)), heads=heads,
            cross_attention_dim=int(cross), use_linear_projection=bool(d.get("use_linear_projection", False)),
            norm_num_groups=int(d.get("norm_num_groups", 32)), norm_eps=float(d.get("norm_eps", 1e-5)),
            flip_sin_to_cos=bool(d.get("flip_sin_to_cos", True)), freq_shift=float(d.get("freq_shift", 0)),
        )
        cfg.check()
        return cfg

    def check(self) -> None:
        """One clear line for a config whose blocks do not fit together."""
        n = len(self.block_out_channels)
        bad = [b for b in self.down_block_types if b not in DOWN_BLOCKS] + [
            b for b in self.up_block_types if b not in UP_BLOCKS]
        if bad:
            raise UsageError(f"unsupported UNet block {bad[0]!r} (supported: {DOWN_BLOCKS + UP_BLOCKS})")
        if not len(self.down_block_types) == len(self.up_block_types) == len(self.heads) == n:
            raise UsageError("UNet config: down/up block types, heads and block_out_channels differ in length")
        for c, h in zip(self.block_out_channels, self.heads, strict=True):
            if c % self.norm_num_groups or c % h:
                raise UsageError(f"UNet config: {c} channels do not split into {self.norm_num_groups} "
                                 f"groups and {h} heads")

    def to_diffusers(self) -> dict:
        """The diffusers config.json of this UNet (diffusers' `UNet2DConditionModel` reads it)."""
        d = dataclasses.asdict(self)
        d["attention_head_dim"] = list(d.pop("heads"))
        for k in ("down_block_types", "up_block_types", "block_out_channels"):
            d[k] = list(d[k])
        return {"_class_name": "UNet2DConditionModel", **d, "act_fn": "silu",
                "mid_block_type": "UNetMidBlock2DCrossAttn", "downsample_padding": 1,
                "center_input_sample": False}


# --------------------------------------------------------------------------- shared blocks


def conv(cin: int, cout: int, k: int = 3, stride: int = 1, pad: int | None = None, *, dtype, rngs) -> nnx.Conv:
    """A k x k convolution with PyTorch's symmetric zero padding (k // 2 unless `pad` says)."""
    p = k // 2 if pad is None else pad
    return nnx.Conv(cin, cout, (k, k), strides=stride, padding=((p, p), (p, p)), dtype=dtype, rngs=rngs)


def group_norm(c: int, groups: int, eps: float, *, dtype, rngs) -> nnx.GroupNorm:
    """GroupNorm over NHWC channels in contiguous groups, statistics in float32 (as PyTorch's)."""
    return nnx.GroupNorm(c, num_groups=groups, epsilon=eps, use_fast_variance=False, dtype=dtype, rngs=rngs)


class ResnetBlock2D(nnx.Module):
    """norm1, SiLU, conv1, (+ time_emb_proj(SiLU(temb))), norm2, SiLU, conv2, + (1x1 conv_shortcut) x."""

    def __init__(self, cin: int, cout: int, temb: int | None, groups: int, eps: float, *, dtype, rngs):
        self.norm1 = group_norm(cin, groups, eps, dtype=dtype, rngs=rngs)
        self.conv1 = conv(cin, cout, dtype=dtype, rngs=rngs)
        self.time_emb_proj = nnx.Linear(temb, cout, dtype=dtype, rngs=rngs) if temb else None
        self.norm2 = group_norm(cout, groups, eps, dtype=dtype, rngs=rngs)
        self.conv2 = conv(cout, cout, dtype=dtype, rngs=rngs)
        self.conv_shortcut = conv(cin, cout, 1, dtype=dtype, rngs=rngs) if cin != cout else None

    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(jax.nn.silu(temb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return (self.conv_shortcut(x) if self.conv_shortcut is not None else x) + h


class Downsample2D(nnx.Module):
    """A stride-2 3x3 convolution; `pad` 1 (UNet) or 0 after padding right and bottom by one (VAE)."""

    def __init__(self, c: int, pad: int, *, dtype, rngs):
        self.pad = pad
        self.conv = conv(c, c, 3, 2, pad, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.pad == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


class Upsample2D(nnx.Module):
    """Nearest-neighbour x2, then a 3x3 convolution."""

    def __init__(self, c: int, *, dtype, rngs):
        self.conv = conv(c, c, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class Attention(nnx.Module):
    """diffusers' `Attention`: to_q, to_k, to_v (biased in the VAE only), to_out.0; cross-attention when
    `context_dim` is given."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, bias: bool = False, *, dtype, rngs):
        self.heads, self.kernels = heads, "xla"  # set_kernels chooses, once, for the whole network
        kv = context_dim or dim
        self.to_q = nnx.Linear(dim, dim, use_bias=bias, dtype=dtype, rngs=rngs)
        self.to_k = nnx.Linear(kv, dim, use_bias=bias, dtype=dtype, rngs=rngs)
        self.to_v = nnx.Linear(kv, dim, use_bias=bias, dtype=dtype, rngs=rngs)
        self.to_out = nnx.List([nnx.Linear(dim, dim, dtype=dtype, rngs=rngs)])

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        c = x if context is None else context
        attend = attention_fn(self.kernels)
        return self.to_out[0](attend(self.to_q(x), self.to_k(c), self.to_v(c), self.heads))


def set_kernels(network: nnx.Module, name: str) -> None:
    """Every attention of `network` computed by the kernels `name` (auto / xla / cpu, see
    `priors.attention`), resolved here once."""
    chosen = kernels(name)
    for _, m in nnx.iter_graph(network):
        if isinstance(m, Attention):
            m.kernels = chosen


class NoParams(nnx.Module):
    """A parameter-free slot (diffusers' Dropout in `ff.net.1`), keeping the indices of the names."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return x


class GEGLU(nnx.Module):
    """proj to twice the width, then hidden * gelu(gate) (exact gelu)."""

    def __init__(self, dim: int, hidden: int, *, dtype, rngs):
        self.proj = nnx.Linear(dim, 2 * hidden, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h, gate = jnp.split(self.proj(x), 2, axis=-1)
        return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    """`ff.net`: GEGLU to 4x width, (dropout), linear back."""

    def __init__(self, dim: int, *, dtype, rngs):
        self.net = nnx.List([GEGLU(dim, 4 * dim, dtype=dtype, rngs=rngs), NoParams(),
                             nnx.Linear(4 * dim, dim, dtype=dtype, rngs=rngs)])

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
    """Pre-LN: self-attention, cross-attention to the text states, GEGLU feed-forward, each residual."""

    def __init__(self, dim: int, heads: int, context_dim: int, *, dtype, rngs):
        ln = lambda: nnx.LayerNorm(dim, epsilon=1e-5, use_fast_variance=False, dtype=dtype, rngs=rngs)  # noqa: E731
        self.norm1, self.attn1 = ln(), Attention(dim, heads, dtype=dtype, rngs=rngs)
        self.norm2, self.attn2 = ln(), Attention(dim, heads, context_dim, dtype=dtype, rngs=rngs)
        self.norm3, self.ff = ln(), FeedForward(dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
    """GroupNorm, proj_in (1x1 conv or linear), one transformer block over the H*W tokens, proj_out,
    plus the input."""

    def __init__(self, c: int, heads: int, context_dim: int, groups: int, linear: bool, *, dtype, rngs):
        self.linear = linear
        self.norm = group_norm(c, groups, 1e-6, dtype=dtype, rngs=rngs)
        proj = (lambda: nnx.Linear(c, c, dtype=dtype, rngs=rngs)) if linear else (  # noqa: E731
            lambda: conv(c, c, 1, dtype=dtype, rngs=rngs))
        self.proj_in = proj()
        self.transformer_blocks = nnx.List([BasicTransformerBlock(c, heads, context_dim, dtype=dtype, rngs=rngs)])
        self.proj_out = proj()

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        y = self.proj_in(self.norm(x)).reshape(b, h * w, c)  # a 1x1 conv and a linear act alike here
        for block in self.transformer_blocks:
            y = block(y, context)
        return x + self.proj_out(y.reshape(b, h, w, c))


# --------------------------------------------------------------------------- UNet


class DownBlock(nnx.Module):
    """`CrossAttnDownBlock2D` (with `attentions`) or `DownBlock2D`: resnets, then a stride-2 conv."""

    def __init__(self, cfg: UNetConfig, i: int, cin: int, temb: int, *, dtype, rngs):
        cout, last = cfg.block_out_channels[i], i == len(cfg.block_out_channels) - 1
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nnx.List([ResnetBlock2D(cin if j == 0 else cout, cout, temb, g, eps, dtype=dtype, rngs=rngs)
                                 for j in range(cfg.layers_per_block)])
        self.attentions = nnx.List([
            Transformer2DModel(cout, cfg.heads[i], cfg.cross_attention_dim, g, cfg.use_linear_projection,
                               dtype=dtype, rngs=rngs)
            for _ in range(cfg.layers_per_block)]) if cfg.down_block_types[i].startswith("CrossAttn") else None
        self.downsamplers = None if last else nnx.List([Downsample2D(cout, 1, dtype=dtype, rngs=rngs)])

    def __call__(self, x, temb, context) -> tuple[jax.Array, list[jax.Array]]:
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nnx.Module):
    """`CrossAttnUpBlock2D` or `UpBlock2D`: (layers + 1) x [concat a skip, resnet (, transformer)], then
    nearest x2 and a conv."""

    def __init__(self, cfg: UNetConfig, i: int, cprev: int, temb: int, *, dtype, rngs):
        rev = cfg.block_out_channels[::-1]
        cout, cin = rev[i], rev[min(i + 1, len(rev) - 1)]
        heads = cfg.heads[::-1][i]
        n, g, eps = cfg.layers_per_block + 1, cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nnx.List([
            ResnetBlock2D((cprev if j == 0 else cout) + (cin if j == n - 1 else cout), cout, temb, g, eps,
                          dtype=dtype, rngs=rngs) for j in range(n)])
        self.attentions = nnx.List([
            Transformer2DModel(cout, heads, cfg.cross_attention_dim, g, cfg.use_linear_projection,
                               dtype=dtype, rngs=rngs)
            for _ in range(n)]) if cfg.up_block_types[i].startswith("CrossAttn") else None
        self.upsamplers = None if i == len(rev) - 1 else nnx.List([Upsample2D(cout, dtype=dtype, rngs=rngs)])

    def __call__(self, x, skips: list[jax.Array], temb, context) -> jax.Array:
        for j, resnet in enumerate(self.resnets):
            x = resnet(jnp.concatenate([x, skips.pop()], axis=-1), temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock(nnx.Module):
    """`UNetMidBlock2DCrossAttn`: resnet, transformer, resnet."""

    def __init__(self, cfg: UNetConfig, temb: int, *, dtype, rngs):
        c, g, eps = cfg.block_out_channels[-1], cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nnx.List([ResnetBlock2D(c, c, temb, g, eps, dtype=dtype, rngs=rngs) for _ in range(2)])
        self.attentions = nnx.List([Transformer2DModel(c, cfg.heads[-1], cfg.cross_attention_dim, g,
                                                       cfg.use_linear_projection, dtype=dtype, rngs=rngs)])

    def __call__(self, x, temb, context) -> jax.Array:
        x = self.resnets[0](x, temb)
        return self.resnets[1](self.attentions[0](x, context), temb)


class TimestepEmbedding(nnx.Module):
    """linear_1, SiLU, linear_2 on the sinusoidal embedding of the timestep."""

    def __init__(self, cin: int, cout: int, *, dtype, rngs):
        self.linear_1 = nnx.Linear(cin, cout, dtype=dtype, rngs=rngs)
        self.linear_2 = nnx.Linear(cout, cout, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool = True, shift: float = 0.0) -> jax.Array:
    """diffusers' sinusoidal timestep embedding (B,) -> (B, dim) float32, cos first when flipped."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - shift))
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    return jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1) if flip_sin_to_cos else emb


class UNet2DConditionModel(nnx.Module):
    """SD's noise-prediction UNet: (noisy latents (B, h, w, C) NHWC, timesteps (B,), text states
    (B, T, D)) -> the prediction (B, h, w, C) (epsilon or v, as the model was trained)."""

    def __init__(self, cfg: UNetConfig, *, dtype=jnp.float32, kernels: str = "auto", rngs: nnx.Rngs):
        cfg.check()
        self.config, self.dtype = cfg, dtype
        c0, temb = cfg.block_out_channels[0], 4 * cfg.block_out_channels[0]
        self.time_embedding = TimestepEmbedding(c0, temb, dtype=dtype, rngs=rngs)
        self.conv_in = conv(cfg.in_channels, c0, dtype=dtype, rngs=rngs)
        blocks, cin = [], c0
        for i, cout in enumerate(cfg.block_out_channels):
            blocks.append(DownBlock(cfg, i, cin, temb, dtype=dtype, rngs=rngs))
            cin = cout
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(cfg, temb, dtype=dtype, rngs=rngs)
        rev = cfg.block_out_channels[::-1]
        self.up_blocks = nnx.List([UpBlock(cfg, i, rev[max(i - 1, 0)], temb, dtype=dtype, rngs=rngs)
                                   for i in range(len(rev))])
        self.conv_norm_out = group_norm(c0, cfg.norm_num_groups, cfg.norm_eps, dtype=dtype, rngs=rngs)
        self.conv_out = conv(c0, cfg.out_channels, dtype=dtype, rngs=rngs)
        set_kernels(self, kernels)

    def __call__(self, sample: jax.Array, timesteps: jax.Array, context: jax.Array) -> jax.Array:
        cfg = self.config
        t = jnp.broadcast_to(jnp.asarray(timesteps), (sample.shape[0],))
        emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = self.time_embedding(emb.astype(self.dtype))
        context = context.astype(self.dtype)
        x = self.conv_in(sample.astype(self.dtype))
        skips = [x]
        for block in self.down_blocks:
            x, s = block(x, temb, context)
            skips += s
        x = self.mid_block(x, temb, context)
        for block in self.up_blocks:
            x = block(x, skips, temb, context)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))
