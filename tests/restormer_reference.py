"""A small re-implementation of Restormer's forward (swz30/Restormer restormer_arch.py): same module
names, parameter shapes and arithmetic, written here so the import test needs no download."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BiasFreeLN(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x / torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + 1e-5) * self.weight


class WithBiasLN(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        mu = x.mean(-1, keepdim=True)
        sigma = x.var(-1, keepdim=True, unbiased=False)
        return (x - mu) / torch.sqrt(sigma + 1e-5) * self.weight + self.bias


class LayerNorm(nn.Module):
    def __init__(self, dim, kind):
        super().__init__()
        self.body = BiasFreeLN(dim) if kind == "BiasFree" else WithBiasLN(dim)

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.body(x.flatten(2).transpose(1, 2))
        return y.transpose(1, 2).reshape(b, c, h, w)


class FeedForward(nn.Module):
    def __init__(self, dim, factor):
        super().__init__()
        hidden = int(dim * factor)
        self.project_in = nn.Conv2d(dim, hidden * 2, 1, bias=False)
        self.dwconv = nn.Conv2d(hidden * 2, hidden * 2, 3, padding=1, groups=hidden * 2,
                                bias=False)
        self.project_out = nn.Conv2d(hidden, dim, 1, bias=False)

    def forward(self, x):
        x1, x2 = self.dwconv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(x1) * x2)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, 1, bias=False)
        self.qkv_dwconv = nn.Conv2d(dim * 3, dim * 3, 3, padding=1, groups=dim * 3, bias=False)
        self.project_out = nn.Conv2d(dim, dim, 1, bias=False)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv_dwconv(self.qkv(x)).chunk(3, dim=1)
        q, k, v = (t.reshape(b, self.heads, c // self.heads, h * w) for t in (q, k, v))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = ((q @ k.transpose(-2, -1)) * self.temperature).softmax(dim=-1)
        return self.project_out((attn @ v).reshape(b, c, h, w))


class TransformerBlock(nn.Module):
    def __init__(self, dim, heads, factor, kind):
        super().__init__()
        self.norm1 = LayerNorm(dim, kind)
        self.attn = Attention(dim, heads)
        self.norm2 = LayerNorm(dim, kind)
        self.ffn = FeedForward(dim, factor)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class Embed(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, 3, padding=1, bias=False)


class Resize(nn.Module):
    def __init__(self, cin, cout, shuffle):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), shuffle)


class Restormer(nn.Module):
    def __init__(self, dim=4, blocks=(1, 1, 1, 1), refinement=1, heads=(1, 1, 2, 2),
                 factor=2.66, kind="WithBias"):
        super().__init__()

        def seq(n, d, h):
            return nn.Sequential(*[TransformerBlock(d, h, factor, kind) for _ in range(n)])

        self.patch_embed = Embed(dim)
        self.encoder_level1 = seq(blocks[0], dim, heads[0])
        self.down1_2 = Resize(dim, dim // 2, nn.PixelUnshuffle(2))
        self.encoder_level2 = seq(blocks[1], dim * 2, heads[1])
        self.down2_3 = Resize(dim * 2, dim, nn.PixelUnshuffle(2))
        self.encoder_level3 = seq(blocks[2], dim * 4, heads[2])
        self.down3_4 = Resize(dim * 4, dim * 2, nn.PixelUnshuffle(2))
        self.latent = seq(blocks[3], dim * 8, heads[3])
        self.up4_3 = Resize(dim * 8, dim * 16, nn.PixelShuffle(2))
        self.reduce_chan_level3 = nn.Conv2d(dim * 8, dim * 4, 1, bias=False)
        self.decoder_level3 = seq(blocks[2], dim * 4, heads[2])
        self.up3_2 = Resize(dim * 4, dim * 8, nn.PixelShuffle(2))
        self.reduce_chan_level2 = nn.Conv2d(dim * 4, dim * 2, 1, bias=False)
        self.decoder_level2 = seq(blocks[1], dim * 2, heads[1])
        self.up2_1 = Resize(dim * 2, dim * 4, nn.PixelShuffle(2))
        self.decoder_level1 = seq(blocks[0], dim * 2, heads[0])
        self.refinement = seq(refinement, dim * 2, heads[0])
        self.output = nn.Conv2d(dim * 2, 3, 3, padding=1, bias=False)

    def forward(self, inp):
        e1 = self.encoder_level1(self.patch_embed.proj(inp))
        e2 = self.encoder_level2(self.down1_2.body(e1))
        e3 = self.encoder_level3(self.down2_3.body(e2))
        z = self.latent(self.down3_4.body(e3))
        d3 = self.decoder_level3(self.reduce_chan_level3(torch.cat([self.up4_3.body(z), e3], 1)))
        d2 = self.decoder_level2(self.reduce_chan_level2(torch.cat([self.up3_2.body(d3), e2], 1)))
        d1 = self.decoder_level1(torch.cat([self.up2_1.body(d2), e1], 1))
        return self.output(self.refinement(d1)) + inp
