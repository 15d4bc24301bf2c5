"""The model at scale: scanned blocks and their conversion, rematerialisation, kernel choice
(model.kernels), logical axis rules and sharded initialisation."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from lmdir_jax.config import load_config
from lmdir_jax.errors import UsageError
from lmdir_jax.models import Priors, build_model
from lmdir_jax.models.stacking import blocks_layout, stack_blocks, unstack_blocks

LQ = jax.random.uniform(jax.random.key(0), (2, 48, 40, 3))
GT = jax.random.uniform(jax.random.key(1), (2, 48, 40, 3))


def model_config(**changes):
    c = load_config("tiny").model.copy_and_resolve_references()
    c.blocks = (2, 1, 1, 1)  # level 1 really loops
    c.scan_unroll = "loop"  # as on accelerators ('auto' unrolls on CPUs)
    c.zero_init_output = False
    c.update(changes)
    return c


def priors(c):
    k = jax.random.split(jax.random.key(2), 3)
    return Priors(
        deg_states=jax.random.normal(k[0], (2, 3, c.text_dim)), deg_mask=jnp.ones((2, 3), bool),
        scene_states=jax.random.normal(k[1], (2, 3, c.text_dim)),
        scene_mask=jnp.array([[True, True, False], [False] * 3]),
        reference=jax.random.uniform(k[2], (2, 16, 16, 3)), has_reference=jnp.array([True, False]),
    )


def loss_and_grads(model, c):
    """(loss, output, gradient pure dict in the unscanned layout, XLA temp bytes): one compile."""
    p = priors(c)

    def run(m):
        def loss(m):
            out = m(LQ, p)
            return jnp.mean(jnp.square(out - GT)), out

        (value, out), g = nnx.value_and_grad(loss, has_aux=True)(m)
        return value, out, g

    graphdef, state = nnx.split(model)
    compiled = jax.jit(lambda s: run(nnx.merge(graphdef, s))).lower(state).compile()
    value, out, g = compiled(state)
    temp = compiled.memory_analysis().temp_size_in_bytes
    return float(value), np.asarray(out), unstack_blocks(nnx.to_pure_dict(g)), temp


def with_params(model, pure_unscanned):
    """`model` with the parameters of a pure dict (unscanned layout), in the model's layout."""
    state = nnx.state(model)
    scanned = blocks_layout(nnx.to_pure_dict(state)) == "scanned"
    nnx.replace_by_pure_dict(state, stack_blocks(pure_unscanned) if scanned else pure_unscanned)
    nnx.update(model, state)
    return model


@pytest.fixture(scope="module")
def reference():
    """Scanned, XLA:CPU kernels, no remat: parameters (unscanned layout) and loss/output/grads."""
    c = model_config()
    model = build_model(c, seed=3)
    params = unstack_blocks(nnx.to_pure_dict(nnx.state(model)))
    return params, loss_and_grads(model, c)


def assert_same(got, want, tol):
    """Same loss, output and gradients (float32 sums in another order: tol relative to each
    array's largest magnitude)."""
    np.testing.assert_allclose(got[0], want[0], rtol=tol)
    np.testing.assert_allclose(got[1], want[1], atol=tol)
    flat_g, flat_w = jax.tree.leaves(got[2]), jax.tree.leaves(want[2])
    assert len(flat_g) == len(flat_w) > 100
    for a, b in zip(flat_g, flat_w, strict=True):
        np.testing.assert_allclose(a, b, atol=tol * max(1.0, float(np.abs(b).max())), rtol=tol)
    assert max(float(np.abs(a).max()) for a in flat_w) > 1e-3  # gradients are not all zero


def test_scanned_and_unscanned_layouts_convert_and_agree(reference):
    """A scanned model's parameters, unstacked into an unscanned model, give the same output and
    gradients; stacking them back gives the scanned parameters exactly."""
    params, want = reference
    c = model_config(scan_blocks=False)
    unscanned = with_params(build_model(c, seed=5), params)
    pure = nnx.to_pure_dict(nnx.state(unscanned))
    assert blocks_layout(pure) == "unscanned" and set(pure["encoders"][0]["blocks"]) == {0, 1}
    assert_same(loss_and_grads(unscanned, c), want, 1e-4)
    scanned_again = stack_blocks(pure)
    assert blocks_layout(scanned_again) == "scanned"
    assert scanned_again["encoders"][0]["blocks"]["attn"]["qkv"]["kernel"].shape[0] == 2
    orig = stack_blocks(params)
    for a, b in zip(jax.tree.leaves(scanned_again), jax.tree.leaves(orig), strict=True):
        np.testing.assert_array_equal(a, b)


def test_same_seed_same_network_in_either_layout():
    """Built eagerly, the scanned layout draws its blocks one after another like the unscanned one:
    the same seed gives the same parameters (stacked), and the logical axis 'layers' on them."""
    scanned = build_model(model_config(), seed=7)
    unscanned = build_model(model_config(scan_blocks=False), seed=7)
    a = nnx.to_pure_dict(nnx.state(scanned))
    b = stack_blocks(nnx.to_pure_dict(nnx.state(unscanned)))
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    kernel = scanned.encoders[0].blocks.attn.qkv.kernel
    assert kernel.shape[0] == 2 and kernel.get_metadata()["out_sharding"][0] == "layers"
    assert not np.array_equal(a["encoders"][0]["blocks"]["attn"]["qkv"]["kernel"][0],
                              a["encoders"][0]["blocks"]["attn"]["qkv"]["kernel"][1])


