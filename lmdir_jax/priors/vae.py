"""Stable Diffusion's VAE (`AutoencoderKL`) in Flax NNX, with diffusers' parameter names.

    encoder: conv_in -> down_blocks [ResnetBlock2D x layers, Downsample2D] -> mid_block (resnet,
             single-head self-attention, resnet) -> conv_norm_out, SiLU, conv_out -> quant_conv
             -> (mean, log-variance) of the latent
    decoder: post_quant_conv -> conv_in -> mid_block -> up_blocks [ResnetBlock2D x (layers + 1),
             Upsample2D] -> conv_norm_out, SiLU, conv_out

Activations are NHWC; latents are multiplied by `scaling_factor` outside (`diffusion`).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from lmdir_jax.errors import UsageError
from lmdir_jax.priors.unet import (
    Attention,
    Downsample2D,
    ResnetBlock2D,
    Upsample2D,
    conv,
    group_norm,
    set_kernels,
)

EPS = 1e-6


@dataclass(frozen=True)
class VAEConfig:
    """Shape of an AutoencoderKL (the values of its diffusers config.json that SD uses)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 512
    scaling_factor: float = 0.18215
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_diffusers(cls, d: dict) -> VAEConfig:
        """From a diffusers `AutoencoderKL` config.json; one clear line for what SD never uses."""
        for key, ok in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            bad = [b for b in d.get(key, [ok]) if b != ok]
            if bad:
                raise UsageError(f"unsupported VAE block {bad[0]!r} (Stable Diffusion's VAE uses {ok})")
        if d.get("act_fn", "silu") != "silu" or d.get("shift_factor") not in (None, 0, 0.0):
            raise UsageError("unsupported VAE config: act_fn must be silu and shift_factor unset")
        cfg = cls(
            in_channels=int(d.get("in_channels", 3)), out_channels=int(d.get("out_channels", 3)),
            block_out_channels=tuple(int(c) for c in d.get("block_out_channels", cls.block_out_channels)),
            layers_per_block=int(d.get("layers_per_block", 2)), latent_channels=int(d.get("latent_channels", 4)),
            norm_num_groups=int(d.get("norm_num_groups", 32)), sample_size=int(d.get("sample_size", 512)),
            scaling_factor=float(d.get("scaling_factor", 0.18215)),
            use_quant_conv=bool(d.get("use_quant_conv", True)),
            use_post_quant_conv=bool(d.get("use_post_quant_conv", True)),
            mid_block_add_attention=bool(d.get("mid_block_add_attention", True)),
        )
        if any(c % cfg.norm_num_groups for c in cfg.block_out_channels):
            raise UsageError(f"VAE config: channels {cfg.block_out_channels} do not split into "
                             f"{cfg.norm_num_groups} groups")
        return cfg

    def to_diffusers(self) -> dict:
        """The diffusers config.json of this VAE (diffusers' `AutoencoderKL` reads it)."""
        n = len(self.block_out_channels)
        return {"_class_name": "AutoencoderKL", "in_channels": self.in_channels, "out_channels": self.out_channels,
                "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
                "block_out_channels": list(self.block_out_channels), "layers_per_block": self.layers_per_block,
                "act_fn": "silu", "latent_channels": self.latent_channels, "norm_num_groups": self.norm_num_groups,
                "sample_size": self.sample_size, "scaling_factor": self.scaling_factor,
                "use_quant_conv": self.use_quant_conv, "use_post_quant_conv": self.use_post_quant_conv,
                "mid_block_add_attention": self.mid_block_add_attention}


