"""EMA parameters during training, and the validation numbers (the SSIM `lmdir evaluate` reports).

The validation plots of a real run are checked on the trained fixture (tests/test_trained_cli.py).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from lmdir_jax.config import load_config
from lmdir_jax.data.io import write_image

OVERRIDES = ["config.data.patch_size=16", "config.train.ema_decay=0.75"]


def _leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def test_ema_follows_the_parameters_with_its_decay():
    """After each step: ema = decay * ema + (1 - decay) * params (the new parameters)."""
    from lmdir_jax.data.pipeline import make_train_iterator
    from lmdir_jax.train import mesh as mesh_lib
    from lmdir_jax.train import state as state_lib
    from lmdir_jax.train import step as step_lib

    config = load_config("tiny", OVERRIDES)
    mesh = mesh_lib.make_mesh(1, 1, jax.devices()[:1])
    setup = state_lib.make_setup(config, mesh)
    state = state_lib.init_state(config, setup)
    assert setup.use_ema and "ema" in state
    init = _leaves(nnx.State(state["model"]).filter(nnx.Param))
    np.testing.assert_array_equal(_leaves(state["ema"])[0], init[0])  # starts at the initial params
    fn = step_lib.make_train_step(config, setup)
    it = make_train_iterator(config)
    for _ in range(2):
        ema_before = _leaves(state["ema"])
        state, _ = fn(state, mesh_lib.global_batch(next(it), mesh), None)
        params = _leaves(nnx.State(state["model"]).filter(nnx.Param))
        ema = _leaves(state["ema"])
        for e0, p, e in zip(ema_before, params, ema, strict=True):
            np.testing.assert_allclose(e, 0.75 * e0 + 0.25 * p, rtol=1e-5, atol=1e-7)
    moved = [np.abs(p - q).max() for p, q in zip(params, init, strict=True)]
    lag = [np.abs(e - p).max() for e, p in zip(ema, params, strict=True)]
    assert max(moved) > 0 and max(lag) > 0  # the parameters moved; the EMA lags behind them


def test_validation_scores_are_the_ones_evaluate_reports(tmp_path):
    """`validate` (train/loop.py) scores with metrics.image_metrics, as `lmdir evaluate` does."""
    from lmdir_jax.data.evaluation import iter_eval_pairs
    from lmdir_jax.metrics import image_metrics
    from lmdir_jax.train.loop import validate

    rng = np.random.default_rng(0)
    for i in range(2):
        y, x = np.mgrid[0:40, 0:48] / 48
        img = np.stack([x, y, 0.5 * (x + y)], -1) * 0.8 + 0.1 + 0.03 * rng.standard_normal((40, 48, 3))
        write_image(tmp_path / "val" / f"v{i}.png", np.clip(img, 0, 1))
    config = load_config("tiny", [f"config.data.val_source={tmp_path / 'val'}",
                                  "config.data.val_spec=noise:25", "config.data.val_size=32"])

    def blur(state, lq, texts):  # a stand-in network: a 3x3 box blur of its input
        pad = np.pad(lq, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
        return sum(pad[:, i:i + lq.shape[1], j:j + lq.shape[2]] for i in range(3) for j in range(3)) / 9

    scores, rows = validate(config, {}, blur)
    want = [image_metrics(np.clip(blur(None, d[None], None)[0], 0, 1), c)
            for _, d, c, _ in iter_eval_pairs(str(tmp_path / "val"), spec="noise:25", seed=0,
                                              crop_multiple=8, max_images=8, center_crop=32)]
    assert scores["val_images"] == 2 and len(rows) == 2
    assert scores["val_ssim"] == pytest.approx(np.mean([w["ssim_rgb"] for w in want]), abs=1e-9)
    assert scores["val_psnr"] == pytest.approx(np.mean([w["psnr_rgb"] for w in want]), abs=1e-9)
    assert scores["val_psnr"] > scores["val_input_psnr"]  # blurring removes some of the noise


def test_schedule_steps_fixes_the_schedule_whatever_train_steps():
    """Chunked training: with `train.schedule_steps` the learning rate at a step no longer depends
    on `train.steps` (each chunk raises it); without it the schedule ends at `train.steps`."""
    from lmdir_jax.train.state import learning_rate_schedule

    whole = load_config("tiny", ["config.train.steps=100"]).train
    chunk = load_config("tiny", ["config.train.steps=10", "config.train.schedule_steps=100"]).train
    plain = load_config("tiny", ["config.train.steps=10"]).train
    for step in (0, 1, 5, 9):
        want = float(learning_rate_schedule(whole)(step))
        assert float(learning_rate_schedule(chunk)(step)) == pytest.approx(want, rel=1e-6)
    assert float(learning_rate_schedule(plain)(9)) < 0.5 * float(learning_rate_schedule(whole)(9))


def test_a_next_chunk_reuses_the_jitted_step_and_a_changed_config_does_not(monkeypatch):
    """`reusable_train_step` (what `train()` calls): the same config but a larger `train.steps`
    under a fixed `train.schedule_steps` gets the step already made (no new trace or compile); a
    changed schedule, a changed loss or another mesh gets a new one."""
    import types

    from lmdir_jax.train import mesh as mesh_lib
    from lmdir_jax.train import step as step_lib

    made = []
    monkeypatch.setattr(step_lib, "make_train_step",
                        lambda config, setup, clip=None: made.append(object()) or made[-1])
    monkeypatch.setattr(step_lib, "_REUSABLE", {})
    one = types.SimpleNamespace(mesh=mesh_lib.make_mesh(1, 1, jax.devices()[:1]))
    two = types.SimpleNamespace(mesh=mesh_lib.make_mesh(2, 1, jax.devices()[:2]))

    def step(setup, *overrides):
        return step_lib.reusable_train_step(load_config("tiny", list(overrides)), setup)

    first = step(one, "config.train.steps=3", "config.train.schedule_steps=6")
    assert step(one, "config.train.steps=6", "config.train.schedule_steps=6") is first
    assert len(made) == 1
    assert step(one, "config.train.steps=6", "config.train.schedule_steps=8") is not first
    assert step(one, "config.train.steps=3") is not step(one, "config.train.steps=6")
    again = step(one, "config.train.steps=6", "config.train.schedule_steps=6")
    assert step(one, "config.train.steps=6", "config.train.schedule_steps=6",
                "config.train.loss=psnr") is not again
    assert step(two, "config.train.steps=6", "config.train.schedule_steps=6") is not again
    assert len(made) == 7