def test_unrolled_scan_same_parameters_values_and_gradients(reference):
    """scan_unroll='unrolled' (what 'auto' picks on CPUs) compiles the same stacked parameters
    without the loop: the same loss, output and gradients as the loop."""
    from lmdir_jax.models.backend import resolve_scan_unroll

    params, want = reference
    assert resolve_scan_unroll("auto") is (jax.default_backend() == "cpu")
    assert resolve_scan_unroll("loop") is False and resolve_scan_unroll("unrolled") is True
    c = model_config(scan_unroll="unrolled")
    model = with_params(build_model(c, seed=5), params)
    assert model.encoders[0].unroll and model.encoders[0].scanned
    pure = nnx.to_pure_dict(nnx.state(model))
    assert pure["encoders"][0]["blocks"]["attn"]["qkv"]["kernel"].shape[0] == 2  # still stacked
    assert_same(loss_and_grads(model, c), want, 1e-4)
    with pytest.raises(ValueError, match="model.scan_unroll"):
        build_model(model_config(scan_unroll="yes"), seed=0)


def test_remat_block_same_values_and_gradients_less_temp_memory(reference):
    """remat='block': the same loss and gradients, and XLA's memory analysis of the compiled
    gradient needs less temporary memory."""
    params, want = reference
    c = model_config(remat="block")
    model = with_params(build_model(c, seed=5), params)
    got = loss_and_grads(model, c)
    assert_same(got, want, 1e-4)
    assert got[3] < 0.8 * want[3], (got[3], want[3])
    with pytest.raises(ValueError, match="model.remat"):
        build_model(model_config(remat="all"), seed=0)


def test_kernels_draw_the_same_parameters_and_agree_in_value_and_gradients(reference):
    """The XLA:CPU kernels (models/backend_cpu.py) and lax's convolutions and products: a seed
    draws exactly the same parameters for both, which give the same output and gradients."""
    from lmdir_jax.models.backend import kernels_of

    params, want = reference
    c = model_config(kernels="xla")
    model = build_model(c, seed=3)
    assert model.embed.conv_general_dilated is jax.lax.conv_general_dilated
    assert model.prompt.mlp_in.dot_general is jax.lax.dot_general
    cpu = build_model(model_config(kernels="cpu"), seed=3)
    assert cpu.embed.conv_general_dilated is not jax.lax.conv_general_dilated
    assert cpu.prompt.mlp_in.dot_general is not jax.lax.dot_general
    drawn = [nnx.to_flat_state(nnx.state(m)) for m in (model, cpu)]
    assert [path for path, _ in drawn[0]] == [path for path, _ in drawn[1]]
    for (path, a), (_, b) in zip(*drawn, strict=True):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()),
                                      err_msg=str(path))
    assert_same(loss_and_grads(with_params(model, params), c), want, 5e-4)
    with pytest.raises(ValueError, match="model.kernels"):
        build_model(model_config(kernels="gpu"), seed=0)
    assert kernels_of(ml_collections.ConfigDict({"conv_impl": "xla"})) == "xla"  # a saved run


def test_export_gives_the_same_torch_state_dict_either_way(reference, tmp_path):
    from safetensors.numpy import load_file

    from lmdir_jax.export.convert import WEIGHTS_FILE, export_torch

    params, _ = reference
    dicts = []
    for scan in (True, False):
        config = load_config("tiny")
        config.model.update(model_config(scan_blocks=scan))
        model = with_params(build_model(config.model, seed=5), params)
        out = export_torch(model, tmp_path / f"scan{scan}", config=config)
        dicts.append(load_file(str(out / WEIGHTS_FILE)))
    assert set(dicts[0]) == set(dicts[1])
    assert "encoders.0.blocks.1.attn.qkv.weight" in dicts[0]
    for k in dicts[0]:
        np.testing.assert_array_equal(dicts[0][k], dicts[1][k])


@pytest.fixture(scope="module")
def one_device_state():
    from lmdir_jax.train import mesh as mesh_lib
    from lmdir_jax.train import state as state_lib

    config = load_config("tiny")
    mesh1 = mesh_lib.make_mesh(1, 1, jax.devices()[:1])
    return state_lib.init_state(config, state_lib.make_setup(config, mesh1), in_jit=True)


