"""LMDIR network: shapes, identity at init, gradients, prior masking, jit/eager, sizes, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmdir_jax.config import load_config
from lmdir_jax.models import LMDIR, Priors, build_model, count_params
from lmdir_jax.models.layers import adaptive_avg_pool, pixel_shuffle, pixel_unshuffle

TOP_LEVEL = ("embed", "encoders", "downs", "latent", "ups", "reduces", "decoders", "refinement",
             "output", "prompt", "reference")


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny").model


@pytest.fixture(scope="module")
def model_nz(cfg):
    """Tiny model whose output conv is not zero, so every prior can change the output."""
    c = cfg.copy_and_resolve_references()
    c.zero_init_output = False
    return build_model(c, seed=1)


@jax.jit
def forward(model, lq, priors):
    return model(lq, priors)


def full_priors(cfg, b=2, t=5, r=16, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    d = cfg.text_dim
    return Priors(
        deg_states=jax.random.normal(ks[0], (b, t, d)),
        deg_mask=jnp.array([[True, True, True, False, False], [False] * 5])[:b, :t],
        scene_states=jax.random.normal(ks[1], (b, t, d)),
        scene_mask=jnp.array([[False] * 5, [True, False, True, True, False]])[:b, :t],
        reference=jax.random.uniform(ks[2], (b, r, r, 3)),
        has_reference=jnp.array([True, False])[:b],
    )


BF16_REL_TOL = 5e-2  # ||bfloat16 - float32|| / ||float32|| of a forward pass
LQ_SHAPE = (2, 97, 131, 3)  # odd sizes; every forward test uses this shape so jit compiles once


def lq_batch(seed):
    return jax.random.uniform(jax.random.key(seed), LQ_SHAPE)


def test_odd_size_shape_and_zero_init_identity(cfg):
    model = build_model(cfg, seed=0)
    lq = lq_batch(3)
    out = forward(model, lq, full_priors(cfg))
    assert out.shape == LQ_SHAPE
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), np.asarray(lq))
    empty = Priors.empty(2, cfg.text_dim, text_len=5, ref_size=16)
    np.testing.assert_array_equal(np.asarray(forward(model, lq, empty)), np.asarray(lq))


def test_gradients_reach_every_component(cfg, model_nz):
    lq = jax.random.uniform(jax.random.key(4), (2, 16, 16, 3))
    gt = jax.random.uniform(jax.random.key(5), (2, 16, 16, 3))
    priors = full_priors(cfg).replace(has_reference=jnp.array([True, True]))

    @jax.jit
    def grads(model):
        return nnx.grad(lambda m: jnp.mean(jnp.abs(m(lq, priors) - gt)))(model)

    g = grads(model_nz)
    for name in TOP_LEVEL:
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(getattr(g, name))))
        assert float(norm) > 0, name
    # conditioning sub-modules of a CATB+RTB level get gradient too (scanned: stacked blocks)
    blk = g.latent.blocks
    for sub in (blk.modulation, blk.content_attn, blk.ref_attn):
        assert float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(sub))) > 0


def test_masked_priors_do_not_influence_output(cfg, model_nz):
    priors = full_priors(cfg)
    lq = lq_batch(6)
    base = forward(model_nz, lq, priors)

    def scramble(x, mask, key):
        noise = 1e3 * jax.random.normal(key, x.shape)
        return jnp.where(mask, x, noise)

    ks = jax.random.split(jax.random.key(7), 3)
    changed = priors.replace(
        deg_states=scramble(priors.deg_states, priors.deg_mask[..., None], ks[0]),
        scene_states=scramble(priors.scene_states, priors.scene_mask[..., None], ks[1]),
        reference=scramble(priors.reference, priors.has_reference[:, None, None, None], ks[2]),
    )
    np.testing.assert_array_equal(np.asarray(forward(model_nz, lq, changed)), np.asarray(base))
    # real tokens do matter
    real = priors.replace(deg_states=priors.deg_states + 1.0)
    assert not np.allclose(np.asarray(forward(model_nz, lq, real))[0], np.asarray(base)[0])


def test_reference_presence_changes_output(cfg, model_nz):
    priors = full_priors(cfg).replace(has_reference=jnp.array([True, True]))
    lq = lq_batch(8)
    with_ref = np.asarray(forward(model_nz, lq, priors))
    without = np.asarray(forward(model_nz, lq, priors.replace(has_reference=jnp.array([True, False]))))
    np.testing.assert_array_equal(with_ref[0], without[0])
    assert np.abs(with_ref[1] - without[1]).max() > 1e-6


def test_jit_and_eager_agree(cfg, model_nz):
    # Eager dispatch compiles every primitive separately, so compare on one conditioned block
    # (DATB + CATB + RTB, the latent level) rather than on the whole network.
    priors = full_priors(cfg).replace(has_reference=jnp.array([True, True]))
    cond = jax.jit(lambda m, p: m.conditions(p))(model_nz, priors)
    block = model_nz.latent.block(0)
    x = jax.random.normal(jax.random.key(9), (2, 3, 5, block.norm1.num_features))
    jitted = np.asarray(jax.jit(lambda b, x, c: b(x, c))(block, x, cond))
    eager = np.asarray(block(x, cond))
    np.testing.assert_allclose(eager, jitted, atol=1e-5, rtol=1e-5)
    assert np.abs(eager - np.asarray(x)).max() > 1e-4


def test_bfloat16_compute_float32_params_and_output(cfg):
    c = cfg.copy_and_resolve_references()
    c.dtype = "bfloat16"
    c.zero_init_output = False
    model = build_model(c, seed=1)
    dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))}
    assert dtypes == {jnp.dtype(jnp.float32)}
    out = forward(model, lq_batch(10), full_priors(cfg))
    assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
    # the same parameters computed in float32: bf16 keeps ~3 significant digits per op; on this
    # random (non-identity) network the relative L2 error is 2.0e-2 (outputs span about -8..10)
    c32 = c.copy_and_resolve_references()
    c32.dtype = "float32"
    model32 = build_model(c32, seed=1)
    nnx.update(model32, nnx.state(model, nnx.Param))
    ref = forward(model32, lq_batch(10), full_priors(cfg))
    rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    assert 0 < rel < BF16_REL_TOL, rel  # not the float32 path, and close to it


def test_tiny_parameter_count(cfg):
    model = build_model(cfg, seed=0)
    counts = count_params(model)
    assert counts["total"] < 100_000
    # the parts add up to every parameter array of the model, counted independently
    assert sum(v for k, v in counts.items() if k != "total") == counts["total"] == sum(
        int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert all(v > 0 for v in counts.values())


def test_parameters_name_logical_axes_mapped_by_rules(cfg):
    from lmdir_jax.train.config import DEFAULT_AXIS_RULES
    from lmdir_jax.train.mesh import logical_specs

    model = build_model(cfg, seed=0)
    params = nnx.state(model, nnx.Param)
    flat = dict(nnx.to_flat_state(nnx.get_partition_spec(params)))
    assert tuple(flat[("embed", "kernel")].get_value()) == (None, None, "embed", "mlp")
    assert tuple(flat[("latent", "blocks", "attn", "temperature")].get_value()) == ("layers", "heads")
    assert tuple(flat[("latent", "blocks", "ffn", "dw", "kernel")].get_value()) == (
        "layers", None, None, "embed", "mlp")
    mapped = dict(nnx.to_flat_state(logical_specs(params, DEFAULT_AXIS_RULES)))
    assert tuple(mapped[("embed", "kernel")].get_value()) == (None, None, None, "fsdp")
    assert tuple(mapped[("prompt", "mlp_in", "kernel")].get_value()) == (None, "fsdp")
    assert tuple(mapped[("latent", "blocks", "attn", "temperature")].get_value()) == (None, None)
    leaves = jax.tree.leaves(mapped, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert all(set(s) <= {None, "fsdp"} for s in leaves)


def test_model_rejects_bad_config(cfg):
    c = cfg.copy_and_resolve_references()
    c.ref_tokens = 5
    with pytest.raises(ValueError, match="perfect square"):
        LMDIR(c, rngs=nnx.Rngs(0))


def test_pixel_unshuffle_order_matches_torch_convention():
    x = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
    y = pixel_unshuffle(x, 2)
    assert y.shape == (2, 2, 3, 12)
    for c in range(3):
        for i in range(2):
            for j in range(2):
                assert y[1, 1, 2, c * 4 + i * 2 + j] == x[1, 2 + i, 4 + j, c]
    np.testing.assert_array_equal(np.asarray(pixel_shuffle(y, 2)), np.asarray(x))


def test_adaptive_avg_pool_bins():
    x = jnp.arange(5 * 7, dtype=jnp.float32).reshape(1, 5, 7, 1)
    y = adaptive_avg_pool(x, 3)
    xn = np.asarray(x)[0, :, :, 0]
    # torch bins for n=5, s=3: [0,2) [1,4) [3,5); n=7: [0,3) [2,5) [4,7)
    assert float(y[0, 1, 2, 0]) == pytest.approx(xn[1:4, 4:7].mean())
    assert float(y[0, 0, 0, 0]) == pytest.approx(xn[0:2, 0:3].mean())


@pytest.mark.parametrize("padding", [((1, 1), (1, 1)), ((0, 2), (2, 0))])
@pytest.mark.parametrize("row_blocks", [False, True])
def test_fast_convs_match_lax_conv_and_its_gradients(padding, row_blocks, monkeypatch):
    """The shifted-sum depth-wise conv and the matmul 1x1 conv (fast on XLA:CPU) are the lax
    convolutions, gradients too; the depth-wise kernel gradient both as a loop over taps and as
    the loop over blocks of rows that large activations take."""
    from lmdir_jax.models import backend_cpu
    from lmdir_jax.models.backend_cpu import conv_general_dilated as _conv_general_dilated

    if row_blocks:
        monkeypatch.setattr(backend_cpu, "ROW_BLOCK_MIN_SIZE", 0)
    c = 12
    x = jax.random.normal(jax.random.key(0), (2, 12 if row_blocks else 9, 11, c))
    k = jax.random.normal(jax.random.key(1), (3, 3, 1, c))
    dn = jax.lax.conv_dimension_numbers(x.shape, k.shape, ("NHWC", "HWIO", "NHWC"))

    def loss(fn):
        return lambda x, k: jnp.sum(jnp.sin(fn(x, k, (1, 1), padding, dimension_numbers=dn,
                                                feature_group_count=c)))

    ref = jax.value_and_grad(loss(jax.lax.conv_general_dilated), argnums=(0, 1))(x, k)
    got = jax.jit(jax.value_and_grad(loss(_conv_general_dilated), argnums=(0, 1)))(x, k)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
    for a, b in zip(got[1], ref[1], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)
    # Full 3x3 convs (no more output than input channels: output shifts; few input channels:
    # im2col; else the plain lax path) and a 1x1 conv (a 2-D matmul), with gradients.
    for shape, pad in [((3, 3, c, 4), padding), ((3, 3, c, c), padding), ((3, 3, c, 1), padding),
                       ((3, 3, 3, 5), padding), ((3, 3, 6, 8), padding),
                       ((1, 1, c, 5), ((0, 0), (0, 0)))]:
        xs = x[..., :shape[2]]
        k2 = jax.random.normal(jax.random.key(2), shape)
        dn2 = jax.lax.conv_dimension_numbers(xs.shape, k2.shape, ("NHWC", "HWIO", "NHWC"))

        def loss2(fn, pad=pad, dn2=dn2):
            return lambda x, k: jnp.sum(jnp.sin(fn(x, k, (1, 1), pad, dimension_numbers=dn2)))

        ref = jax.value_and_grad(loss2(jax.lax.conv_general_dilated), argnums=(0, 1))(xs, k2)
        got = jax.jit(jax.value_and_grad(loss2(_conv_general_dilated), argnums=(0, 1)))(xs, k2)
        np.testing.assert_allclose(got[0], ref[0], rtol=1e-4)
        for a, b in zip(got[1], ref[1], strict=True):
            np.testing.assert_allclose(a, b, atol=1e-3, rtol=1e-4)


def _while_bodies(hlo: str) -> list[str]:
    """The text of each computation that is the body of a while loop in HLO text."""
    import re

    names = set(re.findall(r"body=%?([\w.\-]+)", hlo))
    comps = re.split(r"\n(?=\S)", hlo)  # a computation starts at column 0
    return [c for c in comps if (m := re.match(r"%?([\w.\-]+) ", c)) and m.group(1) in names]


@pytest.mark.parametrize("row_blocks", [False, True])
def test_depthwise_kernel_gradient_sums_a_sharded_batch_once(row_blocks, monkeypatch):
    """With the batch sharded over devices, the depth-wise kernel gradient is all-reduced once,
    after its loop over taps (or row blocks), not once per iteration: through gloo across
    processes each all-reduce costs milliseconds (360 of them took 3.3 s of a tiny-config step)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from lmdir_jax.models import backend_cpu

    if row_blocks:
        monkeypatch.setattr(backend_cpu, "ROW_BLOCK_MIN_SIZE", 0)
    mesh = jax.make_mesh((8,), ("data",))
    x = jax.device_put(jax.random.normal(jax.random.key(0), (8, 8, 6, 4)),
                       NamedSharding(mesh, P("data")))
    k = jax.random.normal(jax.random.key(1), (3, 3, 1, 4))

    def loss(k, x):
        return jnp.sum(jnp.sin(backend_cpu.depthwise(x, k, ((1, 1), (1, 1)))))

    grad = jax.jit(jax.grad(loss))
    hlo = grad.lower(k, x).compile().as_text()
    bodies = _while_bodies(hlo)
    assert bodies, "the kernel gradient is a loop"
    assert not any("all-reduce" in b for b in bodies)
    assert "all-reduce" in hlo  # the batch is still summed across devices, once
    want = jax.grad(loss)(k, np.asarray(x))
    np.testing.assert_allclose(grad(k, x), want, rtol=1e-5, atol=1e-5)


