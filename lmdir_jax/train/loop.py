"""The training loop, `run_loop(run, step_fn, batches)`, and the restoration network's training,
`train(config, workdir) -> dict`.

`run_loop` knows no model: it takes host batches from an iterator, calls a step function and the
periodic actions of train/actions.py (logs, NaN stop, progress, checkpoints, signals, ...). Each
trained model builds its pieces (state, step function, batch stream, actions) and calls it: `train`
here, `train.controller_train.train_controller` for the degradation controller.

`train`: data (grain) -> global sharded batch -> jitted step -> actions (those above, validation,
plots). Rerunning the same command on the same workdir resumes from the newest usable checkpoint
(model, optimizer, EMA, data position), after checking that the config still describes the same
run (checkpoints.check_resume_config). A run starts at step 0 only in a workdir without
checkpoints, or when asked to (`restart`).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from lmdir_jax.data.pipeline import make_train_iterator, source_names
from lmdir_jax.errors import UsageError
from lmdir_jax.outputs import check_workdir  # noqa: F401  (re-exported)
from lmdir_jax.priors.cache import PriorCache
from lmdir_jax.priors.clip import load_clip
from lmdir_jax.priors.config import check_shares
from lmdir_jax.train import checkpoints as ckpt
from lmdir_jax.train import distributed
from lmdir_jax.train import mesh as mesh_lib
from lmdir_jax.train import state as state_lib
from lmdir_jax.train import step as step_lib
from lmdir_jax.train.actions import (  # noqa: F401  (re-exported)
    Action,
    Checkpoint,
    LogMetrics,
    Plot,
    Progress,
    Run,
    StopOnNonFinite,
    StopOnSignal,
    TrainingDiverged,
    Validate,
)
from lmdir_jax.train.controller import attach_from_config
from lmdir_jax.train.monitor import Logger, Predictor, is_main, plot_loss, read_metrics, validate  # noqa: F401
from lmdir_jax.workdir import (
    checkpoints_dir,
    config_file,
    config_to_json,
    corrupt_dir,
    previous_run_dir,
)

Batch = dict[str, Any]  # one host's batch: numpy arrays (and strings)
StepFn = Callable[[dict, Batch], tuple[dict, dict]]  # (state, host batch) -> (state, device metrics)


def write_config(config, workdir: Path) -> None:
    """WORKDIR/config.json: the resolved config (what load_for_inference rebuilds the model from)."""
    if is_main():
        workdir.mkdir(parents=True, exist_ok=True)
        path = config_file(workdir)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(config_to_json(config))
        os.replace(tmp, path)


def _load_clip(config):
    if not str(config.priors.clip):
        return None, None
    clip = load_clip(str(config.priors.clip), max_text_len=int(config.priors.max_text_len))
    clip.check_text_dim(int(config.model.text_dim))
    attach_from_config(clip, config)  # train.controller: auto_ratio uses the trained controller
    return clip, clip.params


def _prior_cache(config):
    if not str(config.priors.cache):
        return None
    return PriorCache(str(config.priors.cache))


def set_aside_for_restart(workdir: Path) -> Path | None:
    """Move WORKDIR/checkpoints and WORKDIR/checkpoints_corrupt into WORKDIR/previous_run[.N]/
    (nothing is deleted), so that a run can start again at step 0. Returns that folder, or None
    when there was nothing to move."""
    found = [d for d in (checkpoints_dir(workdir), corrupt_dir(workdir)) if d.exists()]
    dst = ckpt.unique_path(previous_run_dir(workdir))
    ckpt.sync("lmdir_restart_listed")  # every process has looked before process 0 moves anything
    if not found:
        return None
    for d in found:
        ckpt.set_aside(d, dst / d.name)
    return dst


def _restore_or_init(config, setup, manager, iterator, workdir: Path) -> tuple[int, dict, bool]:
    """(start step, state, restored?) from the newest usable checkpoint, or a fresh state when
    the workdir holds no checkpoint at all. Steps shown to be damaged are moved to
    WORKDIR/checkpoints_corrupt/ (one warning line); when none is usable the run stops
    (CheckpointError) instead of starting again at step 0."""
    restored, damaged = ckpt.restore_newest(manager, setup.abstract, iterator, set_aside=True)
    if damaged and restored is not None:
        ckpt.warn(f"damaged checkpoint(s) in {manager.directory}: {ckpt.describe_damage(damaged)}; "
                   f"resuming from step {restored[0]}")
    if restored is None:
        corrupt = corrupt_dir(workdir)
        if damaged or (corrupt.is_dir() and any(corrupt.iterdir())):
            now = f": {ckpt.describe_damage(damaged)}" if damaged else ""
            raise ckpt.CheckpointError(
                f"no usable checkpoint in {manager.directory} (damaged steps are in {corrupt}{now}); "
                "training does not start again at step 0 by itself: rerun with --restart (train(..., "
                "restart=True)) to start at step 0, keeping the old checkpoints in "
                f"{previous_run_dir(workdir)}, or use a new --workdir"
            )
        return 0, state_lib.init_state(config, setup), False
    start, state = restored
    if setup.use_ema and "ema" not in state:  # EMA switched on since: it starts from the params
        state["ema"] = jax.jit(lambda s: s, out_shardings=setup.shardings["ema"])(
            nnx.filter_state(state["model"], nnx.Param)
        )
    if not setup.use_ema:
        state.pop("ema", None)
    return start, state, True


def _compile(step_fn, *args):
    """The step compiled for these arguments; with several processes, all wait until all have
    compiled (see distributed.barrier)."""
    if jax.process_count() == 1:
        return step_fn
    compiled = step_fn.lower(*args).compile()
    distributed.barrier("lmdir_train_step_compiled")
    return compiled


def run_loop(run: Run, step_fn: StepFn, batches: Iterator[Batch]) -> None:
    """Step until `run.total` or an action sets `run.stop`; the actions do everything else.

    Each step takes the next host batch of `batches` (passed through every action's
    `before_step`), runs `run.state, metrics = step_fn(run.state, batch)` and calls the due
    actions; the metrics stay on the device until an action fetches them (`run.flush`). At the end
    the rest are fetched and every action's `on_end` runs; `close` runs always.
    """
    try:
        for action in run.actions:
            action.start(run)
        while run.step < run.total and not run.stop:
            local = next(batches)
            for action in run.actions:
                local = action.before_step(run, local)
            run.state, metrics = step_fn(run.state, local)
            run.step += 1
            run.pending.append((run.step, metrics))
            run.last_batch = local
            for action in run.actions:
                if action.due(run):
                    action(run)
        run.flush()
        for action in run.actions:
            action.on_end(run)
    finally:
        for action in run.actions:
            action.close(run)


def restoration_step(config, setup: state_lib.TrainSetup, mesh, clip=None, clip_params=None) -> StepFn:
    """The restoration network's `step_fn(state, host batch)` for `run_loop`: the host batch made
    global over `mesh` (with the CLIP tokens of its degradation texts), the jitted train step
    (compiled on the first call), and this host's `source_id` added to the metrics."""
    train_step = step_lib.reusable_train_step(config, setup, clip)
    compiled = None

    def step(state: dict, local: Batch) -> tuple[dict, dict]:
        nonlocal compiled
        batch = mesh_lib.global_batch(local, mesh)
        if clip is not None:
            batch.update(mesh_lib.global_batch(step_lib.host_tokens(clip, local["deg_text"]), mesh))
        if compiled is None:
            compiled = _compile(train_step, state, batch, clip_params)
        state, metrics = compiled(state, batch, clip_params)
        if "source_id" in local:  # this host's source of each example (per-source loss)
            metrics = dict(metrics, source_id=local["source_id"])
        return state, metrics

    return step