class VAEAttention(Attention):
    """The VAE's single-head self-attention over H*W tokens: group_norm, to_q/k/v (biased), to_out.0, + x."""

    def __init__(self, c: int, groups: int, *, dtype, rngs):
        super().__init__(c, 1, bias=True, dtype=dtype, rngs=rngs)
        self.group_norm = group_norm(c, groups, EPS, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        return x + super().__call__(self.group_norm(x).reshape(b, h * w, c)).reshape(b, h, w, c)


class VAEMidBlock(nnx.Module):
    """`UNetMidBlock2D` without a time embedding: resnet, (attention), resnet."""

    def __init__(self, c: int, groups: int, add_attention: bool, *, dtype, rngs):
        self.resnets = nnx.List([ResnetBlock2D(c, c, None, groups, EPS, dtype=dtype, rngs=rngs) for _ in range(2)])
        self.attentions = nnx.List([VAEAttention(c, groups, dtype=dtype, rngs=rngs)]) if add_attention else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class EncoderBlock(nnx.Module):
    """`DownEncoderBlock2D`: resnets, then (except last) a stride-2 conv after right/bottom padding."""

    def __init__(self, cin: int, cout: int, n: int, groups: int, down: bool, *, dtype, rngs):
        self.resnets = nnx.List([ResnetBlock2D(cin if j == 0 else cout, cout, None, groups, EPS, dtype=dtype, rngs=rngs)
                                 for j in range(n)])
        self.downsamplers = nnx.List([Downsample2D(cout, 0, dtype=dtype, rngs=rngs)]) if down else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for r in self.resnets:
            x = r(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class DecoderBlock(nnx.Module):
    """`UpDecoderBlock2D`: resnets, then (except last) nearest x2 and a conv."""

    def __init__(self, cin: int, cout: int, n: int, groups: int, up: bool, *, dtype, rngs):
        self.resnets = nnx.List([ResnetBlock2D(cin if j == 0 else cout, cout, None, groups, EPS, dtype=dtype, rngs=rngs)
                                 for j in range(n)])
        self.upsamplers = nnx.List([Upsample2D(cout, dtype=dtype, rngs=rngs)]) if up else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for r in self.resnets:
            x = r(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class Encoder(nnx.Module):
    """Image (B, H, W, 3) in [-1, 1] -> (B, H/f, W/f, 2 x latent channels) moments before quant_conv."""

    def __init__(self, cfg: VAEConfig, *, dtype, rngs):
        ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = conv(cfg.in_channels, ch[0], dtype=dtype, rngs=rngs)
        self.down_blocks = nnx.List([
            EncoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, i < n - 1, dtype=dtype, rngs=rngs)
            for i in range(n)])
        self.mid_block = VAEMidBlock(ch[-1], g, cfg.mid_block_add_attention, dtype=dtype, rngs=rngs)
        self.conv_norm_out = group_norm(ch[-1], g, EPS, dtype=dtype, rngs=rngs)
        self.conv_out = conv(ch[-1], 2 * cfg.latent_channels, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nnx.Module):
    """Latent (B, h, w, C) after post_quant_conv -> image (B, h*f, w*f, 3) in about [-1, 1]."""

    def __init__(self, cfg: VAEConfig, *, dtype, rngs):
        rev, g, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = conv(cfg.latent_channels, rev[0], dtype=dtype, rngs=rngs)
        self.mid_block = VAEMidBlock(rev[0], g, cfg.mid_block_add_attention, dtype=dtype, rngs=rngs)
        self.up_blocks = nnx.List([
            DecoderBlock(rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, g, i < n - 1, dtype=dtype, rngs=rngs)
            for i in range(n)])
        self.conv_norm_out = group_norm(rev[-1], g, EPS, dtype=dtype, rngs=rngs)
        self.conv_out = conv(rev[-1], cfg.out_channels, dtype=dtype, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
    """SD's VAE: `encode` gives the latent mean (the deterministic latent SD's image-to-image uses),
    `decode` the image; both unscaled (multiply latents by `config.scaling_factor` for the UNet)."""

    def __init__(self, cfg: VAEConfig, *, dtype=jnp.float32, kernels: str = "auto", rngs: nnx.Rngs):
        self.config, self.dtype = cfg, dtype
        lat = cfg.latent_channels
        self.encoder = Encoder(cfg, dtype=dtype, rngs=rngs)
        self.decoder = Decoder(cfg, dtype=dtype, rngs=rngs)
        self.quant_conv = conv(2 * lat, 2 * lat, 1, dtype=dtype, rngs=rngs) if cfg.use_quant_conv else None
        self.post_quant_conv = conv(lat, lat, 1, dtype=dtype, rngs=rngs) if cfg.use_post_quant_conv else None
        set_kernels(self, kernels)

    @property
    def scale_factor(self) -> int:
        """Image pixels per latent pixel (8 for SD)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def encode(self, x: jax.Array) -> jax.Array:
        """Images (B, H, W, 3) in [-1, 1] -> latent means (B, H/f, W/f, C)."""
        m = self.encoder(x.astype(self.dtype))
        if self.quant_conv is not None:
            m = self.quant_conv(m)
        return m[..., : self.config.latent_channels]

    def decode(self, z: jax.Array) -> jax.Array:
        """Latents (B, h, w, C) -> images (B, h*f, w*f, 3) in about [-1, 1]."""
        z = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)
