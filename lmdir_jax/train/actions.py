"""Periodic actions of the training loop: logging, NaN stop, progress, checkpoints, validation,
plots, signals.

`loop.run_loop` calls, for every action in order:
- `start(run)` once before the first step,
- `before_step(run, batch) -> batch` with each per-host batch,
- `__call__(run)` after each step where `due(run)` (every `every` steps; 0 = never),
- `on_metrics(run, records)` whenever device metrics are fetched (`run.flush()`),
- `on_end(run)` after the last step (not when training raised), `close(run)` always.
Each action is small and testable on its own with a stand-in `Run`. StopOnSignal, StopOnNonFinite,
LogMetrics, Progress and Checkpoint serve every model trained here; Validate and Plot show the
restoration network (the controller adds its own, train/controller_train.py).
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from lmdir_jax.progress import is_terminal
from lmdir_jax.train import checkpoints as ckpt
from lmdir_jax.train import monitor
from lmdir_jax.train.step import pop_source_losses
from lmdir_jax.workdir import TRAIN_GRID, VAL_GRID, grid_name

if TYPE_CHECKING:
    import orbax.checkpoint as ocp
    from ml_collections import ConfigDict

    from lmdir_jax.priors.clip import ClipPrior

Record = tuple[int, dict]  # (step, {metric name: float, or an array for per-example values})


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the run stopped without saving the bad state."""


class MetricsWriter(Protocol):
    """Where logged scalars go (`monitor.Logger`: metrics.jsonl and TensorBoard)."""

    def write(self, step: int, scalars: dict) -> None: ...


@dataclasses.dataclass
class Run:
    """What the actions of one training run share (mutable as training goes)."""

    workdir: Path
    total: int  # the step to stop at
    step: int  # steps done (the resumed step at the start)
    state: dict[str, Any] = dataclasses.field(default_factory=dict)  # model, opt[, ema] pytrees
    batch_size: int = 1  # examples per step, all processes (images/s)
    iterator: Iterator[Any] | None = None  # the data iterator whose position checkpoints save (grain's)
    manager: ocp.CheckpointManager | None = None
    mesh: jax.sharding.Mesh | None = None
    logger: MetricsWriter | None = None
    actions: list[Action] = dataclasses.field(default_factory=list)
    last_saved: int = -1  # step of the last checkpoint written or restored (-1: none)
    last_batch: dict[str, np.ndarray] | None = None  # the last step's per-host batch
    pending: list[Record] = dataclasses.field(default_factory=list)  # device metrics not fetched
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # last logged window means
    images_per_s: float = float("nan")
    stop: bool = False
    interrupted: bool = False  # stopped by a signal
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def loss(self) -> float:
        """The mean loss of the last logged window (NaN before the first)."""
        return float(self.metrics.get("loss", float("nan")))

    def flush(self) -> list[Record]:
        """Fetch the pending device metrics and hand them to every action's `on_metrics`."""
        if not self.pending:
            return []
        fetched = jax.device_get([m for _, m in self.pending])
        records = [(s, {k: float(v) if np.ndim(v) == 0 else np.asarray(v) for k, v in m.items()})
                   for (s, _), m in zip(self.pending, fetched, strict=True)]
        self.pending = []
        for action in self.actions:
            action.on_metrics(self, records)
        return records

    def close(self) -> None:
        """Wait for the last checkpoint, then close the manager, the data iterator (grain's prefetch
        threads and worker processes) and the logger."""
        if self.manager is not None:
            self.manager.wait_until_finished()
            self.manager.close()
        if hasattr(self.iterator, "close"):
            self.iterator.close()
        if hasattr(self.logger, "close"):
            self.logger.close()


