"""kill -9 at any moment, then a rerun: `lmdir degrade` on a folder and `lmdir priors build` end with
exactly the files of an uninterrupted run, and no partial file is counted as done.

The commands run as subprocesses; the test watches their output folder and sends SIGKILL when the
n-th finished file appears (from outside: the product has no fault-injection hook)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lmdir_jax.data.io import write_image
from lmdir_jax.priors.cache import MANIFEST

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _lmdir(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmdir_jax.cli", *args]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO))


def _tree(root: Path) -> dict[str, bytes]:
    """Every file under root (relative name -> bytes)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _count(folder: Path, pattern: str) -> int:
    return sum(1 for _ in folder.glob(pattern)) if folder.is_dir() else 0


def _kill_when(cmd: list[str], folder: Path, pattern: str, n: int, timeout: float = 300) -> bool:
    """Run cmd; SIGKILL it as soon as `n` files matching pattern exist in folder. True when the kill
    landed before the command finished."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if _count(folder, pattern) >= n:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode == -signal.SIGKILL


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(40):
        write_image(root / f"{'sub/' if i % 3 == 0 else ''}p{i:02d}.png", rng.random((96, 80, 3)))
    return root


def test_degrade_killed_at_any_moment_resumes_to_the_uninterrupted_result(photos, tmp_path):
    args = ["degrade", str(photos), "--spec", "rain+haze+noise:15", "--seed", "5", "--output"]
    _run(_lmdir(*args, str(tmp_path / "once")))
    expected = _tree(tmp_path / "once")
    assert "labels.jsonl" in expected and len(expected) == 41

    out = tmp_path / "killed"
    landed = [_kill_when(_lmdir(*args, str(out)), out, "**/*.png", n) for n in (1, 12, 30)]
    assert any(landed), "every run finished before its kill: nothing was tested"
    partial = _tree(out)
    assert "labels.jsonl" not in partial  # an unfinished run never leaves a label file
    assert all(len(json.loads(line)) == 2 for line in (out / "labels.partial.jsonl").read_text().splitlines()[:-1])
    _run(_lmdir(*args, str(out)))
    assert _tree(out) == expected  # byte for byte, no temporary or journal left


def _manifest_without_timings(path: Path) -> dict:
    m = json.loads(path.read_text())
    m["summary"].pop("seconds")
    m["summary"].pop("resumed_items")
    return m


def test_prior_cache_build_killed_at_any_moment_resumes_to_the_uninterrupted_result(photos, tmp_path):
    _run(_lmdir("priors", "make-tiny", str(tmp_path / "tiny")))
    args = ["priors", "build", "--data", str(photos), "--clip", str(tmp_path / "tiny" / "clip"),
            "--sd", str(tmp_path / "tiny" / "sd"), "--steps", "2", "--ref-size", "16", "--batch", "4",
            "--max-items", "16", "--seed", "3", "--output"]
    _run(_lmdir(*args, str(tmp_path / "once")))
    expected = _tree(tmp_path / "once")
    assert sum(k.startswith("items/") for k in expected) == 16
    assert sum(k.startswith("references/") for k in expected) == 16

    out = tmp_path / "killed"
    landed = [_kill_when(_lmdir(*args, str(out)), out / "items", "*.npz", n) for n in (1, 6, 11)]
    assert any(landed), "every build finished before its kill: nothing was tested"
    _run(_lmdir(*args, str(out)))
    got = _tree(out)
    assert got.keys() == expected.keys()
    for name in expected:
        if name != MANIFEST:
            assert got[name] == expected[name], name
    assert _manifest_without_timings(out / MANIFEST) == _manifest_without_timings(tmp_path / "once" / MANIFEST)
