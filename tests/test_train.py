"""Training machinery with the real LMDIR (configs/tiny.py) and the real grain pipeline.

Compilation dominates on a CPU, so the tests share a persistent XLA compilation cache (also passed
to the subprocesses) and reuse one uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import faults
import jax
import numpy as np
import pytest

from lmdir_jax.config import load_config

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = [
    "--config.train.steps=4",
    "--config.train.ckpt_every=2",
    "--config.train.plot_every=-1",  # no plots (matplotlib, a forward pass): full_run checks them
    "--config.data.patch_size=16",
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """The suite's persistent compilation cache (tests/conftest.py), shared with the subprocesses."""
    return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])


def _xla_flags(devices: int | None) -> str:
    """XLA_FLAGS for a subprocess: `devices` emulated CPU devices (None: leave the count to the
    launcher) and the suite's cheaper compilation (tests/conftest.py)."""
    count = "" if devices is None else f"--xla_force_host_platform_device_count={devices} "
    return count + os.environ.get("LMDIR_TEST_XLA_FLAGS", "")


def _env(cache: Path, **extra: str) -> dict:
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=_xla_flags(8),
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1",
        PYTHONPATH=str(REPO),
    )
    env.update(extra)
    return env


def _cli(workdir: Path, cache: Path, extra: list[str] = (), **env: str):
    cmd = [sys.executable, "-m", "lmdir_jax.cli", "train", "--config", "tiny",
           "--workdir", str(workdir), "--no-progress", *OVERRIDES, *extra]
    return subprocess.run(cmd, cwd=REPO, env=_env(cache, **env), capture_output=True, text=True,
                          timeout=1500)


def _params(workdir: Path) -> list[np.ndarray]:
    from flax import nnx

    from lmdir_jax.train.checkpoints import load_for_inference

    model, _ = load_for_inference(workdir)
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, cache_dir) -> Path:
    """An uninterrupted 4-step run on 8 devices (checkpoints at steps 2 and 4; plots at the end)."""
    wd = tmp_path_factory.mktemp("full")
    r = _cli(wd, cache_dir, ["--config.train.plot_every=0"])
    assert r.returncode == 0, r.stderr[-3000:]
    return wd


