"""Checkpoints are never lost or moved by mistake: reads move nothing, only proven damage is set aside
(by training), anything else stops in one line, the format number is checked, and a checkpoint of
today's format (tests/data/checkpoint_format1, written by tests/checkpoint_fixture.py) still loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import checkpoint_fixture as fx
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from lmdir_jax.cli import main
from lmdir_jax.train import checkpoints as ckpt

DATA = Path(__file__).resolve().parent / "data"
FORMAT1 = DATA / "checkpoint_format1"
CLI_OVERRIDES = [f"--config.{o}" for o in fx.OVERRIDES]


def _lines(err: str, kind: str) -> list[str]:
    return [x for x in err.splitlines() if x.startswith(f"lmdir: {kind}:")]


def _tiny_state(shift: float) -> dict:
    return {"model": {"w": jnp.arange(3.0) + shift, "b": jnp.ones((2, 2))}, "opt": {"m": jnp.zeros((2,))}}


def _abstract() -> dict:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        _tiny_state(0))


def _two_steps(workdir: Path) -> Path:
    manager = ckpt.make_manager(workdir, async_save=False)
    for step in (1, 2):
        ckpt.save(manager, step, _tiny_state(step))
    manager.wait_until_finished()
    manager.close()
    return workdir / "checkpoints"


def _truncate_arrays(step_dir: Path) -> None:
    for f in (step_dir / "model" / "d").iterdir():
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


DAMAGE = {
    "truncated data file": (_truncate_arrays, ": truncated: model/d/"),
    "missing manifest": (lambda s: (s / "model" / "manifest.ocdbt").unlink(), "model/manifest.ocdbt is missing"),
    "undecodable meta": (lambda s: (s / "meta" / "metadata").write_text("{"), "meta/metadata does not decode"),
    "missing item": (lambda s: shutil.rmtree(s / "opt"), "item opt is missing"),
    "altered data file": (lambda s: [f.write_bytes(f.read_bytes()[:20] + b"\xff" * 8 + f.read_bytes()[28:])
                                     for f in (s / "model" / "d").iterdir()], "undecodable: model/d/"),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_proven_damage_is_skipped_and_only_training_sets_it_aside(tmp_path, capfd, kind):
    damage, reason = DAMAGE[kind]
    checkpoints = _two_steps(tmp_path)
    damage(checkpoints / "2")
    assert ckpt.find_damage(checkpoints / "1") is None
    assert reason in ckpt.find_damage(checkpoints / "2")
    before = fx.listing(tmp_path)
    manager = ckpt.read_only_manager(tmp_path)
    capfd.readouterr()
    step, state = ckpt.restore_latest(manager, _abstract())  # a read: nothing moves
    manager.close()
    warnings = _lines(capfd.readouterr().err, "warning")
    assert step == 1 and np.array_equal(state["model"]["w"], [1.0, 2.0, 3.0])
    assert len(warnings) == 1 and reason in warnings[0] and warnings[0].endswith("left in place); using step 1")
    assert fx.listing(tmp_path) == before
    manager = ckpt.make_manager(tmp_path, async_save=False)  # training: the proven damage moves
    step, _ = ckpt.restore_latest(manager, _abstract(), set_aside=True)
    manager.close()
    warnings = _lines(capfd.readouterr().err, "warning")
    assert step == 1 and len(warnings) == 1 and "moved to" in warnings[0]
    assert (tmp_path / "checkpoints_corrupt" / "2").is_dir() and not (checkpoints / "2").exists()


@pytest.mark.parametrize("error", [MemoryError(), PermissionError(13, "Permission denied"),
                                   ValueError("a format this orbax reads differently"), KeyboardInterrupt()])
def test_failures_without_proof_stop_and_move_nothing(tmp_path, monkeypatch, error):
    """MemoryError, a permission problem, another orbax's reading: the files are whole, so even
    training moves nothing and stops in one line; Ctrl-C stops as Ctrl-C."""
    _two_steps(tmp_path)
    before = fx.listing(tmp_path)

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(ocp.CheckpointManager, "restore", fail)
    manager = ckpt.make_manager(tmp_path, async_save=False)
    expected = KeyboardInterrupt if isinstance(error, KeyboardInterrupt) else ckpt.CheckpointError
    with pytest.raises(expected) as e:
        ckpt.restore_latest(manager, _abstract(), set_aside=True)
    manager.close()
    if expected is ckpt.CheckpointError:
        msg = str(e.value)
        assert "step 2" in msg and "nothing was moved" in msg and "\n" not in msg
        assert type(error).__name__ in msg or "out of memory" in msg
    assert fx.listing(tmp_path) == before


def test_permission_problem_found_by_the_check_is_named(tmp_path, monkeypatch):
    """A file that cannot be opened is not damage: the one line names the permission problem."""
    _two_steps(tmp_path)
    _truncate_arrays(tmp_path / "checkpoints" / "2")  # orbax fails on step 2 ...
    before = fx.listing(tmp_path)
    real = Path.read_bytes

    def read_bytes(self):  # ... and the check cannot open its meta (root ignores chmod)
        if self.name == "metadata" and self.parent.parent.name == "2":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    manager = ckpt.make_manager(tmp_path, async_save=False)
    with pytest.raises(ckpt.CheckpointError, match=r"step 2 .*PermissionError.*nothing was moved"):
        ckpt.restore_latest(manager, _abstract(), set_aside=True)
    manager.close()
    monkeypatch.undo()
    assert fx.listing(tmp_path) == before


def test_committed_format1_checkpoint_loads_without_writing(capfd):
    """The checkpoint committed in tests/data (today's format) loads with the parameters it was
    written with, and reading it changes nothing there."""
    from lmdir_jax.train.checkpoints import load_for_inference

    expected = json.loads((DATA / "checkpoint_format1.json").read_text())
    meta = json.loads((FORMAT1 / "checkpoints" / "1" / "meta" / "metadata").read_text())
    assert meta["format"] == ckpt.FORMAT == 1 and meta["lmdir_jax"] and meta["step"] == expected["step"]
    assert sum(f.stat().st_size for f in FORMAT1.rglob("*") if f.is_file()) < 300_000
    before = fx.listing(FORMAT1)
    capfd.readouterr()
    model, config = load_for_inference(FORMAT1)
    assert not _lines(capfd.readouterr().err, "warning")
    assert fx.param_digest(model) == expected["params_sha256"]
    assert config.model.width == 2
    assert ckpt.find_damage(FORMAT1 / "checkpoints" / "1", ("meta", "model", "data")) is None
    assert fx.listing(FORMAT1) == before


def test_unknown_format_is_one_line_and_never_set_aside(tmp_path, capsys):
    wd = tmp_path / "future"
    shutil.copytree(FORMAT1, wd)
    meta_file = wd / "checkpoints" / "1" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps(dict(meta, format=7, lmdir_jax="9.0")))
    before = fx.listing(wd)
    (tmp_path / "in").mkdir()
    from lmdir_jax.data.io import write_image

    write_image(tmp_path / "in" / "a.png", np.full((16, 16, 3), 0.5, np.float32))
    for argv in (["restore", str(tmp_path / "in"), "--checkpoint", str(wd), "--output", str(tmp_path / "out")],
                 ["train", "--config", "tiny", "--workdir", str(wd), "--no-progress", *CLI_OVERRIDES]):
        assert main(argv) == 1, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "has format 7 (written by lmdir-jax 9.0)" in err[0], err
        assert "reads checkpoint format 1" in err[0] and "nothing was moved" in err[0]
        assert fx.listing(wd) == before


def test_read_only_commands_leave_a_workdir_untouched(tmp_path, capsys):
    """restore, evaluate, export, report and model convert on a workdir whose newest checkpoint is
    damaged: each falls back to step 1 with one warning line; names, sizes, mtimes and contents of
    everything in the workdir are unchanged, both steps included."""
    from lmdir_jax.data.io import write_image
    from lmdir_jax.train.checkpoints import load_for_inference

    wd = fx.write_workdir(tmp_path / "run", steps=(1, 2))
    (wd / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.5}) + "\n"
                                      + json.dumps({"step": 2, "loss": 0.4}) + "\n")
    _truncate_arrays(wd / "checkpoints" / "2")
    want = fx.param_digest(load_for_inference(wd, step=1)[0])
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        write_image(tmp_path / "photos" / f"{name}.png", rng.random((24, 24, 3)).astype(np.float32))
    before = fx.listing(wd)
    capsys.readouterr()
    out = tmp_path / "out"
    commands = [
        ["restore", str(tmp_path / "photos"), "--checkpoint", str(wd), "--output", str(out / "restored")],
        ["evaluate", "--checkpoint", str(wd), "--data", str(tmp_path / "photos"), "--spec", "noise:25"],
        ["export", "torch", "--checkpoint", str(wd), "--output", str(out / "torch"), "--no-check"],
        ["model", "convert", "--checkpoint", str(wd), "--output", str(out / "unscanned"),
         "--scan-blocks", "false"],
        ["report", "--workdir", str(wd), "--output", str(out / "report.md")],
    ]
    for argv in commands:
        assert main(argv) == 0, (argv, capsys.readouterr().err[-2000:])
        err = capsys.readouterr().err
        if argv[0] != "report":  # (report reads no checkpoint)
            warnings = _lines(err, "warning")
            assert len(warnings) == 1 and "step 2 (model/" in warnings[0], (argv, err)
            assert warnings[0].endswith("left in place); using step 1")
        assert fx.listing(wd) == before, argv
    assert fx.param_digest(load_for_inference(wd)[0]) == want
    assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == ["1", "2"]


def test_training_sets_aside_proven_damage_and_never_starts_over_by_itself(tmp_path, capsys, monkeypatch):
    """Every step damaged: `lmdir train` moves them to checkpoints_corrupt/ and stops in one line
    saying how to start again; rerun, it stops again (the set-aside steps were never used);
    --restart keeps them in previous_run/ and starts at step 0. With only the newest damaged,
    training resumes from the one before."""
    from lmdir_jax.train import loop
    from lmdir_jax.train import mesh as mesh_lib
    from lmdir_jax.train import state as state_lib
    from lmdir_jax.train.loop import _restore_or_init, set_aside_for_restart

    wd = fx.write_workdir(tmp_path / "run", steps=(1, 2))
    argv = ["train", "--config", "tiny", "--workdir", str(wd), "--no-progress", *CLI_OVERRIDES]
    for step in (1, 2):
        _truncate_arrays(wd / "checkpoints" / str(step))
    for _ in range(2):  # the first run sets the damaged steps aside, the second finds none
        assert main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("lmdir: error: no usable checkpoint"), err
        assert "--restart" in err[0] and "does not start again at step 0 by itself" in err[0]
        assert sorted(p.name for p in (wd / "checkpoints_corrupt").iterdir()) == ["1", "2"]
        assert not any(p.name.isdigit() for p in (wd / "checkpoints").iterdir())
    # --restart: the old folders go to previous_run/ and training starts at step 0 (the loop itself
    # is left out here: it would only compile and run the steps).
    monkeypatch.setattr(loop, "run_loop", lambda run, step_fn, batches: None)
    assert main([*argv, "--restart"]) == 0
    assert "trained: step=0" in capsys.readouterr().out
    assert sorted(p.name for p in (wd / "previous_run" / "checkpoints_corrupt").iterdir()) == ["1", "2"]
    assert not (wd / "checkpoints_corrupt").exists()
    assert set_aside_for_restart(wd) == wd / "previous_run.1"  # a second restart keeps the first
    # A fresh pair of steps, the newest damaged: resume from step 1, step 2 set aside.
    shutil.rmtree(wd / "checkpoints", ignore_errors=True)
    fx.write_workdir(wd, steps=(1, 2))
    _truncate_arrays(wd / "checkpoints" / "2")
    config = fx.config()
    setup = state_lib.make_setup(config, mesh_lib.make_mesh(1, 1, jax.devices()[:1]))
    manager = ckpt.make_manager(wd, async_save=False)
    try:
        start, _, restored = _restore_or_init(config, setup, manager, None, wd)
    finally:
        manager.close()
    err = capsys.readouterr().err
    assert (start, restored) == (1, True)
    warnings = _lines(err, "warning")
    assert len(warnings) == 1 and "resuming from step 1" in warnings[0] and "moved to" in warnings[0]
    assert (wd / "checkpoints_corrupt" / "2").is_dir()


def test_priors_classify_reads_a_controller_workdir_without_changing_it(tmp_path, capsys):
    """`lmdir priors classify --controller WD` (the priors commands' one read of a run folder) on a
    controller workdir whose newest step is damaged: step 1 is used, one warning, nothing changes."""
    from flax import nnx

    from lmdir_jax.data.io import write_image
    from lmdir_jax.priors.clip import load_clip
    from lmdir_jax.priors.controller import SPEC_FILE, Controller, controller_spec
    from lmdir_jax.priors.tiny import save_tiny_clip

    clip_dir = save_tiny_clip(tmp_path / "clip", text_dim=32, seed=0)
    clip = load_clip(clip_dir, max_text_len=16)
    wd = tmp_path / "controller"
    wd.mkdir()
    (wd / SPEC_FILE).write_text(json.dumps(controller_spec(clip)))
    state = nnx.state(Controller.from_clip(clip))
    manager = ckpt.make_manager(wd, async_save=False)
    for step in (1, 2):
        ckpt.save(manager, step, {"model": state}, meta={"kind": "controller"})
    manager.wait_until_finished()
    manager.close()
    _truncate_arrays(wd / "checkpoints" / "2")
    write_image(tmp_path / "photos" / "a.png", np.random.default_rng(0).random((32, 32, 3)).astype(np.float32))
    before = fx.listing(wd)
    capsys.readouterr()
    assert main(["priors", "classify", "--clip", str(clip_dir), "--data", str(tmp_path / "photos"),
                 "--spec", "noise:25", "--controller", str(wd)]) == 0
    warnings = _lines(capsys.readouterr().err, "warning")
    assert len(warnings) == 1 and "step 2 (model/" in warnings[0], warnings
    assert warnings[0].endswith("left in place); using step 1")
    assert fx.listing(wd) == before