def default_actions(config, progress: bool = True, *, predictor: Predictor | None = None,
                    clip=None) -> list[Action]:
    """The actions of `train(config, ...)`, in order, from the `train` config section."""
    tc = config.train
    return [
        StopOnSignal(),  # first: its handlers are in place before anything else starts
        StopOnNonFinite(),
        LogMetrics(int(tc.log_every), source_names(config)),
        Progress(progress),
        Checkpoint(int(tc.ckpt_every)),
        Validate(int(tc.val_every), config, predictor),
        Plot(int(tc.plot_every), predictor, clip),
    ]


def train(
    config, workdir: str | Path, *, progress: bool = True, actions: Sequence[Action] = (),
    restart: bool = False,
) -> dict:
    """Train `config` in `workdir` (resuming when it holds checkpoints); returns a summary dict.

    `actions` run after the default ones (train/actions.py). `restart`: start at step 0 even when
    the workdir holds checkpoints; they are moved to WORKDIR/previous_run/ first (never deleted).
    Summary keys: step, start_step, loss, images_per_s, seconds, params, checkpoint_step,
    interrupted, workdir, and the last validation scalars when validation ran.
    """
    workdir = check_workdir(workdir)
    tc = config.train
    total = int(tc.steps)
    if total < 1:
        raise UsageError(f"train.steps must be >= 1, got {total}")
    check_shares(config.priors)
    distributed.initialize(float(tc.get("init_timeout_s", 300)))
    mesh = mesh_lib.mesh_from_config(config)
    gbatch = int(config.data.batch_size)
    distributed.check_batch(gbatch, mesh.size, jax.process_count())
    ckpt.check_resume_config(config, workdir)  # before anything is written

    # Data first: a source without usable images fails here, before anything is compiled.
    iterator = make_train_iterator(config, prior_cache=_prior_cache(config))
    clip, clip_params = _load_clip(config)
    setup = state_lib.make_setup(config, mesh)
    if restart:
        set_aside_for_restart(workdir)
    manager = ckpt.make_manager(workdir, keep=int(tc.keep_checkpoints), cleanup=True)
    try:
        start, state, restored = _restore_or_init(config, setup, manager, iterator, workdir)
    except BaseException:
        manager.close()
        raise
    write_config(config, workdir)
    if clip_params is not None:
        clip_params = jax.device_put(clip_params, mesh_lib.replicated(mesh))
    run = Run(
        workdir=workdir, total=total, step=start, state=state, batch_size=gbatch, iterator=iterator,
        manager=manager, mesh=mesh, logger=Logger(workdir), last_saved=start if restored else -1,
    )
    run.actions = [*default_actions(config, progress, predictor=Predictor(config, setup, clip), clip=clip),
                   *actions]
    run.summary = {"start_step": start, "interrupted": False, "params": state_lib.param_count(state)}
    step_fn = restoration_step(config, setup, mesh, clip, clip_params)
    t0 = time.perf_counter()
    try:
        run_loop(run, step_fn, iterator)
    finally:
        run.close()
    run.summary.update(
        step=run.step, loss=run.loss, images_per_s=run.images_per_s,
        seconds=time.perf_counter() - t0, checkpoint_step=run.last_saved,
        interrupted=run.interrupted, workdir=str(workdir),
    )
    return run.summary


def print_summary(summary: dict, file=None) -> None:
    """One line per fact of a finished run (for the CLI), on `file` (default: the current stdout)."""
    file = sys.stdout if file is None else file
    keys = ("step", "loss", "images_per_s", "seconds", "val_psnr", "val_ssim", "checkpoint_step")
    parts = [f"{k}={summary[k]:.4g}" if isinstance(summary.get(k), float) else f"{k}={summary[k]}"
             for k in keys if k in summary]
    print("trained: " + " ".join(parts), file=file)