def test_workdir_contents(full_run):
    cfg = json.loads((full_run / "config.json").read_text())
    assert cfg["name"] == "tiny" and cfg["train"]["steps"] == 4
    records = [json.loads(x) for x in (full_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) for r in records)
    assert (full_run / "plots" / "loss.png").stat().st_size > 1000
    assert list((full_run / "plots").glob("train_*.png"))
    assert list((full_run / "tensorboard").glob("events.out.tfevents*"))
    assert sorted(p.name for p in (full_run / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]


def _params_at_init() -> list[np.ndarray]:
    from flax import nnx

    from lmdir_jax.train.state import build_model

    model = build_model(load_config("tiny"))
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def test_restore_8_devices_onto_1_mesh(full_run):
    """A checkpoint written from an 8-device (4 x 2) mesh restores onto a 1-device mesh, whole."""
    from lmdir_jax.train import checkpoints as ckpt
    from lmdir_jax.train import mesh as mesh_lib
    from lmdir_jax.train import state as state_lib

    config = load_config("tiny", OVERRIDES_KEYS())
    assert json.loads((full_run / "checkpoints" / "4" / "meta" / "metadata").read_text())["devices"] == 8
    mesh1 = mesh_lib.make_mesh(1, 1, jax.devices()[:1])
    setup = state_lib.make_setup(config, mesh1)
    manager = ckpt.make_manager(full_run, async_save=False)
    try:
        step, state = ckpt.restore_latest(manager, setup.abstract)
    finally:
        manager.close()
    assert step == 4
    leaves = jax.tree.leaves(state)
    assert all(len(x.sharding.device_set) == 1 for x in leaves)
    from flax import nnx

    ref = _params(full_run)
    got = [np.asarray(x) for x in jax.tree.leaves(nnx.filter_state(state["model"], nnx.Param))]
    assert len(ref) == len(got) and all(np.array_equal(r, g) for r, g in zip(ref, got, strict=True))
    assert int(np.asarray(state["opt"]["step"][...])) == 4


def OVERRIDES_KEYS() -> list[str]:  # noqa: N802
    return [o[2:] for o in OVERRIDES]


def test_corrupt_latest_checkpoint_falls_back_and_stays(full_run, tmp_path, capfd):
    """Loading for inference skips a damaged newest step with one warning line and moves nothing."""
    wd = tmp_path / "corrupt"
    shutil.copytree(full_run, wd)
    for f in (wd / "checkpoints" / "4" / "model").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    # Reference: the step-2 parameters, read before the corruption is seen.
    from flax import nnx

    from lmdir_jax.train.checkpoints import load_for_inference

    model2, _ = load_for_inference(wd, step=2)
    want = [np.asarray(x) for x in jax.tree.leaves(nnx.state(model2, nnx.Param))]
    capfd.readouterr()
    got = _params(wd)
    err = capfd.readouterr().err
    warnings = [line for line in err.splitlines() if "lmdir: warning:" in line]
    assert len(warnings) == 1 and "step 4 (model/" in warnings[0] and "using step 2" in warnings[0], err
    assert all(np.array_equal(x, y) for x, y in zip(want, got, strict=True))
    assert not (wd / "checkpoints_corrupt").exists() and _steps(wd) == [2, 4]


def test_nan_loss_stops_cleanly(tmp_path, monkeypatch, capsys):
    """`lmdir train` (in this process) whose step-3 inputs the test makes NaN (tests/faults.py)."""
    from lmdir_jax.cli import main

    wd = tmp_path / "nan"
    faults.poison_cli(monkeypatch, 3)
    code = main(["train", "--config", "tiny", "--workdir", str(wd), "--no-progress", *OVERRIDES])
    err = capsys.readouterr().err
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("lmdir: error:")]
    assert len(errors) == 1 and "nan" in errors[0] and "step 3" in errors[0], err[-2000:]
    assert "Traceback" not in err
    steps = sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2]
    params = _params(wd)  # the last good checkpoint is intact and finite
    assert all(np.isfinite(p).all() for p in params)


def test_empty_source_fails_before_compiling(tmp_path, capsys):
    from lmdir_jax.cli import main

    (tmp_path / "empty").mkdir()
    code = main(["train", "--config", "tiny", "--workdir", str(tmp_path / "wd"),
                 f"--config.data.source={tmp_path / 'empty'}"])
    assert code == 2
    assert "lmdir: error:" in capsys.readouterr().err
    assert not (tmp_path / "wd" / "checkpoints").exists()


def test_psnr_loss_is_minus_mean_example_psnr_and_bad_loss_names_fail():
    import jax.numpy as jnp

    from lmdir_jax.config import load_config
    from lmdir_jax.metrics import psnr
    from lmdir_jax.train.step import make_train_step, psnr_loss

    rng = np.random.default_rng(0)
    gt = rng.random((2, 8, 8, 3)).astype(np.float32)
    out = np.clip(gt + rng.normal(0, [[[[0.01]]], [[[0.1]]]], gt.shape), 0, 1).astype(np.float32)
    want = -np.mean([psnr(out[i], gt[i]) for i in range(2)])
    assert float(psnr_loss(jnp.asarray(out), jnp.asarray(gt))) == pytest.approx(want, abs=1e-3)
    c = load_config("tiny", ["config.train.loss=l2"])
    with pytest.raises(ValueError, match="train.loss"):
        make_train_step(c, None)


