"""The training loop's pieces on their own: actions, the loop with a stand-in step, resume checks,
workdir checks, multi-process start-up errors. No network is compiled here (seconds in all)."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from faults import PoisonBatchAtStep

from lmdir_jax.config import config_to_json, load_config
from lmdir_jax.errors import UsageError
from lmdir_jax.train import actions as A
from lmdir_jax.train import checkpoints as ckpt
from lmdir_jax.train import distributed
from lmdir_jax.train.loop import check_workdir, run_loop
from lmdir_jax.train.mesh import make_mesh


class _Logger:
    def __init__(self):
        self.records = []

    def write(self, step, scalars):
        self.records.append((step, dict(scalars)))


def _run(total=6, **kw) -> A.Run:
    return A.Run(workdir=Path("/nonexistent"), total=total, step=0, batch_size=4, logger=_Logger(), **kw)


def _iterator(n=4):
    """Per-host batches whose lq mean is the step number (1, 2, ...)."""
    step = 0
    while True:
        step += 1
        yield {"lq": np.full((n, 2, 2, 3), step, np.float32), "deg_text": np.array(["x"] * n)}


def _step(state, batch):
    """A stand-in train step: loss = mean of the inputs, state counts steps."""
    return {"model": state["model"] + 1, "opt": state["opt"]}, {"loss": jnp.mean(batch["lq"])}


class _Manager:
    """Records saves like an orbax CheckpointManager would receive them."""

    def __init__(self):
        self.saved = []

    def save(self, step, args, force=False):
        self.saved.append(step)

    def wait_until_finished(self):
        pass


def _loop(run, *extra):
    run.mesh = make_mesh(1, 1, jax.devices()[:1])
    run.iterator = _iterator()
    run.manager = _Manager()
    run.state = {"model": jnp.zeros((), jnp.int32), "opt": jnp.zeros(())}
    run.actions = [A.StopOnNonFinite(), A.LogMetrics(2), A.Checkpoint(3), *extra]
    run_loop(run, _step, run.iterator)
    return run


def test_loop_logs_window_means_and_checkpoints():
    run = _loop(_run(total=7))
    assert run.step == 7 and int(run.state["model"]) == 7
    logged = [(s, m["loss"]) for s, m in run.logger.records]
    assert logged == [(2, 1.5), (3, 3.0), (4, 4.0), (6, 5.5), (7, 7.0)]  # saves flush first
    assert all(m["images_per_s"] > 0 for _, m in run.logger.records)
    assert run.manager.saved == [3, 6, 7] and run.last_saved == 7


def test_poisoned_batch_stops_before_saving():
    run = _run(total=8)
    with pytest.raises(A.TrainingDiverged, match=r"nan at step 5; .*last good checkpoint: step 3"):
        _loop(run, PoisonBatchAtStep(5))
    assert run.manager.saved == [3]  # step 6's checkpoint flushes first and never saves


def test_injected_stop_ends_with_a_checkpoint():
    class StopAt(A.Action):
        every = 1

        def __call__(self, run):
            run.stop = run.step == 4

    run = _loop(_run(total=10), StopAt())
    assert run.step == 4 and run.manager.saved == [3, 4]


@pytest.mark.parametrize("first, second", [(signal.SIGTERM, signal.SIGINT),
                                           (signal.SIGINT, signal.SIGTERM)])
def test_stop_on_signal_sets_stop_and_restores_handlers(first, second):
    """Ctrl-C and a scheduler's SIGTERM stop the loop the same way (tests/test_train.py sends a
    real SIGTERM to a real `lmdir train`); a second signal of either kind gives up at once."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    run, action = _run(), A.StopOnSignal()
    action.start(run)
    try:
        action(run)
        assert not run.stop
        os.kill(os.getpid(), first)
        action(run)
        assert run.stop and run.interrupted and action.signal == first
        with pytest.raises(KeyboardInterrupt):  # a second signal gives up at once
            os.kill(os.getpid(), second)
    finally:
        action.close(run)
    assert {s: signal.getsignal(s) for s in before} == before


def test_progress_outside_a_terminal_is_periodic_lines():
    stream = io.StringIO()
    run = _run(total=10)
    p = A.Progress(True, stream=stream, interval=3600)
    p.start(run)
    for s in range(1, 4):
        run.step, run.metrics, run.images_per_s = s, {"loss": 0.5 / s}, 12.0
        p(run)
    assert stream.getvalue() == "train: starting at step 0/10 (the first step compiles)\n"  # no more yet
    stream.truncate(0)
    stream.seek(0)
    p.interval = 0
    run.step = 5
    p(run)
    p.on_end(run)
    p.close(run)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in stream.getvalue()
    assert lines[0].startswith("train: step 5/10 loss 0.1667 12.0 images/s ETA 0:00:0")
    assert lines[1].startswith("train: step 5/10")
    assert A.Progress(False, stream=stream).bar is None


