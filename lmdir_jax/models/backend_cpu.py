"""XLA:CPU kernels for the LMDIR layers (`model.kernels = "cpu"`; "auto" picks them on CPUs).

The same mathematics as `jax.lax.conv_general_dilated` / `lax.dot_general`, written
in forms XLA's CPU backend runs fast (docs/benchmarks.md):
- depth-wise convolutions as sums of shifted products with a hand-written gradient (`depthwise`),
  whose output and input gradient are each computed once inside a conditional (`computed_once`);
- 1x1 convolutions and linear layers as 2-D matmuls with hand-written gradients (`matmul`);
- full convolutions with few output (`conv_output_shifts`) or input channels (`conv_im2col`) as
  matmuls.
`conv_general_dilated` and `dot_general` are drop-in replacements for the lax functions (anything
they have no fast form for is passed to lax). On GPUs and TPUs the plain lax operations (cuDNN,
...) are faster: `model.kernels = "xla"`. Parameters are initialised the same way for both
(`models/initializers.py`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

ROW_BLOCK = 4  # rows per step of the depth-wise kernel-gradient loop on large activations
ROW_BLOCK_MIN_SIZE = 1 << 20  # elements of the output gradient from which that loop is used
IM2COL_MAX_CIN = 4  # full convs with at most this many input channels run as one im2col matmul
# Full convs run as a matmul + shifted sum (`conv_output_shifts`) when kh*kw*cout <= cin, or when
# cout <= cin <= this: XLA's own conv is slow with few channels (with the shifted sum the quick-start
# step took 115 instead of 130 ms), but not at the paper network's 48-192 input channels (its step
# took 2.98 s with XLA's conv for the down-sampling convs, 3.32 s with the shifted sum).
SHIFTS_MAX_CIN = 32


def shifted_sum(xp: jax.Array, k: jax.Array) -> jax.Array:
    """VALID depth-wise correlation of padded NHWC `xp` with (kh, kw, 1, C) `k`, accumulated in
    float32, as a sum of kh*kw shifted products."""
    kh, kw = k.shape[:2]
    h, w = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
    out = None
    for i in range(kh):
        for j in range(kw):
            term = xp[:, i:i + h, j:j + w, :].astype(jnp.float32) * k[i, j, 0].astype(jnp.float32)
            out = term if out is None else out + term
    return out


def pad_hw(x: jax.Array, padding) -> jax.Array:
    """Zero-pad (negative: crop) the H and W axes of NHWC `x` by ((top, bottom), (left, right))."""
    (pt, pb), (pl, pr) = padding
    return jax.lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))


def computed_once(fn, *args):
    """fn(*args), computed once into its own buffer.

    XLA:CPU fuses a cheap producer into every consumer and recomputes it there: the nine shifted
    products of a depth-wise conv were computed again inside the transposing copies and gradient
    sums that read q, k and v, up to four times. Optimization barriers don't stop it (XLA:CPU
    removes them before fusion), but nothing is fused into or out of a conditional's branch, so fn
    runs as both branches of one, on a predicate read from the data so that it is not folded away.
    Level-1 blocks, forward + gradients: 469 -> 413 ms (docs/benchmarks.md).
    """
    probe = jnp.ravel(args[-1])[0]
    return jax.lax.cond(jnp.isfinite(probe), fn, fn, *args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def depthwise(x: jax.Array, k: jax.Array, padding) -> jax.Array:
    """Depth-wise correlation of NHWC `x` with (kh, kw, 1, C) `k` under `padding`, float32,
    computed once (`computed_once`)."""
    return computed_once(lambda x, k: shifted_sum(pad_hw(x, padding), k), x, k)


def _depthwise_fwd(x, k, padding):
    return depthwise(x, k, padding), (x, k)  # the unpadded input: no padded copy is kept


def _depthwise_bwd(padding, res, g):
    x, k = res
    kh, kw = k.shape[:2]
    b, h, w, c = g.shape
    (pt, pb), (pl, pr) = padding
    # The input gradient is the correlation of the gradient, padded the other way, with the flipped
    # kernel: one pass straight to x's shape, computed once.
    flip = ((kh - 1 - pt, kh - 1 - pb), (kw - 1 - pl, kw - 1 - pr))
    dx = computed_once(lambda g, k: shifted_sum(pad_hw(g, flip), k[::-1, ::-1]), g, k)
    xp = pad_hw(x, padding)
    g32 = g.astype(jnp.float32)
    if h % ROW_BLOCK == 0 and g.size >= ROW_BLOCK_MIN_SIZE:
        # Large activations: a loop over blocks of rows, all taps of a block in one pass, so each
        # block is read from cache kh*kw times (2.3-2.5x faster than the loop over taps at
        # (1, 128, 128, 254..510), even at 1M elements, slower below).
        def block(acc, r0):
            rows = jax.lax.dynamic_slice(xp, (0, r0, 0, 0), (b, ROW_BLOCK + kh - 1, w + kw - 1, c))
            gb = jax.lax.dynamic_slice(g32, (0, r0, 0, 0), (b, ROW_BLOCK, w, c))
            taps = [jnp.sum(rows[:, i:i + ROW_BLOCK, j:j + w].astype(jnp.float32) * gb,
                            axis=(1, 2)) for i in range(kh) for j in range(kw)]
            return acc + jnp.stack(taps), None

        dk = jax.lax.scan(block, jnp.zeros((kh * kw, b, c), jnp.float32),
                          jnp.arange(0, h, ROW_BLOCK))[0]
    else:
        offsets = jnp.array([(i, j) for i in range(kh) for j in range(kw)], jnp.int32)

        # One reduction per kernel tap, as a loop: XLA:CPU fuses the kh*kw unrolled reductions
        # over a whole activation into one slow multi-output loop (4x slower than the loop).
        def tap(carry, o):
            window = jax.lax.dynamic_slice(xp, (0, o[0], o[1], 0), (b, h, w, c))
            return carry, jnp.sum(window.astype(jnp.float32) * g32, axis=(1, 2))

        dk = jax.lax.scan(tap, None, offsets)[1]
    # The loops sum over rows and columns only; the batch is summed once, here: with the batch
    # sharded over devices, a sum over it inside a loop is one all-reduce per iteration (360 per
    # tiny-config step, most of a two-process step's time through gloo), here it is one.
    dk = jnp.sum(dk, axis=1)
    return dx.astype(x.dtype), dk.reshape(kh, kw, 1, c).astype(k.dtype)


depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x (..., cin) @ w (cin, cout), its gradients written as the two plain products.

    Autodiff's weight gradient is a transposed product that XLA:CPU rewrites with transposed
    operands: the output gradient was copied into a transposed layout, and everything computing it
    (often the residual stream's gradient through several blocks, 600 fused instructions) was
    recomputed in that copy, once per consumer. Level-3 blocks, forward + gradients: 591 -> 436 ms
    of ops; the paper step 3.80 -> 3.58 s (docs/benchmarks.md).
    """
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _matmul_fwd(x, w):
    return matmul(x, w), (x, w)


