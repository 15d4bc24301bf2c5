"""Training the DA-CLIP controller: `train_controller(config, clip_path, workdir) -> dict`.

A model, a loss and a data stream fed to the training loop of the restoration network
(`train.loop.run_loop`, with its actions: signals, NaN stop, metrics, progress, checkpoints), from
the shared pieces (mesh, `train.state` setup with a model factory, optimiser, `train.checkpoints`,
the grain pipeline `data.make_train_iterator`). Each step takes the pipeline's degraded patches
(`controller_batches`), cuts one CLIP-sized crop per patch at native resolution (position drawn
from (seed, step)), and minimises

  degradation loss  softmax cross-entropy of the controller's embedding against the frozen text
                    embeddings of the vocabulary (multi-label: the target is uniform over the kinds
                    present; 'clean' for undegraded patches) - not in-batch contrastive;
  content loss      1 - cos(controlled frozen tower on the degraded crop, target), the target being
                    the caption's text embedding when a prior cache gives captions, else the frozen
                    tower's embedding of the clean crop.

Files in WORKDIR: controller.json (what it is tied to), config.json, checkpoints/ (orbax: model,
opt, data, meta), metrics.jsonl (and TensorBoard events, as for the restoration network),
plots/confusion.png.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lmdir_jax.data.pipeline import make_train_iterator
from lmdir_jax.errors import UsageError
from lmdir_jax.outputs import check_workdir
from lmdir_jax.priors.cache import PriorCache
from lmdir_jax.priors.clip import ClipPrior, load_clip
from lmdir_jax.priors.controller import (
    CROP_GRID,
    CROP_OFFSET,
    SPEC_FILE,
    Controller,
    TowerShape,
    check_spec,
    controlled_features,
    controller_spec,
    frozen_params,
    label_targets,
    normalize_pixels,
)
from lmdir_jax.train import checkpoints as ckpt
from lmdir_jax.train import distributed
from lmdir_jax.train import mesh as mesh_lib
from lmdir_jax.train import state as state_lib
from lmdir_jax.train.actions import (
    Action,
    Checkpoint,
    LogMetrics,
    Progress,
    Record,
    Run,
    StopOnNonFinite,
    StopOnSignal,
)
from lmdir_jax.train.loop import Batch, StepFn, run_loop, write_config
from lmdir_jax.train.monitor import Logger
from lmdir_jax.workdir import CONFUSION_PLOT, plot_file


def _crops(local: dict, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One random `size` crop per patch of the batch, starting on the `CROP_GRID` of the patch
    (where its synthetic JPEG blocks start): (lq crops, gt crops), same positions."""
    lq, gt = local["lq"], local["gt"]
    p = lq.shape[1]
    if p == size:
        return lq, gt
    off = CROP_OFFSET if p - size >= CROP_OFFSET else 0
    ys = off + rng.integers(0, (p - size - off) // CROP_GRID + 1, lq.shape[0]) * CROP_GRID
    xs = off + rng.integers(0, (p - size - off) // CROP_GRID + 1, lq.shape[0]) * CROP_GRID
    pick = lambda a: np.stack([a[i, y : y + size, x : x + size] for i, (y, x) in enumerate(zip(ys, xs, strict=True))])  # noqa: E731
    return pick(lq), pick(gt)


def _echo(config) -> int:
    """`priors.controller_echo` E, checked: E pipeline batches are pooled and each patch serves E
    steps, so a pool lasts E * E steps, and checkpoints fall on pool boundaries (exact resume)."""
    echo = int(config.priors.get("controller_echo", 1))
    steps, every = int(config.train.steps), int(config.train.ckpt_every)
    if echo < 1:
        raise UsageError(f"priors.controller_echo must be >= 1, got {echo}")
    pool = echo * echo
    if steps % pool or (every > 0 and every % pool):
        raise UsageError(f"train.steps ({steps}) and train.ckpt_every ({every}) must be multiples of "
                         f"{pool} (priors.controller_echo={echo} squared: the steps one pool of "
                         "patches serves)")
    return echo


def echo_pool(batches: list[dict], echo: int, rng: np.random.Generator) -> tuple[dict, np.ndarray]:
    """Data echoing with shuffling: `batches` (E pipeline batches) pooled into one, and the order
    (E * E * b indices) in which E * E steps of b patches visit it, each patch E times, spread over
    the pool's steps; without shuffling, a batch repeated in consecutive steps pulls the model
    towards it (measured: 65 % against 93 % held-out accuracy for the same 6000 steps)."""
    pool = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    n = len(pool["lq"])
    if echo == 1:
        return pool, np.arange(n)
    return pool, np.concatenate([rng.permutation(n) for _ in range(echo)])


def make_controller_step(config, setup: state_lib.TrainSetup, shape: TowerShape,
                         logit_names: list[str]) -> Callable:
    """`step(state, batch, frozen, bank, text_proj) -> (state, (metrics, pred, single))`, jitted,
    state donated: `pred` the predicted class of each crop, `single` whether it has one kind."""
    weight = float(config.priors.controller_content_weight)
    content_batch = int(config.priors.get("controller_content_batch", 0))
    schedule = state_lib.learning_rate_schedule(config.train)
    clean = logit_names.index("clean") if "clean" in logit_names else -1

    def step(state, batch, frozen, bank, text_proj):
        model = nnx.merge(setup.model_graphdef, state["model"])
        opt = nnx.merge(setup.opt_graphdef, state["opt"])
        frozen = jax.lax.stop_gradient(frozen)
        n = min(content_batch or batch["lq"].shape[0], batch["lq"].shape[0])  # content loss: first n crops
        if "scene_states" in batch:  # caption embedding from the cache's text states (EOS token)
            mask = batch["scene_mask"][:n].astype(bool)
            last = jnp.maximum(mask.sum(1) - 1, 0)
            pooled = jnp.take_along_axis(batch["scene_states"][:n], last[:, None, None], axis=1)[:, 0]
            target = pooled @ text_proj
            target = target / jnp.linalg.norm(target, axis=-1, keepdims=True).clip(1e-6)
            has = mask.any(1)
        else:
            target = controlled_features(frozen, batch["gt"][:n], shape)
            has = jnp.ones(n, bool)

        def loss_fn(m):
            deg, hints = m.hints(batch["lq"])
            content = controlled_features(frozen, batch["lq"][:n], shape, [h[:n] for h in hints])
            logits = jnp.exp(m.logit_scale[...]) * deg @ bank.T
            deg_loss = optax.softmax_cross_entropy(logits, batch["target"]).mean()
            cos = (content * target).sum(-1)
            content_loss = jnp.sum(jnp.where(has, 1.0 - cos, 0.0)) / jnp.maximum(has.sum(), 1)
            return deg_loss + weight * content_loss, (logits, deg_loss, content_loss)

        (loss, (logits, deg_loss, content_loss)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        opt.update(model, grads)
        pred = logits.argmax(-1)
        hit = jnp.take_along_axis(batch["target"], pred[:, None], axis=1)[:, 0] > 0
        single = (batch["target"] > 0).sum(-1) == 1
        metrics = {
            "loss": loss, "deg_loss": deg_loss, "content_loss": content_loss,
            "accuracy": hit.mean(), "grad_norm": optax.tree.norm(grads), "lr": schedule(opt.step[...] - 1),
            "clean_recall": jnp.where(batch["target"][:, clean] > 0, hit, 0).sum()
            / jnp.maximum((batch["target"][:, clean] > 0).sum(), 1) if clean >= 0 else jnp.float32(0),
        }
        return {"model": nnx.state(model), "opt": nnx.state(opt)}, (metrics, pred, single)

    return jax.jit(step, donate_argnums=(0,), out_shardings=(setup.shardings, None))


def controller_batches(iterator: Iterator[dict], config, clip: ClipPrior, start: int) -> Iterator[Batch]:
    """The controller's host batches from step `start` on (a multiple of E * E, E =
    priors.controller_echo): pools of E pipeline batches (`echo_pool`), one CLIP-sized crop per
    patch (`_crops`), a `priors.controller_clean_prob` share of them clean; keys lq and gt
    (normalised pixels), target (the vocabulary's label targets), and scene_states/scene_mask when
    the pipeline attaches a prior cache. Lazy: a pool is drawn from `iterator` when its first step
    asks, so a checkpoint after step s holds the pipeline position of steps < s."""
    echo, seed = _echo(config), int(config.seed)
    clean_prob = float(config.priors.controller_clean_prob)
    names = [n for n, _ in clip.degradation_vocab]
    pool_steps = echo * echo
    step = start
    while True:
        if step % pool_steps == 0:  # a new pool of E pipeline batches (E = controller_echo)
            pool, order = echo_pool([next(iterator) for _ in range(echo)], echo,
                                    np.random.default_rng([seed, step, 1]))
            b = len(order) // pool_steps  # this process's batch
        take = order[(step % pool_steps) * b : (step % pool_steps + 1) * b]
        local = {k: v[take] for k, v in pool.items()}
        rng = np.random.default_rng([seed, step])
        lq, gt = _crops(local, clip.image_size, rng)
        clean = rng.random(lq.shape[0]) < clean_prob  # the 'clean' class: undegraded crops
        lq = np.where(clean[:, None, None, None], gt, lq)
        target = label_targets(np.where(clean[:, None], 0.0, local["deg_vector"]), names)
        batch = {"lq": normalize_pixels(lq, clip.mean, clip.std),
                 "gt": normalize_pixels(gt, clip.mean, clip.std), "target": target}
        if "scene_states" in local:
            batch["scene_states"], batch["scene_mask"] = local["scene_states"], local["scene_mask"]
        yield {k: np.asarray(v) for k, v in batch.items()}
        step += 1


def controller_step(config, setup: state_lib.TrainSetup, mesh: jax.sharding.Mesh, clip: ClipPrior) -> StepFn:
    """The controller's `step_fn(state, host batch)` for `run_loop`: the batch made global over
    `mesh`, the jitted `make_controller_step` with the frozen tower, the vocabulary's text
    embeddings and the text projection (replicated); the metrics carry each crop's predicted
    class (`pred`), whether it has a single kind (`single`) and its true class (`true`, this host's)."""
    rep = mesh_lib.replicated(mesh)
    frozen = jax.device_put(frozen_params(clip), rep)
    bank = jax.device_put(clip.degradation_bank()[0], rep)
    text_proj = jax.device_put(jnp.asarray(clip.params["text_projection"]["kernel"], jnp.float32), rep)
    names = [n for n, _ in clip.degradation_vocab]
    step_fn = make_controller_step(config, setup, TowerShape.of(clip), names)

    def step(state: dict, local: Batch) -> tuple[dict, dict]:
        batch = mesh_lib.global_batch(local, mesh)
        state, (metrics, pred, single) = step_fn(state, batch, frozen, bank, text_proj)
        return state, {**metrics, "pred": pred, "single": single, "true": local["target"].argmax(1)}

    return step


class KindsSeen(Action):
    """Keeps controller.json's `kinds`, the vocabulary kinds among the training targets (the only
    ones the controller names, `DegradationAssessor`): written after each checkpoint and at the end."""

    def __init__(self, every: int, spec_file: Path, spec: dict, names: list[str], seen: np.ndarray):
        self.every = int(every)
        self.spec_file, self.spec, self.names, self.seen = spec_file, spec, names, seen

    def due(self, run: Run) -> bool:
        return super().due(run) and run.step < run.total

    def before_step(self, run: Run, batch: Batch) -> Batch:
        self.seen |= batch["target"].max(0) > 0
        return batch

    def save(self) -> None:
        """Write controller.json (process 0)."""
        if jax.process_index() == 0:
            kinds = [n for n, s in zip(self.names, self.seen, strict=True) if s]
            self.spec_file.write_text(json.dumps({**self.spec, "kinds": kinds}, indent=2) + "\n")

    def __call__(self, run: Run) -> None:
        self.save()

    def on_end(self, run: Run) -> None:
        self.save()


class Confusion(Action):
    """plots/confusion.png at the end: true against predicted class of the single-kind training
    crops of this run's steps."""

    def __init__(self, workdir: Path, names: list[str], start: int):
        self.workdir, self.names, self.first = workdir, names, start + 1
        self.counts = np.zeros((len(names), len(names)), np.int64)

    def on_metrics(self, run: Run, records: list[Record]) -> None:
        for _, m in records:
            single = np.asarray(m["single"], bool)
            np.add.at(self.counts, (np.asarray(m["true"])[single], np.asarray(m["pred"])[single]), 1)

    def on_end(self, run: Run) -> None:
        if jax.process_index() == 0 and self.counts.sum():
            plot_confusion(self.counts, self.names, self.names, plot_file(self.workdir, CONFUSION_PLOT),
                           f"controller training crops, steps {self.first}-{run.step}")


def plot_confusion(confusion: np.ndarray, rows: list[str], cols: list[str], out: Path, title: str) -> Path:
    """A confusion-matrix heat map (rows: true, columns: predicted) written to `out` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = np.asarray(confusion, np.float64)
    frac = c / np.maximum(c.sum(1, keepdims=True), 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(cols), 1.0 + 0.55 * len(rows)), dpi=100)
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    for i in range(c.shape[0]):
        for j in range(c.shape[1]):
            if c[i, j]:
                ax.text(j, i, int(c[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def train_controller(config, clip_path: str, workdir: str | Path, *, progress: bool = True,
                     actions: Sequence[Action] = ()) -> dict:
    """Train (or resume) a controller for the CLIP at `clip_path` in `workdir`; returns a summary.

    Summary keys: step, start_step, loss, accuracy (last logged window), seconds, cpu_seconds,
    interrupted (SIGINT/SIGTERM: stopped at the next multiple of controller_echo squared, with a
    checkpoint), workdir, threads. Rerunning the same command resumes from the newest checkpoint
    (model, optimiser, data). `actions` run after the controller's own.
    """
    config = copy.deepcopy(config)
    config.train.ema_decay = 0.0  # the controller keeps no EMA copy
    workdir = check_workdir(workdir)
    tc = config.train
    total = int(tc.steps)
    if total < 1:
        raise UsageError(f"train.steps must be >= 1, got {total}")
    echo = _echo(config)
    clip = load_clip(clip_path, max_text_len=int(config.priors.max_text_len))
    size = clip.image_size
    if int(config.data.patch_size) < size:
        raise UsageError(f"data.patch_size={config.data.patch_size} is smaller than this CLIP's input "
                         f"size {size}: set --config.data.patch_size={size} or more")
    spec = controller_spec(clip)
    spec_file = workdir / SPEC_FILE
    names = [n for n, _ in clip.degradation_vocab]
    seen = np.zeros(len(names), bool)  # vocabulary kinds among the training targets (resume: kept)
    if spec_file.is_file():
        old_spec = json.loads(spec_file.read_text(encoding="utf-8"))
        check_spec(workdir, old_spec, clip)
        seen = np.array([n in (old_spec.get("kinds") or []) for n in names])
        if old_spec.get("wiring") != spec["wiring"]:  # resumes keep the wiring they were trained with
            spec.pop("wiring")
    reverse = "wiring" in spec

    distributed.initialize(float(config.train.get("init_timeout_s", 300)))
    mesh = mesh_lib.mesh_from_config(config)
    if int(config.data.batch_size) % mesh.size:
        raise UsageError(f"data.batch_size={config.data.batch_size} must be a multiple of the "
                         f"{mesh.size} devices in the mesh")
    cache = PriorCache(str(config.priors.cache)) if str(config.priors.cache) else None
    iterator = make_train_iterator(config, prior_cache=cache)
    write_config(config, workdir)
    spec = {**spec, "clip": str(Path(clip_path).resolve())}
    ckpt_every = int(tc.ckpt_every)
    kinds = KindsSeen(ckpt_every, spec_file, spec, names, seen)
    kinds.save()

    seed = int(config.seed)
    model_fn = lambda: Controller.from_clip(clip, seed, reverse=reverse)  # noqa: E731
    setup = state_lib.make_setup(config, mesh, model_fn)
    manager = ckpt.make_manager(workdir, keep=int(tc.keep_checkpoints), cleanup=True)
    try:
        restored = ckpt.restore_latest(
            manager, setup.abstract, iterator, items=("model", "opt", "data"), set_aside=True
        )
        if restored is not None and restored[0] % (echo * echo):
            raise UsageError(f"the checkpoint at step {restored[0]} is not at a multiple of {echo * echo} "
                             f"(priors.controller_echo={echo} squared): resume with the echo it was "
                             "trained with")
    except BaseException:
        manager.close()
        iterator.close()
        raise
    start, state = (0, state_lib.init_state(config, setup, model_fn)) if restored is None else restored
    run = Run(workdir=workdir, total=total, step=start, state=state, batch_size=int(config.data.batch_size),
              iterator=iterator, manager=manager, mesh=mesh, logger=Logger(workdir),
              last_saved=start if restored is not None else -1)
    run.actions = [
        StopOnSignal(echo * echo),  # a pool boundary: the data resumes exactly only there
        StopOnNonFinite(),
        LogMetrics(int(tc.log_every)),
        Progress(progress, desc="controller"),
        Checkpoint(ckpt_every, meta={"kind": "controller"}),
        kinds,
        Confusion(workdir, names, start),
        *actions,
    ]
    batches = controller_batches(iterator, config, clip, start)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        run_loop(run, controller_step(config, setup, mesh, clip), batches)
    finally:
        run.close()
    return {
        "step": run.step, "start_step": start, "loss": run.loss,
        "accuracy": run.metrics.get("accuracy", float("nan")), "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0, "interrupted": run.interrupted,
        "workdir": str(workdir), "threads": os.cpu_count(),
    }