def test_mislead_tells_only_wrong_kinds():
    """`priors.wrong_degradation`: the chosen examples get a vocabulary entry naming none of their
    kinds ('no degradation' only for a degraded one), the others keep their text, exactly."""
    import jax.numpy as jnp

    from lmdir_jax.degradations.label import KIND_INDEX, KINDS, vocabulary
    from lmdir_jax.train.step import mislead, vocabulary_kinds

    vocab = vocabulary()
    kinds = vocabulary_kinds(vocab)
    assert kinds.sum() == len(KINDS) and not kinds[0].any()  # 'clean' names no kind
    k, t, d, b = len(vocab), 5, 4, 400
    states = jnp.arange(k, dtype=jnp.float32)[:, None, None] + jnp.zeros((k, t, d))  # entry id
    masks = jnp.ones((k, t), bool)
    vector = np.zeros((b, len(KINDS)), np.float32)
    vector[0::3, KIND_INDEX["rain"]] = 0.5
    vector[1::3, KIND_INDEX["noise"]] = 0.5
    vector[1::3, KIND_INDEX["haze"]] = 0.3  # a mixture; rows 2::3 are clean
    own = jnp.full((b, t, d), -1.0)
    own_mask = jnp.zeros((b, t), bool).at[:, 0].set(True)
    out, out_mask = mislead(own, own_mask, jnp.asarray(vector), (states, masks, kinds),
                            jax.random.key(0), 0.5)
    entry = np.asarray(out)[:, 0, 0]
    told = entry >= 0
    assert 0.35 < told.mean() < 0.65  # about the ratio
    for i in np.flatnonzero(told):
        name = vocab[int(entry[i])][0]
        present = {KINDS[j] for j in np.flatnonzero(vector[i])}
        assert name not in present and (name != "clean" or present), (i, name, present)
        assert np.asarray(out_mask)[i].all()
    kept = ~told
    np.testing.assert_array_equal(np.asarray(out)[kept], np.asarray(own)[kept])
    np.testing.assert_array_equal(np.asarray(out_mask)[kept], np.asarray(own_mask)[kept])
    names = {vocab[int(e)][0] for e in entry[told]}
    assert {"clean", "haze", "blur", "jpeg"} <= names  # every wrong entry can be drawn
    same, _ = mislead(own, own_mask, jnp.asarray(vector), (states, masks, kinds), jax.random.key(0), 0.0)
    np.testing.assert_array_equal(np.asarray(same), np.asarray(own))


def test_auto_ratio_tells_what_the_automatic_mode_tells(clip_dir):
    """`priors.auto_ratio` 1: every example is told its most likely vocabulary entry's text, exactly
    what the automatic mode of `lmdir restore` tells the network for that image (not a blend of
    the entries' texts weighted by their probabilities)."""
    import jax.numpy as jnp

    from lmdir_jax.inference import build_priors as inference_priors
    from lmdir_jax.priors.clip import load_clip
    from lmdir_jax.train.step import build_priors

    c = load_config("tiny", ["config.priors.auto_ratio=1.0"])
    clip = load_clip(clip_dir, max_text_len=c.priors.max_text_len)
    s, b = clip.image_size, 6
    rng = np.random.default_rng(0)
    lq = (rng.random((b, 1, 1, 3)) * rng.random((b, s, s, 1))).astype(np.float32)  # tinted noise
    ids, mask = clip.tokenize(["gaussian noise"] * b)
    batch = {"lq": jnp.asarray(lq), "deg_ids": jnp.asarray(ids), "deg_tmask": jnp.asarray(mask)}
    got = build_priors(c, batch, clip, clip.params, jax.random.key(0))
    for i in range(b):
        want, _ = inference_priors(lq[i], c, clip, auto_caption=False)
        np.testing.assert_allclose(np.asarray(got.deg_states[i]), np.asarray(want.deg_states[0]), atol=1e-5)
        np.testing.assert_array_equal(np.asarray(got.deg_mask[i]), np.asarray(want.deg_mask[0]))