def _matmul_bwd(res, g):
    x, w = res
    dx = jax.lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())))
    dw = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]),
                             (((0,), (0,)), ((), ())))
    return dx.astype(x.dtype), dw.astype(w.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                       **kwargs):
    """`lax.dot_general` for the linear layers: the plain (..., cin) x (cin, cout) product is
    `matmul`; anything else is lax.dot_general."""
    (lhs_contract, rhs_contract), batch = dimension_numbers
    plain = (precision is None
             and preferred_element_type is None and kwargs.get("out_sharding") is None
             and rhs.ndim == 2 and tuple(lhs_contract) == (lhs.ndim - 1,)
             and tuple(rhs_contract) == (0,) and not any(batch))
    if plain:
        return matmul(lhs, rhs)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, **kwargs)


def conv_output_shifts(x, k, padding, **mm):
    """A full kh x kw conv with few output channels (the output conv; the quick-start network's
    down-sampling convs) as one matmul to kh*kw*cout channels followed by a sum of shifted slices:
    its gradients are matmuls too. Forward + gradients on XLA:CPU against `lax.conv_general_dilated`:
    6x faster at 128x128, 96 -> 3; 8.7x at 128x128, 8 -> 4.
    """
    kh, kw, cin, cout = k.shape
    b, h, w, _ = x.shape
    (pt, pb), (pl, pr) = padding
    taps = k.transpose(2, 0, 1, 3).reshape(cin, kh * kw * cout)  # (cin, (i, j, cout))
    z = jnp.matmul(x.reshape(b * h * w, cin), taps, **mm).reshape(b, h, w, kh * kw * cout)
    zp = pad_hw(z, padding)
    ho, wo = h + pt + pb - kh + 1, w + pl + pr - kw + 1
    out = None
    for i in range(kh):
        for j in range(kw):
            t = (i * kw + j) * cout
            term = zp[:, i:i + ho, j:j + wo, t:t + cout]
            out = term if out is None else out + term
    return out