class Action:
    """Base: does nothing; subclasses override the hooks they need."""

    every: int = 0

    def due(self, run: Run) -> bool:
        return self.every > 0 and run.step % self.every == 0

    def start(self, run: Run) -> None:
        pass

    def before_step(self, run: Run, batch: dict) -> dict:
        return batch

    def __call__(self, run: Run) -> None:
        pass

    def on_metrics(self, run: Run, records: list[Record]) -> None:
        pass

    def on_end(self, run: Run) -> None:
        pass

    def close(self, run: Run) -> None:
        pass


class StopOnNonFinite(Action):
    """A NaN/inf loss stops the run (TrainingDiverged) before anything saves the bad state."""

    def on_metrics(self, run: Run, records: list[Record]) -> None:
        for step, m in records:
            if not math.isfinite(m["loss"]):
                good = "none" if run.last_saved < 0 else f"step {run.last_saved}"
                raise TrainingDiverged(
                    f"loss became {m['loss']} at step {step}; stopped without saving "
                    f"(last good checkpoint: {good})"
                )


class LogMetrics(Action):
    """Every `every` steps: fetch metrics, write the window means of the scalar ones and images/s
    to the logger; with `source_names` (data.sources, in source_id order) also each source's loss."""

    def __init__(self, every: int, source_names: list[str] | tuple[str, ...] = ()):
        self.every = max(1, int(every))
        self.source_names = list(source_names)
        self._t = time.perf_counter()
        self._n = 0

    def start(self, run: Run) -> None:
        self._t, self._n = time.perf_counter(), 0

    def __call__(self, run: Run) -> None:
        run.flush()

    def on_metrics(self, run: Run, records: list[Record]) -> None:
        now = time.perf_counter()
        run.images_per_s = len(records) * run.batch_size / max(now - self._t, 1e-9)
        self._t = now
        per_source = pop_source_losses([dict(m) for _, m in records], self.source_names)
        means = {k: float(np.mean([m[k] for _, m in records]))
                 for k, v in records[0][1].items() if np.ndim(v) == 0}
        run.metrics = means
        if run.logger is not None:
            run.logger.write(records[-1][0], {**means, **per_source, "images_per_s": run.images_per_s})


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress(Action):
    """Progress on `stream` (process 0): a tqdm bar on a terminal; otherwise one line every
    `interval` seconds (step, loss, images/s, ETA) and a last one at the end, no redraws. `desc`
    starts each line (and names the bar)."""

    every = 1

    def __init__(self, enabled: bool = True, stream=None, interval: float = 10.0, desc: str = "train"):
        self.enabled = enabled
        self.desc = desc
        self.stream = stream
        self.interval = float(interval)
        self.bar = None
        self._last_line = 0.0
        self._first: tuple[float, int] | None = None

    def start(self, run: Run) -> None:
        self.stream = self.stream or sys.stderr
        self.enabled = self.enabled and monitor.is_main()
        self._first, self._last_line = None, time.perf_counter()
        if self.enabled and is_terminal(self.stream):
            self.bar = tqdm(total=run.total, initial=run.step, desc=self.desc, unit="step",
                            dynamic_ncols=True, file=self.stream)
        elif self.enabled:
            self.stream.write(f"{self.desc}: starting at step {run.step}/{run.total} (the first step compiles)\n")
            self.stream.flush()

    def __call__(self, run: Run) -> None:
        if not self.enabled:
            return
        if self._first is None:  # ETA from the steps after the first (which includes compiling)
            self._first = (time.perf_counter(), run.step)
        if self.bar is not None:
            self.bar.update(run.step - self.bar.n)
        elif time.perf_counter() - self._last_line >= self.interval:
            self.line(run)

    def on_metrics(self, run: Run, records: list[Record]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{run.loss:.4f}", img_s=f"{run.images_per_s:.1f}", refresh=False)

    def line(self, run: Run) -> None:
        """Write one progress line now."""
        now = time.perf_counter()
        t0, s0 = self._first or (now, run.step)
        done = run.step - s0
        eta = (run.total - run.step) * (now - t0) / done if done > 0 else float("nan")
        # Before the first logged window there is no loss to show yet: '-', not 'nan'.
        loss = "-" if math.isnan(run.loss) else f"{run.loss:.4f}"
        speed = "-" if math.isnan(run.images_per_s) else f"{run.images_per_s:.1f}"
        self.stream.write(
            f"{self.desc}: step {run.step}/{run.total} loss {loss} {speed} images/s ETA {_clock(eta)}\n"
        )
        self.stream.flush()
        self._last_line = now

    def on_end(self, run: Run) -> None:
        if self.enabled and self.bar is None:
            self.line(run)

    def close(self, run: Run) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Checkpoint(Action):
    """Every `every` steps (not the last) and at the end: an asynchronous orbax checkpoint of
    `run.state`, the data position of `run.iterator`, and meta (the mesh's shape and `meta`)."""

    def __init__(self, every: int, meta: dict | None = None):
        self.every = int(every)
        self.meta = dict(meta or {})

    def due(self, run: Run) -> bool:
        return super().due(run) and run.step < run.total

    def __call__(self, run: Run) -> None:
        self.save(run)

    def save(self, run: Run) -> None:
        run.flush()  # a diverged state raises here and is never saved
        meta = {"mesh": list(run.mesh.shape.values())} if run.mesh is not None else {}
        ckpt.save(run.manager, run.step, run.state, run.iterator, meta={**meta, **self.meta})
        run.last_saved = run.step

    def on_end(self, run: Run) -> None:
        if run.last_saved != run.step:
            self.save(run)


class Validate(Action):
    """Every `every` steps: PSNR/SSIM on data.val_source, logged, with plots/val_STEP.png."""

    def __init__(self, every: int, config: ConfigDict, predictor: monitor.Predictor | None):
        self.every = int(every)
        self.config = config
        self.predictor = predictor

    def __call__(self, run: Run) -> None:
        run.flush()
        scalars, rows = monitor.validate(self.config, run.state, self.predictor)
        if scalars:
            run.logger.write(run.step, scalars)
            run.summary.update(scalars)
            monitor.save_grid(run.workdir, grid_name(VAL_GRID, run.step), rows)


class Plot(Action):
    """Every `every` steps and at the end: plots/loss.png and a grid of training patches.
    every=0: at the end only; every<0: never (no matplotlib, no extra forward pass). The grid is
    the restoration network's (`predictor`, with `clip` for the degradation texts)."""

    def __init__(self, every: int, predictor: monitor.Predictor | None = None,
                 clip: ClipPrior | None = None):
        self.every = int(every)
        self.predictor = predictor
        self.clip = clip

    def __call__(self, run: Run) -> None:
        run.flush()
        monitor.plot_loss(run.workdir)
        self.grid(run)

    def grid(self, run: Run) -> None:
        if run.last_batch is not None and self.predictor is not None:
            rows = monitor.train_rows(self.predictor, run.state, run.last_batch, self.clip)
            monitor.save_grid(run.workdir, grid_name(TRAIN_GRID, run.step), rows)

    def on_end(self, run: Run) -> None:
        if self.every < 0:
            return
        monitor.plot_loss(run.workdir)
        if not run.interrupted:
            self.grid(run)


class StopOnSignal(Action):
    """SIGINT/SIGTERM: finish the current step, then stop (the end checkpoint saves it) at the
    first step that is a multiple of `every` (a run whose data can resume only there).

    A second signal gives up at once (KeyboardInterrupt). With several processes the stop is
    agreed on every `every` steps (a signal reaching one process stops all at the same step).
    """

    def __init__(self, every: int = 1):
        self.every = max(1, int(every))
        self.signal: int | None = None
        self._old: dict = {}
        self._processes = 1

    def start(self, run: Run) -> None:
        self._processes = jax.process_count()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    def __call__(self, run: Run) -> None:
        stop = self.signal is not None
        if self._processes > 1:
            stop = bool(np.max(multihost_utils.process_allgather(np.int32(stop))))
        if stop:
            run.stop = run.interrupted = True

    def close(self, run: Run) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