def test_drawn_states_follow_the_probabilities():
    """`drawn_states` tells each entry about as often as its probability, never a 0 one."""
    import jax.numpy as jnp

    from lmdir_jax.priors.clip import drawn_states

    k, t, n = 4, 3, 4000
    states = jnp.arange(k, dtype=jnp.float32)[:, None, None] * jnp.ones((k, t, 2))
    mask = jnp.arange(t)[None] <= jnp.arange(k)[:, None]  # entry j has j + 1 tokens
    weights = jnp.tile(jnp.asarray([[0.6, 0.0, 0.3, 0.1]]), (n, 1))
    got, got_mask = drawn_states(weights, states, mask, jax.random.key(0))
    picked = np.asarray(got[:, 0, 0]).astype(int)
    np.testing.assert_array_equal(np.asarray(got_mask), np.asarray(mask)[picked])
    share = np.bincount(picked, minlength=k) / n
    np.testing.assert_allclose(share, [0.6, 0.0, 0.3, 0.1], atol=0.03)


def test_auto_sample_tells_the_mistakes_of_an_uncertain_guess(clip_dir):
    """`priors.auto_sample`: an example is told an entry drawn with the automatic mode's
    probabilities, so an image whose most likely entry is far from sure is sometimes told
    another; the draw comes from the step's key (same key, same draw)."""
    import jax.numpy as jnp

    from lmdir_jax.priors.clip import load_clip
    from lmdir_jax.train.step import build_priors

    c = load_config("tiny", ["config.priors.auto_ratio=1.0", "config.priors.auto_sample=True"])
    clip = load_clip(clip_dir, max_text_len=c.priors.max_text_len)
    s, b = clip.image_size, 64
    lq = np.full((b, s, s, 3), 0.5, np.float32)  # one image, many times: one distribution
    ids, mask = clip.tokenize(["gaussian noise"] * b)
    batch = {"lq": jnp.asarray(lq), "deg_ids": jnp.asarray(ids), "deg_tmask": jnp.asarray(mask)}
    weights = clip.auto_degradation(lq[:1])[0]
    _, bank, _ = clip.degradation_bank()
    got = build_priors(c, batch, clip, clip.params, jax.random.key(0))
    again = build_priors(c, batch, clip, clip.params, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(got.deg_states), np.asarray(again.deg_states))
    entry = [int(np.argmin(np.abs(np.asarray(bank) - np.asarray(x)[None]).sum((1, 2))))
             for x in got.deg_states]
    for i, e in enumerate(entry):  # each example is told one vocabulary entry's text exactly
        np.testing.assert_allclose(np.asarray(got.deg_states[i]), np.asarray(bank[e]), atol=1e-5)
    assert float(weights.max()) < 0.9  # a random tiny CLIP is far from sure
    top = int(np.argmax(weights[0]))
    assert 0 < entry.count(top) < b  # told the most likely entry often, other entries too
    assert entry.count(top) / b > float(weights[0].max()) - 0.2


