"""DA-CLIP controller: the zero-initialised control is the identity, training learns, resume is exact,
the iterative loop's stop rules, and misuse."""

import json

import jax
import numpy as np
import pytest

from lmdir_jax.config import load_config
from lmdir_jax.errors import UsageError
from lmdir_jax.inference import next_degradation
from lmdir_jax.priors.clip import load_clip
from lmdir_jax.priors.controller import (
    Controller,
    controlled_features,
    frozen_params,
    label_targets,
    load_controller,
    native_crops,
    normalize_pixels,
)
from lmdir_jax.priors.tiny import save_tiny_clip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "clip", text_dim=32, seed=0)


@pytest.fixture(scope="module")
def clip(clip_dir):
    return load_clip(clip_dir, max_text_len=16)


def test_zero_initialised_controller_leaves_the_frozen_tower_unchanged(clip):
    images = np.random.default_rng(0).random((3, 32, 32, 3), np.float32)
    ref = np.asarray(clip.image_features(clip.params, images))  # the Hugging Face module
    ctrl = Controller.from_clip(clip)
    pixels = normalize_pixels(images, clip.mean, clip.std)
    deg, content = ctrl(pixels, frozen_params(clip))
    np.testing.assert_allclose(np.asarray(controlled_features(frozen_params(clip), pixels, ctrl.shape)), ref, atol=1e-5)
    np.testing.assert_allclose(np.asarray(content), ref, atol=1e-5)  # zero links: no control
    np.testing.assert_allclose(np.asarray(deg), ref, atol=1e-5)  # the copy starts equal
    # A non-zero link changes the frozen tower's output: the control really enters every layer.
    k = ctrl.zero_links[-1].kernel
    k[...] = jax.random.normal(jax.random.key(0), k[...].shape) * 0.5
    assert np.abs(np.asarray(ctrl(pixels, frozen_params(clip))[1]) - ref).max() > 1e-3


def test_label_targets_and_native_crops():
    names = ["clean", "rain", "noise", "jpeg"]
    v = np.zeros((3, 8), np.float32)
    v[1, 0] = 0.5  # rain
    v[2, [0, 6]] = 0.3  # rain + noise
    t = label_targets(v, names)
    np.testing.assert_allclose(t, [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0.5, 0.5, 0]])
    img = np.arange(100 * 70 * 3, dtype=np.float32).reshape(100, 70, 3)
    crops = native_crops(img, 32, grid=3)
    assert crops.shape == (9, 32, 32, 3)
    np.testing.assert_array_equal(crops[0], img[:32, :32])
    np.testing.assert_array_equal(crops[-1], img[-32:, -32:])
    assert native_crops(img[:20, :20], 32).shape == (1, 32, 32, 3)  # padded, never resized


def test_next_degradation_stop_rules():
    names = ["clean", "rain", "noise", "haze"]
    assert next_degradation(np.array([0.6, 0.2, 0.1, 0.1]), names, [])[0] is None  # clean wins
    assert next_degradation(np.array([0.1, 0.2, 0.6, 0.1]), names, [])[0] == "noise"
    # never the same degradation twice: the next most probable untreated one
    assert next_degradation(np.array([0.1, 0.2, 0.6, 0.1]), names, ["noise"])[0] == "rain"
    # untreated ones less probable than clean: stop
    assert next_degradation(np.array([0.3, 0.1, 0.5, 0.1]), names, ["noise"])[0] is None


def _config(tmp_path, steps, extra=()):
    return load_config("controller", [
        f"config.train.steps={steps}", "config.train.ckpt_every=2", "config.train.log_every=1",
        "config.data.batch_size=8", "config.data.patch_size=32", "config.train.warmup_steps=1", *extra,
    ])