def conv_im2col(x, k, padding, **mm):
    """A full kh x kw conv with few input channels (the RGB input conv) as one matmul over the
    kh*kw shifted copies of the padded input (1.4x faster on XLA:CPU at 128x128, 3 -> 48)."""
    kh, kw, cin, cout = k.shape
    xp = pad_hw(x, padding)
    b, hp, wp, _ = xp.shape
    ho, wo = hp - kh + 1, wp - kw + 1
    cols = jnp.concatenate([xp[:, i:i + ho, j:j + wo] for i in range(kh) for j in range(kw)], -1)
    y = jnp.matmul(cols.reshape(b * ho * wo, kh * kw * cin), k.reshape(kh * kw * cin, cout), **mm)
    return y.reshape(b, ho, wo, cout)


def conv_general_dilated(lhs, rhs, window_strides, padding, *, lhs_dilation=None,
                          rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                          **kwargs):
    """`lax.conv_general_dilated` with fast forms of the two convolutions Restormer is made of.

    XLA's CPU backend runs depth-wise (feature_group_count == channels) convolutions, and above all
    their gradients, 10-30x slower than sums of shifted products, and the gradients of 1x1
    convolutions 3-4x slower than the same product written as one 2-D matmul (`matmul`,
    docs/benchmarks.md).
    Both rewrites give the convolution's result (float32 accumulation for depth-wise) and fuse well
    on every backend, but on GPUs cuDNN's convolutions are faster (the paper training step took
    317 ms with the rewrites and 175 ms without on an H100), so they are used with
    `model.kernels = "cpu"` only. Full
    convs with few output channels (the output conv, small down-sampling convs) or few input
    channels (the RGB input conv) become matmuls too (`conv_output_shifts`, `conv_im2col`).
    Anything else (strides, dilation, other layouts, other full convs) goes to
    `lax.conv_general_dilated`.
    """
    plain = (
        lhs.ndim == 4 and rhs.ndim == 4
        and tuple(window_strides) == (1, 1) and not isinstance(padding, str)
        and all(d in (None, 1, (1, 1)) for d in (lhs_dilation, rhs_dilation))
        and dimension_numbers is not None
        and tuple(dimension_numbers.lhs_spec) == (0, 3, 1, 2)
        and tuple(dimension_numbers.rhs_spec) == (3, 2, 0, 1)
    )
    is_depthwise = plain and rhs.shape[2] == 1 and feature_group_count == lhs.shape[-1] == rhs.shape[-1]
    is_pointwise = (plain and rhs.shape[:2] == (1, 1) and feature_group_count == 1
                 and all(tuple(p) == (0, 0) for p in padding))
    is_full = plain and feature_group_count == 1 and rhs.shape[0] * rhs.shape[1] > 1
    out_dtype = jnp.result_type(lhs.dtype, rhs.dtype)
    mm = dict(precision=kwargs.get("precision"),
              preferred_element_type=kwargs.get("preferred_element_type"))
    if is_full:
        kh, kw, cin, cout = rhs.shape
        if kh * kw * cout <= cin or cout <= cin <= SHIFTS_MAX_CIN:
            return conv_output_shifts(lhs, rhs, padding, **mm)
        if cin <= IM2COL_MAX_CIN:
            return conv_im2col(lhs, rhs, padding, **mm)
    if is_depthwise:
        pads = tuple(tuple(int(p) for p in pair) for pair in padding)
        return depthwise(lhs, rhs, pads).astype(out_dtype)
    if is_pointwise:
        b, h, w, cin = lhs.shape
        if all(v is None for v in mm.values()):
            return matmul(lhs, rhs.reshape(cin, rhs.shape[-1]))
        y = jnp.matmul(lhs.reshape(b * h * w, cin), rhs.reshape(cin, rhs.shape[-1]), **mm)
        return y.reshape(b, h, w, rhs.shape[-1])
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count, **kwargs)