def test_dense_matmul_matches_dot_general_and_its_gradients():
    """Linear layers' product with hand-written gradients (`backend_cpu.matmul`, fast on XLA:CPU)
    is lax.dot_general, gradients too, for (N, C) and (B, N, C) inputs; anything else (batch dims,
    another precision) is passed to lax.dot_general unchanged."""
    from lmdir_jax.models.backend_cpu import dot_general as _dense_dot_general

    w = jax.random.normal(jax.random.key(1), (6, 5))
    for shape in [(7, 6), (2, 7, 6)]:
        x = jax.random.normal(jax.random.key(0), shape)
        dims = (((x.ndim - 1,), (0,)), ((), ()))

        def loss(fn, dims=dims):
            return lambda u, v: jnp.sum(jnp.sin(fn(u, v, dims)))

        ref = jax.value_and_grad(loss(jax.lax.dot_general), argnums=(0, 1))(x, w)
        got = jax.jit(jax.value_and_grad(loss(_dense_dot_general), argnums=(0, 1)))(x, w)
        np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
        for a, b in zip(got[1], ref[1], strict=True):
            assert a.shape == b.shape
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    xb = jax.random.normal(jax.random.key(2), (3, 4, 6))
    wb = jax.random.normal(jax.random.key(3), (3, 6, 2))
    batched = (((2,), (1,)), ((0,), (0,)))
    np.testing.assert_allclose(_dense_dot_general(xb, wb, batched),
                               jax.lax.dot_general(xb, wb, batched), rtol=1e-6)
    y = _dense_dot_general(x, w, dims, preferred_element_type=jnp.float32)
    np.testing.assert_allclose(y, jax.lax.dot_general(x, w, dims), rtol=1e-6)


def test_gelu_is_the_exact_gelu():
    """`layers.gelu` (erf form, fast on XLA:CPU) equals jax.nn.gelu(approximate=False), gradient
    too."""
    from lmdir_jax.models.layers import gelu

    x = jnp.linspace(-6.0, 6.0, 1001)
    np.testing.assert_allclose(gelu(x), jax.nn.gelu(x, approximate=False), atol=1e-6)
    np.testing.assert_allclose(jax.vmap(jax.grad(gelu))(x),
                               jax.vmap(jax.grad(lambda t: jax.nn.gelu(t, approximate=False)))(x),
                               atol=1e-5)