@pytest.mark.slow
def test_resume_is_exact(clip_dir, tmp_path):
    from lmdir_jax.priors.controller_train import train_controller

    no_down = ["config.data.tasks.downsample=0.0"]  # snow is 0 in configs/controller.py too
    a = train_controller(_config(tmp_path, 4, no_down), str(clip_dir), tmp_path / "a", progress=False)
    train_controller(_config(tmp_path, 2, no_down), str(clip_dir), tmp_path / "b", progress=False)
    b = train_controller(_config(tmp_path, 4, no_down), str(clip_dir), tmp_path / "b", progress=False)
    assert a["step"] == b["step"] == 4 and b["start_step"] == 2
    # controller.json keeps the kinds among its training targets (across the resume); it names
    # only those: a kind it never trained on gets probability 0.
    kinds = json.loads((tmp_path / "a" / "controller.json").read_text())["kinds"]
    assert kinds == json.loads((tmp_path / "b" / "controller.json").read_text())["kinds"]
    assert len(kinds) >= 4 and "downsample" not in kinds and "snow" not in kinds
    clip = load_clip(clip_dir, max_text_len=16)
    pa = load_controller(tmp_path / "a", clip).controller
    pb = load_controller(tmp_path / "b", clip).controller
    from flax import nnx

    for x, y in zip(jax.tree.leaves(nnx.state(pa)), jax.tree.leaves(nnx.state(pb)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    fresh = Controller.from_clip(clip)
    moved = [np.abs(np.asarray(x) - np.asarray(y)).max()
             for x, y in zip(jax.tree.leaves(nnx.state(pa)), jax.tree.leaves(nnx.state(fresh)), strict=True)]
    assert max(moved) > 0  # it did train
    records = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert (tmp_path / "a" / "plots" / "confusion.png").is_file()
    assessor = load_controller(tmp_path / "a", clip)
    p = assessor.probabilities(np.random.default_rng(0).random((40, 50, 3)))
    assert assessor.kinds == kinds and p.sum() == pytest.approx(1.0, abs=1e-5)
    assert all((p[i] > 0) == (n in kinds) for i, n in enumerate(assessor.names))
    # Loaded beside a CLIP of another text length (the restoration network's), the controller
    # still compares with the vocabulary features it was trained with (16 tokens).
    other = load_clip(clip_dir)
    assert other.max_text_len != 16
    np.testing.assert_array_equal(np.asarray(load_controller(tmp_path / "a", other).bank),
                                  np.asarray(clip.degradation_bank()[0]))


@pytest.mark.slow
def test_a_short_run_lands_well_above_chance_on_held_out_photos(clip_dir, tmp_path):
    """150 steps on the skimage training photos; the held-out photos (coffee, chelsea), heavily hazy,
    dark or clean, are named right far more often than the 1 in 9 of chance. (So short a run on the
    tiny CLIP separates little but clean, haze and noise: docs/priors.md.)"""
    from lmdir_jax.commands.priors import classify
    from lmdir_jax.priors.controller_train import train_controller

    config = load_config("controller", ["config.train.steps=150", "config.train.log_every=50",
                                        "config.train.ckpt_every=0", "config.train.lr=1e-2"])
    train_controller(config, str(clip_dir), tmp_path / "c", progress=False)
    clip = load_clip(clip_dir, max_text_len=16)
    result = classify(clip, "skimage-heldout", ["haze:heavy", "lowlight:heavy", "clean"],
                      assessor=load_controller(tmp_path / "c", clip))
    crops = result["views"]["controller crops"]
    assert crops["overall_accuracy"] >= 0.5, crops
    assert result["views"]["zero-shot downscaled"]["overall_accuracy"] < crops["overall_accuracy"]


def test_controller_for_another_clip_is_refused(clip_dir, tmp_path):
    wd = tmp_path / "wd"
    wd.mkdir()
    clip = load_clip(clip_dir, max_text_len=16)
    with pytest.raises(UsageError, match="not a controller workdir"):
        load_controller(wd, clip)
    with pytest.raises(UsageError, match="controller folder not found"):
        load_controller(tmp_path / "missing", clip)
    from lmdir_jax.priors.controller import controller_spec

    spec = controller_spec(clip)
    (wd / "controller.json").write_text(json.dumps(dict(spec, text_dim=64)))
    with pytest.raises(UsageError, match="another CLIP"):
        load_controller(wd, clip)
    (wd / "controller.json").write_text(json.dumps(dict(spec, vocabulary=[["clean", "x"]])))
    with pytest.raises(UsageError, match="another degradation vocabulary"):
        load_controller(wd, clip)