def test_log_metrics_means():
    run, log = _run(), A.LogMetrics(10)
    log.on_metrics(run, [(9, {"loss": 1.0, "lr": 0.1}), (10, {"loss": 3.0, "lr": 0.3})])
    assert run.logger.records[0][0] == 10 and run.logger.records[0][1]["loss"] == 2.0
    assert run.loss == 2.0


def _saved_config(tmp_path, *overrides):
    (tmp_path / "config.json").write_text(config_to_json(load_config("tiny", list(overrides))))


def test_resume_config_check(tmp_path):
    _saved_config(tmp_path)
    same = load_config("tiny")
    assert ckpt.check_resume_config(same, tmp_path) == []
    ok = load_config("tiny", ["train.steps=9", "train.lr=1e-3", "data.num_workers=2", "data.val_spec=jpeg:20"])
    assert ckpt.check_resume_config(ok, tmp_path) == [
        "data.num_workers", "data.val_spec", "train.lr", "train.steps"]
    bad = load_config("tiny", ["model.width=16", "seed=3", "data.source=/x", "train.steps=9"])
    with pytest.raises(UsageError) as e:
        ckpt.check_resume_config(bad, tmp_path)
    msg = str(e.value)
    assert "data.source" in msg and "model.width: 4 -> 16" in msg and "seed: 0 -> 3" in msg
    assert "train.steps" not in msg and "\n" not in msg
    forced = load_config("tiny", ["model.width=16", "train.allow_config_change=True"])
    assert ckpt.check_resume_config(forced, tmp_path) == ["model.width", "train.allow_config_change"]
    assert json.loads((tmp_path / "config.json").read_text())["model"]["width"] == 4  # untouched


def test_workdir_that_is_a_file_is_refused_before_any_work(tmp_path, capsys):
    from lmdir_jax.cli import main

    f = tmp_path / "file.txt"
    f.write_text("keep me")
    for wd in (f, f / "sub"):
        with pytest.raises(UsageError, match="is a file"):
            check_workdir(wd)
        assert main(["train", "--config", "tiny", "--workdir", str(wd)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("lmdir: error:") and "is a file" in err[0]
    assert f.read_text() == "keep me"
    assert check_workdir(tmp_path / "new" / "run") == (tmp_path / "new" / "run").resolve()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_bad_settings_are_one_line(monkeypatch):
    port = _free_port()  # nothing listens there
    with pytest.raises(UsageError, match=f"cannot reach the JAX coordinator at 127.0.0.1:{port} within 0.5 s"):
        distributed.wait_for_coordinator(f"127.0.0.1:{port}", 0.5)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", f"127.0.0.1:{port}")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    assert distributed.wanted()
    with pytest.raises(UsageError, match="JAX_PROCESS_ID=2 must be in 0..1"):
        distributed.initialize(1)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "nohostport")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    with pytest.raises(UsageError, match="host:port"):
        distributed.initialize(1)
    monkeypatch.setenv("LMDIR_NO_DISTRIBUTED", "1")
    assert not distributed.wanted()
    with pytest.raises(UsageError, match="multiple of the 3 processes"):
        distributed.check_batch(8, 6, 3)
    with pytest.raises(UsageError, match="multiple of the 8 devices"):
        distributed.check_batch(12, 8, 2)
    distributed.check_batch(16, 8, 2)


def _tiny_state(n):
    return {"model": {"w": jnp.arange(n, dtype=jnp.float32)}, "opt": {"m": jnp.zeros((2,))}}


def _abstract(n):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        _tiny_state(n))


def test_shape_mismatch_is_not_corruption_and_corruption_says_what_it_uses(tmp_path, capfd):
    manager = ckpt.make_manager(tmp_path, async_save=False)
    for step in (1, 2):
        ckpt.save(manager, step, jax.tree.map(lambda x, s=step: x + s, _tiny_state(3)))
    manager.wait_until_finished()
    with pytest.raises(UsageError, match=r"step 2 .*model/w is shape \(3,\) in the checkpoint but shape \(5,\)"):
        ckpt.restore_latest(manager, _abstract(5), set_aside=True)
    assert sorted(manager.all_steps()) == [1, 2] and not (tmp_path / "checkpoints_corrupt").exists()
    for f in (tmp_path / "checkpoints" / "2" / "model").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\0garbage")
    capfd.readouterr()
    step, state = ckpt.restore_latest(manager, _abstract(3), set_aside=True)
    err = capfd.readouterr().err
    manager.close()
    assert step == 1 and np.array_equal(state["model"]["w"], [1.0, 2.0, 3.0])
    warnings = [x for x in err.splitlines() if x.startswith("lmdir: warning:")]
    assert len(warnings) == 1 and "step 2 (model/_METADATA does not decode" in warnings[0], err
    assert "using step 1" in warnings[0] and "moved to" in warnings[0]
    assert len(err.splitlines()) < 10, err[-2000:]
    assert (tmp_path / "checkpoints_corrupt" / "2").is_dir()


