"""Layer factories and tensor helpers shared by the LMDIR modules.

Conventions (mirrored exactly by the PyTorch export):
- activations NHWC; conv kernels HWIO; linear kernels (in, out);
- kernels name logical axes, never mesh axes: conv HWIO -> (None, None, 'embed', 'mlp'), linear
  (in, out) -> ('embed', 'mlp'); stacked (scanned) blocks add 'layers' in front. The rule table
  `train.axis_rules` maps them to mesh axes (by default 'mlp' -> 'fsdp', the rest replicated);
  biases and norms are unannotated (replicated, PartitionSpec());
- convs and dense layers are built with lax's operations; `models/backend.py` swaps in other
  kernels once, after the network is built (`model.kernels`);
- LayerNorm: over the channel (last) axis, eps 1e-5, with scale and bias, variance computed as
  mean((x - mean)^2) (no "fast variance" trick);
- GELU: exact erf form;
- pixel-unshuffle / pixel-shuffle follow torch.nn.PixelUnshuffle / PixelShuffle channel order
  (see `pixel_unshuffle`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmdir_jax import architecture
from lmdir_jax.axes import EMBED, MLP
from lmdir_jax.models.initializers import lecun_normal

LN_EPS = architecture.LN_EPS
default_kernel_init = lecun_normal


def compute_dtype(name: str) -> jnp.dtype:
    """The compute dtype named in the config ('float32' or 'bfloat16')."""
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"model.dtype must be 'float32' or 'bfloat16', got {name!r}")
    return jnp.dtype(name)


def conv(
    cin: int,
    cout: int,
    kernel: int,
    *,
    rngs: nnx.Rngs,
    dtype: jnp.dtype = jnp.float32,
    stride: int = 1,
    groups: int = 1,
    use_bias: bool = True,
    kernel_init=default_kernel_init,
) -> nnx.Conv:
    """A 2-D conv with torch-style symmetric padding k//2; HWIO kernel axes (-, -, embed, mlp)."""
    pad = kernel // 2
    return nnx.Conv(
        cin,
        cout,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        feature_group_count=groups,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nnx.with_partitioning(kernel_init, (None, None, EMBED, MLP)),
        rngs=rngs,
    )


def conv_parts(layer: nnx.Conv, xs: list[jax.Array]) -> list[jax.Array]:
    """`layer` (a bias-free 1x1 conv, or a depth-wise conv) applied in len(xs)-way channel groups.

    A 1x1 conv maps x (one input) to len(xs) equal output groups; a depth-wise conv maps input
    group i to output group i. Equal to splitting `layer(x)` along channels, but each group is its
    own matmul or depth-wise conv, so the gradient never concatenates full-size groups.
    """
    if layer.bias is not None:
        raise ValueError("conv_parts needs a conv without bias")
    kernel = layer.kernel[...]
    n = len(xs)
    cout = kernel.shape[-1] // n
    dn = jax.lax.conv_dimension_numbers(xs[0].shape, kernel.shape, ("NHWC", "HWIO", "NHWC"))
    pads = layer.padding
    outs = []
    for i in range(n):
        k = kernel[..., i * cout:(i + 1) * cout].astype(layer.dtype)
        x = xs[0] if layer.feature_group_count == 1 else xs[i]
        groups = 1 if layer.feature_group_count == 1 else cout
        outs.append(layer.conv_general_dilated(x.astype(layer.dtype), k, (1, 1), pads,
                                               dimension_numbers=dn, feature_group_count=groups))
    return outs


def linear(
    din: int,
    dout: int,
    *,
    rngs: nnx.Rngs,
    dtype: jnp.dtype = jnp.float32,
    use_bias: bool = True,
    kernel_init=default_kernel_init,
) -> nnx.Linear:
    """A dense layer; kernel (in, out) axes (embed, mlp)."""
    return nnx.Linear(
        din,
        dout,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nnx.with_partitioning(kernel_init, (EMBED, MLP)),
        rngs=rngs,
    )


def layer_norm(features: int, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32) -> nnx.LayerNorm:
    """LayerNorm over the last (channel) axis, eps 1e-5, exact two-pass variance."""
    return nnx.LayerNorm(
        features,
        epsilon=LN_EPS,
        dtype=dtype,
        param_dtype=jnp.float32,
        use_fast_variance=False,
        rngs=rngs,
    )


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, as torch.nn.GELU() with approximate='none'.

    Written with erf: `jax.nn.gelu(approximate=False)` uses erfc, whose gradient took twice as long
    on XLA:CPU (the values agree to 1e-6).
    """
    return 0.5 * x * (1 + jax.lax.erf(x * np.asarray(1 / math.sqrt(2), x.dtype)))


def pixel_unshuffle(x: jax.Array, r: int = 2) -> jax.Array:
    """(B, H, W, C) -> (B, H/r, W/r, C*r*r); output channel c*r*r + i*r + j holds x[r*y+i, r*x+j, c].

    Same order as torch.nn.PixelUnshuffle on NCHW.
    """
    b, h, w, c = x.shape
    x = x.reshape(b, h // r, r, w // r, r, c)
    x = x.transpose(0, 1, 3, 5, 2, 4)  # b, h/r, w/r, c, i, j
    return x.reshape(b, h // r, w // r, c * r * r)


def pixel_shuffle(x: jax.Array, r: int = 2) -> jax.Array:
    """(B, H, W, C*r*r) -> (B, H*r, W*r, C): the exact inverse of `pixel_unshuffle` (torch order)."""
    b, h, w, crr = x.shape
    c = crr // (r * r)
    x = x.reshape(b, h, w, c, r, r)
    x = x.transpose(0, 1, 4, 2, 5, 3)  # b, h, i, w, j, c
    return x.reshape(b, h * r, w * r, c)


def adaptive_avg_pool(x: jax.Array, size: int) -> jax.Array:
    """(B, H, W, C) -> (B, size, size, C) with torch.nn.AdaptiveAvgPool2d bins.

    Bin i along an axis of length n covers [floor(i*n/size), ceil((i+1)*n/size)).
    """

    def weights(n: int) -> jnp.ndarray:
        rows = []
        for i in range(size):
            lo = (i * n) // size
            hi = -((-(i + 1) * n) // size)
            row = [1.0 / (hi - lo) if lo <= k < hi else 0.0 for k in range(n)]
            rows.append(row)
        return jnp.asarray(rows, jnp.float32)

    wh = weights(x.shape[1])
    ww = weights(x.shape[2])
    return jnp.einsum("ih,bhwc,jw->bijc", wh, x.astype(jnp.float32), ww)
