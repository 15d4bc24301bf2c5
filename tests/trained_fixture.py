"""A small trained workdir shared by the restore/evaluate CLI tests: trained once, then cached.

`trained_workdir` trains configs/tiny.py (width 8, 300 steps, EMA, one validation on the held-out
skimage photos at the end; on noise and rain only, with a tiny
random CLIP so the degradation text reaches the network) through `lmdir train` in a subprocess
on one CPU device. Whether so small and short a run learns to use the degradation text depends on
its initial draw: of seven runs measured (seeds 0-2 at 150 steps, 0-1 at 300, 1-2 at 600), two
gained more than 0.3 dB from being told "noise" over blind; seed 0 at 300 steps +0.75 dB, told the
wrong text -0.33 dB. The fixture is that run, so the quality tests can check that the text reaches
the network through `restore` and `evaluate`.

The run is cached under `.pytest_cache/trained-fixture/<hash>`, the hash covering the package's
code, configs/tiny.py and the overrides below, so reruns reuse it; a file lock makes pytest-xdist
workers wait for one training instead of starting their own.

Import the fixtures into a test module with `trained_workdir = trained_fixture.trained_workdir`
(and `trained_clip`).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CACHE_ROOT = REPO / ".pytest_cache" / "trained-fixture"
TASKS = ("noise", "rain")  # what the network is trained on (and the quality tests check)
OVERRIDES = [
    "--config.train.steps=300",
    "--config.train.lr=3e-3",
    "--config.train.warmup_steps=10",
    "--config.train.ckpt_every=300",
    "--config.train.log_every=50",
    "--config.seed=0",  # the seed decides whether it learns to use the text (module doc)
    "--config.train.plot_every=300",  # plots/loss.png and plots/val_000300.png at the end
    "--config.train.val_every=300",
    "--config.train.ema_decay=0.9",  # restore uses the EMA parameters
    "--config.model.width=8",
    # Unscanned blocks: the restore/export CLI tests then cover that layout (tests/test_scale.py
    # covers the scanned one).
    "--config.model.scan_blocks=False",
    "--config.data.val_source=skimage-heldout",
    "--config.data.val_size=48",
    "--config.data.val_max_images=2",
    "--config.data.mix_prob=0.0",
    # The texts of the measured runs above: each example its label's canonical text or a random
    # phrasing of it, none told its nouns alone (the draw of texts decides the run as well).
    "--config.data.noun_text=0.0",
    *(f"--config.data.tasks.{k}={1.0 if k in TASKS else 0.0}"
      for k in ("noise", "blur", "jpeg", "rain", "haze", "lowlight", "downsample", "snow")),
]


def fixture_key() -> str:
    """Hash of everything that decides the trained parameters: code, tiny config, overrides."""
    h = hashlib.sha256()
    files = sorted((REPO / "lmdir_jax").rglob("*.py")) + [REPO / "configs" / "tiny.py", Path(__file__)]
    for f in files:
        h.update(f.relative_to(REPO).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _train(folder: Path) -> None:
    from lmdir_jax.priors.tiny import save_tiny_clip

    clip = save_tiny_clip(folder / "clip", text_dim=32)
    tmp = folder / "wd.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               XLA_FLAGS="--xla_force_host_platform_device_count=1 "
               + os.environ.get("LMDIR_TEST_XLA_FLAGS", ""))
    cmd = [sys.executable, "-m", "lmdir_jax.cli", "train", "--config", "tiny",
           "--workdir", str(tmp), "--no-progress", *OVERRIDES, f"--config.priors.clip={clip}"]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    tmp.rename(folder / "wd")  # atomic: a `wd` folder is a finished run


def cached_trained_run() -> Path:
    """The cached run folder (`wd/` = the workdir, `clip/` = its CLIP), training it if needed."""
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    folder = CACHE_ROOT / fixture_key()
    with open(CACHE_ROOT / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one trainer; other xdist workers wait, then reuse it
        try:
            if not (folder / "wd" / "config.json").is_file():
                _train(folder)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return folder


@pytest.fixture(scope="session")
def trained_workdir() -> Path:
    """A workdir trained on noise and rain (tiny model) whose config names `trained_clip`."""
    return cached_trained_run() / "wd"


@pytest.fixture(scope="session")
def trained_clip(trained_workdir) -> Path:
    """The tiny random CLIP the trained workdir was trained with."""
    return trained_workdir.parent / "clip"
