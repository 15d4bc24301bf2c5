"""Every config in configs/ loads and builds its network, abstractly (shapes only, nothing drawn)."""

from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
import restore_fixtures
from flax import nnx

from lmdir_jax.config import load_config
from lmdir_jax.models import Priors, build_model, count_params
from lmdir_jax.priors.clip import load_clip
from lmdir_jax.priors.controller import Controller

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.py"))
CONTROLLER_CONFIGS = {"controller"}  # their network is the DA-CLIP controller of a CLIP, not an LMDIR

tiny_clip = restore_fixtures.tiny_clip  # shared session fixture


def test_the_config_folder_is_found():
    assert {"tiny", "quickstart", "paper", "restormer", "three_task_bsds", "controller"} <= set(CONFIGS)


@pytest.mark.parametrize("name", sorted(set(CONFIGS) - CONTROLLER_CONFIGS))
def test_config_builds_its_network(name):
    """The config loads, its LMDIR builds, and a forward pass maps an image to an image of its size
    (traced with `jax.eval_shape`: no parameter is drawn and nothing compiles)."""
    c = load_config(str(CONFIG_DIR / f"{name}.py"))
    assert c.name
    model = nnx.eval_shape(lambda: build_model(c.model, int(c.seed)))
    counts = count_params(model)
    assert counts["total"] > 0 and counts["backbone"] > 0

    graphdef, state = nnx.split(model)
    lq = jax.ShapeDtypeStruct((1, 24, 40, 3), jnp.float32)
    priors = jax.eval_shape(lambda: Priors.empty(1, int(c.model.text_dim),
                                                 text_len=int(c.priors.max_text_len),
                                                 ref_size=int(c.priors.ref_size)))
    out = jax.eval_shape(lambda s, x, p: nnx.merge(graphdef, s)(x, p), state, lq, priors)
    assert out.shape == lq.shape and out.dtype == jnp.float32


@pytest.mark.parametrize("name", sorted(CONTROLLER_CONFIGS))
def test_controller_config_builds_its_controller(name, tiny_clip):
    """A controller config (trained with `lmdir priors train-controller --clip DIR`) loads and its
    controller builds from the CLIP it is meant for (the quick start's tiny one)."""
    c = load_config(str(CONFIG_DIR / f"{name}.py"))
    clip = load_clip(tiny_clip, max_text_len=int(c.priors.max_text_len))
    ctrl = nnx.eval_shape(lambda: Controller.from_clip(clip, int(c.seed)))
    n = sum(int(v.size) for v in jax.tree.leaves(nnx.state(ctrl, nnx.Param)))
    assert n > 0
    assert int(c.data.patch_size) >= clip.image_size  # the controller crops CLIP-sized views of a patch
