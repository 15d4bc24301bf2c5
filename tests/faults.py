"""Fault injection for the training tests; the product has no hooks for it.

- `PoisonBatchAtStep(n)`: an extra training action (train(..., actions=[...]), or `poison_cli`
  for `lmdir train` run in-process) whose step-n inputs are NaN.
- `kill_when(proc, ready)`: SIGKILL a running `lmdir train` subprocess from outside as soon as
  `ready()` holds (polled every 2 ms), e.g. while orbax is writing a checkpoint
  (`saving(checkpoints, step)`: its temporary folder holds files).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lmdir_jax.train.actions import Action


class PoisonBatchAtStep(Action):
    """The inputs of step `step` become NaN."""

    def __init__(self, step: int):
        self.step = int(step)

    def before_step(self, run, batch: dict) -> dict:
        if run.step + 1 == self.step:
            return dict(batch, lq=np.full_like(batch["lq"], np.nan))
        return batch


def poison_cli(monkeypatch, step: int) -> None:
    """Make `lmdir train` (cli.main in this process) poison step `step`'s batch."""
    from lmdir_jax.train import loop

    default = loop.default_actions
    monkeypatch.setattr(loop, "default_actions",
                        lambda config, progress=True, **kw: [*default(config, progress, **kw),
                                                              PoisonBatchAtStep(step)])


def saving(checkpoints: Path, step: int) -> Callable[[], bool]:
    """True while orbax writes step `step`: its temporary folder exists and holds a file."""

    def ready() -> bool:
        for tmp in checkpoints.glob(f"{step}.orbax-checkpoint-tmp*"):
            try:
                if any(p.is_file() for p in tmp.rglob("*")):
                    return True
            except FileNotFoundError:  # renamed while listing: the save just committed
                pass
        return False

    return ready


def committed(checkpoints: Path, step: int) -> Callable[[], bool]:
    """True once step `step` is a committed checkpoint (its final folder exists)."""
    return lambda: (checkpoints / str(step)).is_dir()


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 1200) -> bool:
    """SIGKILL `proc` (and its process group when it leads one) once `ready()` holds; False when
    the process ended first. Waits for the process to be gone either way."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if ready():
            try:
                if os.getpgid(proc.pid) == proc.pid:
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    proc.kill()
            except ProcessLookupError:
                pass
            proc.wait()
            return True
        time.sleep(0.002)
    proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    return False