def test_sharded_init_in_jit_follows_axis_rules_whatever_the_mesh(one_device_state):
    """init_state creates the state inside jit with its shardings: on a (data=4, fsdp=2) mesh the
    'mlp' axes are split over fsdp, and the values are those of a 1-device creation and of an
    eager build: one seed, one set of parameters, however they are created."""
    from lmdir_jax.train import mesh as mesh_lib
    from lmdir_jax.train import state as state_lib

    config = load_config("tiny")
    mesh = mesh_lib.make_mesh(4, 2)
    setup = state_lib.make_setup(config, mesh)
    state = state_lib.init_state(config, setup, in_jit=True)
    kernel = state["model"]["latent"]["blocks"]["ffn"]["inp"]["kernel"][...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, None, None, "fsdp")
    assert len(kernel.addressable_shards) == 8
    assert kernel.addressable_shards[0].data.shape[-1] == kernel.shape[-1] // 2
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(one_device_state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert float(jnp.std(kernel)) > 0.01  # drawn, not zeros
    # On CPUs the default builds eagerly and places (what an accelerator creates inside jit is the
    # in_jit=True state above): the same sharding and exactly the same values, on either mesh.
    eager = state_lib.init_state(config, setup)
    mesh1 = mesh_lib.make_mesh(1, 1, jax.devices()[:1])
    eager1 = state_lib.init_state(config, state_lib.make_setup(config, mesh1))
    ek = eager["model"]["latent"]["blocks"]["ffn"]["inp"]["kernel"][...]
    assert ek.sharding.spec == kernel.sharding.spec
    for built in (eager, eager1):
        for a, b in zip(jax.tree.leaves(built), jax.tree.leaves(one_device_state), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # train.state_creation picks the path: "jit" is the sharded program above, "auto" on CPUs and
    # with one process is eager; anything else is one line (UsageError).
    assert state_lib.creation_in_jit(config, mesh) is False
    config.train.state_creation = "jit"
    assert state_lib.creation_in_jit(config, mesh) is True
    config.train.state_creation = "eager"
    assert state_lib.creation_in_jit(config, mesh) is False
    config.train.state_creation = "sharded"
    with pytest.raises(UsageError, match="train.state_creation must be one of auto, jit, eager"):
        state_lib.init_state(config, setup)
    config.train.state_creation = "auto"
    # Another rule table: 'mlp' replicated, 'embed' (kernel inputs) split over fsdp instead.
    config.train.axis_rules = (("layers", None), ("embed", "fsdp"), ("mlp", None), ("heads", None))
    spec = state_lib.make_setup(config, mesh).shardings["model"]["prompt"]["mlp_in"]["kernel"]
    assert spec.get_value().spec == jax.sharding.PartitionSpec("fsdp", None)


@pytest.mark.parametrize("rules, message", [
    ((("layers", None), ("embed", None), ("heads", None)), "no rule for the logical axis 'mlp'"),
    ((("layers", None), ("embed", None), ("mlp", "tensor"), ("heads", None)), "not a mesh axis"),
])
def test_bad_axis_rules_are_one_clear_line(rules, message):
    from lmdir_jax.train import mesh as mesh_lib
    from lmdir_jax.train import state as state_lib

    config = load_config("tiny")
    config.train.axis_rules = rules
    with pytest.raises(UsageError, match=message):
        state_lib.make_setup(config, mesh_lib.make_mesh(1, 1, jax.devices()[:1]))


def test_scanned_checkpoint_needs_the_conversion(one_device_state, tmp_path, capsys):
    """A scanned run resumed with scan_blocks=False is refused in one line; `lmdir model convert`
    writes the unscanned run, which restores, and converts back to the same parameters."""
    from lmdir_jax.cli import main
    from lmdir_jax.config import config_to_json
    from lmdir_jax.train import checkpoints as ckpt
    from lmdir_jax.train import mesh as mesh_lib
    from lmdir_jax.train import state as state_lib

    config = load_config("tiny")
    mesh = mesh_lib.make_mesh(1, 1, jax.devices()[:1])
    state = one_device_state
    wd = tmp_path / "scanned"
    wd.mkdir()
    (wd / "config.json").write_text(config_to_json(config))
    manager = ckpt.make_manager(wd, async_save=False)
    ckpt.save(manager, 3, state)
    manager.wait_until_finished()
    manager.close()

    unscanned = load_config("tiny", ["config.model.scan_blocks=False"])
    abstract = state_lib.make_setup(unscanned, mesh).abstract
    manager = ckpt.make_manager(wd, async_save=False)
    with pytest.raises(UsageError, match="has scanned blocks but model.scan_blocks=False"):
        ckpt.restore_latest(manager, abstract)
    manager.close()
    assert (wd / "checkpoints" / "3").is_dir()  # nothing moved aside

    out = tmp_path / "unscanned"
    assert main(["model", "convert", "--checkpoint", str(wd), "--output", str(out),
                 "--scan-blocks", "false"]) == 0
    assert json.loads((out / "config.json").read_text())["model"]["scan_blocks"] is False
    manager = ckpt.make_manager(out, async_save=False)
    step, got = ckpt.restore_latest(manager, abstract)
    manager.close()
    assert step == 3
    back = stack_blocks(nnx.to_pure_dict(got["model"]))
    want = nnx.to_pure_dict(state["model"])
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert main(["model", "convert", "--checkpoint", str(wd), "--output", str(out),
                 "--scan-blocks", "true"]) == 2
    assert "not an empty folder" in capsys.readouterr().err