def _start(workdir: Path, cache: Path, extra: list[str] = (), **env: str) -> subprocess.Popen:
    """`lmdir train` in the background, progress lines on stderr (a pipe: no redraws)."""
    cmd = [sys.executable, "-m", "lmdir_jax.cli", "train", "--config", "tiny",
           "--workdir", str(workdir), *OVERRIDES, *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(cache, **env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _signal_when_started(proc: subprocess.Popen, sig: int) -> str:
    """Send `sig` once the loop announces its start (handlers installed); return all of stderr."""
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("train: starting at step"):
            proc.send_signal(sig)
            break
    _, rest = proc.communicate(timeout=1500)
    return "".join(lines) + rest


def _steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _stderr_has(path: Path, text: str):
    return lambda: path.is_file() and text in path.read_text(errors="replace")


def _metrics_lines(workdir: Path) -> int:
    path = workdir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _metrics_reached(workdir: Path, step: int, skip: int):
    """True once metrics.jsonl, past its first `skip` lines (earlier runs), logs `step`."""

    def ready() -> bool:
        path = workdir / "metrics.jsonl"
        if not path.is_file():
            return False
        for line in path.read_text().splitlines()[skip:]:
            try:
                if json.loads(line).get("step", 0) >= step:
                    return True
            except ValueError:  # a line being written
                pass
        return False

    return ready


def _kill_run(workdir: Path, cache: Path, when, name: str) -> str:
    """Start `lmdir train`, SIGKILL it from outside once `when(stderr file)` holds; its stderr."""
    err = workdir.parent / f"{name}.stderr"
    cmd = [sys.executable, "-m", "lmdir_jax.cli", "train", "--config", "tiny",
           "--workdir", str(workdir), *OVERRIDES]
    with open(err, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(cache), stdout=subprocess.DEVNULL, stderr=f,
                                start_new_session=True)
        killed = faults.kill_when(proc, when(err))
    text = err.read_text()
    assert killed and proc.returncode == -signal.SIGKILL, text[-3000:]
    return text


@pytest.mark.slow
def test_killed_at_any_moment_resumes_bit_identical(full_run, tmp_path, cache_dir):
    """Real signals to a real `lmdir train` (4 steps, checkpoints at 2 and 4): SIGTERM (what a
    scheduler sends before preempting) saves the step it finished and exits 130; then three
    SIGKILLs from outside: while orbax writes step 2 asynchronously (seen by its temporary folder
    filling, not waited for), during start-up right after the restore, and between saves (step 3
    done, step 2 committed). The run resumed after all of them ends with the uninterrupted run's
    parameters, bit for bit. (SIGINT goes through the same handler: tests/test_train_actions.py.)"""
    wd = tmp_path / "signals"
    ck = wd / "checkpoints"
    proc = _start(wd, cache_dir)
    err = _signal_when_started(proc, signal.SIGTERM)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted at step 1; checkpoint saved" in err and "Traceback" not in err
    assert _steps(wd) == [1]
    records = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1]

    _kill_run(wd, cache_dir, lambda err: faults.saving(ck, 2), "mid_save")
    assert _steps(wd) == [1] and list(ck.glob("2.orbax-checkpoint-tmp*"))  # half-written, not committed

    err = _kill_run(wd, cache_dir, lambda err: _stderr_has(err, "train: starting at step"), "start_up")
    assert "train: starting at step 1/4" in err
    assert _steps(wd) == [1]

    done = _metrics_lines(wd)
    _kill_run(wd, cache_dir, lambda err: lambda: faults.committed(ck, 2)() and _metrics_reached(wd, 3, done)(),
              "between_saves")
    assert _steps(wd) == [1, 2]

    r = _cli(wd, cache_dir)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "warning" not in r.stderr and not (wd / "checkpoints_corrupt").exists()
    assert _steps(wd)[-1] == 4 and not list(ck.glob("*.orbax-checkpoint-tmp*"))  # half-saves removed
    assert not (wd / "plots").exists()  # train.plot_every=-1: no plots at all
    a, b = _params(full_run), _params(wd)
    assert len(a) == len(b) > 10
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    # and training did move the parameters away from the initialisation
    assert not all(np.array_equal(x, y) for x, y in zip(a, _params_at_init(), strict=True))


@pytest.mark.slow
def test_resume_on_another_device_count(full_run, tmp_path, cache_dir):
    """Steps 1-2 on 8 devices, steps 3-4 resumed on 1 device: the uninterrupted 8-device run's
    parameters within 4e-4 absolute, and within 1e-5 on average. This is also the test that a
    (data=4, fsdp=2) mesh and one device train the same network (the sharded layout itself:
    tests/test_scale.py). One device runs other CPU kernels,
    and Adam's normalised update can turn a tiny gradient difference into up to one lr-sized step
    (lr = 2e-4) per resumed step, so 2 x lr bounds any single parameter (measured: 6.1e-5 and
    1.6e-4 in two runs, on 1 of 288 elements); the mean bound catches a wrong resume."""
    wd = tmp_path / "devices"
    shutil.copytree(full_run, wd)
    shutil.rmtree(wd / "checkpoints" / "4")
    r = _cli(wd, cache_dir, XLA_FLAGS=_xla_flags(1))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((wd / "checkpoints" / "4" / "meta" / "metadata").read_text())["devices"] == 1
    a, b = _params(full_run), _params(wd)
    assert len(a) == len(b) > 10
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(y, x, rtol=0, atol=4e-4)
    diffs = np.concatenate([np.abs(np.asarray(y) - np.asarray(x)).ravel() for x, y in zip(a, b, strict=True)])
    assert diffs.mean() < 1e-5, diffs.mean()


def test_resume_with_another_model_is_refused_before_writing(full_run, tmp_path, capsys):
    from lmdir_jax.cli import main

    wd = tmp_path / "changed"
    shutil.copytree(full_run, wd)
    before = {p: p.read_bytes() for p in wd.rglob("*") if p.is_file()}
    code = main(["train", "--config", "tiny", "--workdir", str(wd), *OVERRIDES,
                 "--config.model.width=8", "--config.seed=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "model.width: 4 -> 8" in err[0] and "seed: 0 -> 1" in err[0]
    assert {p: p.read_bytes() for p in wd.rglob("*") if p.is_file()} == before
    # Forced, the checkpoint still does not fit: one line again, never treated as corruption.
    code = main(["train", "--config", "tiny", "--workdir", str(wd), *OVERRIDES,
                 "--config.model.width=8", "--config.train.allow_config_change=True"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "does not fit the config" in err[0], err
    assert not (wd / "checkpoints_corrupt").exists() and _steps(wd) == [2, 4]
    assert json.loads((wd / "config.json").read_text())["model"]["width"] == 4


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_cmd(n: int, workdir: Path, cache: Path) -> tuple[list[str], dict]:
    cmd = ["bash", str(REPO / "scripts" / "launch_local.sh"), str(n), "tiny", str(workdir),
           "--no-progress", *OVERRIDES]
    extra = dict(PYTHON=sys.executable, LMDIR_PORT=str(_free_port()), LMDIR_DEVICES_PER_PROCESS="4",
                 XLA_FLAGS=_xla_flags(None))
    return cmd, _env(cache, **extra)


def _launch(n: int, workdir: Path, cache: Path) -> subprocess.CompletedProcess:
    """scripts/launch_local.sh: n processes x 4 emulated CPU devices on 127.0.0.1."""
    cmd, env = _launch_cmd(n, workdir, cache)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)


@pytest.mark.slow
def test_two_processes_kill_resume_equal_one_process(full_run, tmp_path, cache_dir):
    """2 processes x 4 CPU devices (jax.distributed, gloo), each reading its own data shard; both
    killed (SIGKILL from outside) once checkpoint 2 is committed, resumed to step 4: the 1-process
    8-device run's parameters within 1e-5 (the global batch holds the same examples; reductions
    may run in another order)."""
    wd = tmp_path / "two"
    cmd, env = _launch_cmd(2, wd, cache_dir)
    with open(tmp_path / "two.stderr", "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True)
        killed = faults.kill_when(proc, faults.committed(wd / "checkpoints", 2))
    log1 = (wd / "logs" / "process_1.log").read_text()
    assert killed and _steps(wd) == [2], (tmp_path / "two.stderr").read_text()[-3000:] + log1[-3000:]
    meta = json.loads((wd / "checkpoints" / "2" / "meta" / "metadata").read_text())
    assert meta["devices"] == 8
    data = sorted(p.name for p in (wd / "checkpoints" / "2" / "data").glob("process_*.json"))
    assert len(data) == 2 and data[0] != data[1]  # one iterator state per process
    r = _launch(2, wd, cache_dir)
    log1 = (wd / "logs" / "process_1.log").read_text()
    assert r.returncode == 0, r.stderr[-3000:] + log1[-3000:]
    assert _steps(wd) == [2, 4]
    a, b = _params(full_run), _params(wd)
    assert len(a) == len(b) > 10
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5)