class _Identity:
    """A stand-in predictor: returns its input (the restored image is the degraded one)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, state, lq, texts=None):
        self.calls += 1
        return np.asarray(lq, np.float32)


def test_validate_action_logs_evaluate_metrics_and_writes_a_grid(tmp_path):
    from lmdir_jax.data.io import write_image
    from lmdir_jax.metrics import image_metrics

    rng = np.random.default_rng(0)
    (tmp_path / "val").mkdir()
    for i in range(2):
        write_image(tmp_path / "val" / f"{i}.png", rng.random((40, 48, 3)).astype(np.float32))
    config = load_config("tiny", [f"data.val_source={tmp_path / 'val'}", "data.val_size=32",
                                  "data.val_spec=noise:25"])
    run = A.Run(workdir=tmp_path / "wd", total=10, step=5, logger=_Logger())
    action = A.Validate(5, config, _Identity())
    assert action.due(run) and not action.due(A.Run(workdir=tmp_path, total=10, step=4))
    action(run)
    (step, scalars), = run.logger.records
    assert step == 5 and scalars["val_images"] == 2.0 and action.predictor.calls == 2
    assert scalars["val_psnr"] == scalars["val_input_psnr"] < 30  # identity: restored == input
    assert 0 < scalars["val_ssim"] < 0.99 and run.summary["val_psnr"] == scalars["val_psnr"]
    assert (tmp_path / "wd" / "plots" / "val_000005.png").is_file()
    # the same numbers as `lmdir evaluate` computes (uint8 RGB PSNR), not a private variant
    from lmdir_jax.data.evaluation import iter_eval_pairs

    want = np.mean([image_metrics(np.clip(d, 0, 1), c)["psnr_rgb"] for _, d, c, _ in iter_eval_pairs(
        str(tmp_path / "val"), spec="noise:25", seed=0, crop_multiple=8, center_crop=32)])
    assert scalars["val_psnr"] == pytest.approx(want)


def test_a_mixture_run_gets_a_loss_curve_per_source():
    from lmdir_jax.train.monitor import loss_curves

    records = [{"step": s, "loss": -20.0 - s, "loss/denoise": -25.0 - s} for s in range(1, 11)]
    records += [{"step": 11, "loss": -31.0, "loss/derain": -30.0}]  # a batch without denoise
    curves = loss_curves(records, smooth=2)
    assert set(curves) == {"loss", "loss/denoise", "loss/derain"}
    assert curves["loss"] == [(s, -20.0 - s) for s in range(1, 11)] + [(11, -31.0)]
    # each source's curve is a running mean over `smooth` of its own records, at the later step
    assert curves["loss/denoise"][0] == (2, pytest.approx(-26.5)) and len(curves["loss/denoise"]) == 9
    assert curves["loss/derain"] == [(11, -30.0)]  # fewer records than the window: as is
    assert set(loss_curves([{"step": 1, "loss": 0.5}])) == {"loss"}


def test_plot_action_writes_loss_curve_and_training_grid(tmp_path):
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 5)))
    run = A.Run(workdir=wd, total=4, step=4)
    predictor = _Identity()
    run.last_batch = {"lq": np.zeros((8, 16, 16, 3), np.float32), "gt": np.ones((8, 16, 16, 3), np.float32),
                      "deg_text": np.array(["noise"] * 8)}
    A.Plot(2, predictor)(run)
    assert (wd / "plots" / "loss.png").stat().st_size > 1000
    assert (wd / "plots" / "train_000004.png").is_file() and predictor.calls == 1
    run.step, run.interrupted = 5, True
    A.Plot(2, predictor).on_end(run)  # interrupted: the curve, but no grid
    assert not (wd / "plots" / "train_000005.png").exists()


def test_progress_line_before_any_metrics_shows_no_nan():
    stream = io.StringIO()
    run = _run(total=10)
    p = A.Progress(True, stream=stream, interval=0)
    p.start(run)
    run.step = 1
    p(run)
    line = stream.getvalue().splitlines()[-1]
    assert line.startswith("train: step 1/10 loss - - images/s ETA") and "nan" not in line
