"""The training loop: `train(config, workdir) -> dict`.

Data (grain) -> global sharded batch -> jitted step -> logs (tqdm, metrics.jsonl, TensorBoard) ->
periodic validation and plots -> asynchronous orbax checkpoints. Rerunning the same command on the
same workdir resumes from the newest readable checkpoint (model, optimizer, EMA, data position).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

from lmdir_jax.errors import UsageError

DEBUG_SIGKILL_ENV = "LMDIR_DEBUG_SIGKILL_AT_STEP"  # tests: SIGKILL self right after step N
DEBUG_NAN_ENV = "LMDIR_DEBUG_NAN_AT_STEP"  # tests: poison the batch of step N with NaN


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the run stopped without saving the bad state."""


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    return int(value) if value else None


def _is_main() -> bool:
    import jax

    return jax.process_index() == 0


def write_config(config, workdir: Path) -> None:
    """WORKDIR/config.json: the resolved config (what load_for_inference rebuilds the model from)."""
    from lmdir_jax.config import config_to_json

    if _is_main():
        workdir.mkdir(parents=True, exist_ok=True)
        tmp = workdir / "config.json.tmp"
        tmp.write_text(config_to_json(config))
        os.replace(tmp, workdir / "config.json")


class _Logger:
    """Scalars to WORKDIR/metrics.jsonl and TensorBoard event files (process 0 only)."""

    def __init__(self, workdir: Path):
        self.main = _is_main()
        self.path = workdir / "metrics.jsonl"
        self.tb = None
        if self.main:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(workdir / "tensorboard"))
            except ImportError:  # optional
                self.tb = None

    def write(self, step: int, scalars: dict) -> None:
        if not self.main:
            return
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, float(v), int(step))
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(workdir: str | Path) -> list[dict]:
    """The records of WORKDIR/metrics.jsonl (empty list when absent)."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(workdir: Path) -> Path | None:
    """WORKDIR/plots/loss.png: training loss (and validation PSNR when present) against step."""
    if not _is_main():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(workdir)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_psnr"]) for r in records if "val_psnr" in r]
    if not train:
        return None
    out = workdir / "plots" / "loss.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        loss_name = json.loads((workdir / "config.json").read_text())["train"].get("loss", "l1")
    except (OSError, ValueError, KeyError):
        loss_name = "l1"
    label = {"l1": "L1 loss", "psnr": "PSNR loss (-dB)"}.get(loss_name, f"{loss_name} loss")
    ax.plot(*zip(*train, strict=True), color="tab:blue", label=f"train {label}")
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    if all(v > 0 for _, v in train):
        ax.set_yscale("log")
    if val:
        ax2 = ax.twinx()
        ax2.plot(*zip(*val, strict=True), "o-", color="tab:orange", label="val PSNR")
        ax2.set_ylabel("validation PSNR (dB)")
    ax.set_title(f"training: {workdir.name}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def _grid(rows: list[tuple[np.ndarray, ...]]) -> np.ndarray:
    """Rows of (degraded, restored, clean) images of equal size side by side, 4-pixel gaps."""
    gap = 4
    lines = []
    for row in rows:
        h = row[0].shape[0]
        parts = []
        for im in row:
            parts += [np.clip(im, 0, 1), np.ones((h, gap, 3), np.float32)]
        lines += [np.concatenate(parts[:-1], axis=1)]
        lines += [np.ones((gap, lines[-1].shape[1], 3), np.float32)]
    width = max(x.shape[1] for x in lines)
    lines = [np.pad(x, ((0, 0), (0, width - x.shape[1]), (0, 0)), constant_values=1) for x in lines]
    return np.concatenate(lines[:-1], axis=0)


class _Predictor:
    """Jitted forward pass of the (EMA) model on inputs replicated over the mesh."""

    def __init__(self, config, setup, clip):
        import jax
        from flax import nnx

        from lmdir_jax.models.priors import Priors

        self.config, self.setup, self.clip = config, setup, clip
        self.mesh = setup.mesh

        def forward(model_state, ema, lq, priors):
            model = nnx.merge(setup.model_graphdef, model_state)
            if ema is not None:
                nnx.update(model, ema)
            return model(lq, priors)

        self._forward = jax.jit(forward)
        self._Priors = Priors

    def __call__(self, state: dict, lq: np.ndarray, texts: list[str] | None = None) -> np.ndarray:
        import jax
        import jax.numpy as jnp

        from lmdir_jax.train.mesh import replicated

        c = self.config
        b = lq.shape[0]
        priors = self._Priors.empty(b, int(c.model.text_dim), 1, int(c.priors.ref_size))
        if self.clip is not None and texts is not None:
            states, mask = self.clip.encode_text(list(texts))
            priors = priors.replace(deg_states=jnp.asarray(states), deg_mask=jnp.asarray(mask))
        rep = replicated(self.mesh)
        lq = jax.device_put(jnp.asarray(lq, jnp.float32), rep)
        priors = jax.device_put(priors, rep)
        out = self._forward(state["model"], state.get("ema"), lq, priors)
        return np.asarray(jax.device_get(out), np.float32)


def validate(config, state: dict, predictor: _Predictor) -> tuple[dict, list]:
    """PSNR/SSIM of the (EMA) model on config.data.val_source degraded with val_spec.

    Returns ({'val_psnr', 'val_ssim', 'val_input_psnr', 'val_images'}, grid rows); empty when
    no validation source is configured or it yields no image.
    """
    from lmdir_jax.metrics import image_metrics

    dc = config.data
    if not str(dc.val_source):
        return {}, []
    from lmdir_jax.data.evaluation import iter_eval_pairs
    from lmdir_jax.data.sources import is_paired_folder

    spec = None if is_paired_folder(dc.val_source) else (str(dc.val_spec) or None)
    psnrs, ssims, inputs, rows = [], [], [], []
    for _key, degraded, clean, label in iter_eval_pairs(
        str(dc.val_source),
        spec=spec,
        seed=int(config.seed),
        crop_multiple=8,
        max_images=int(dc.val_max_images) or None,
        center_crop=int(dc.val_size),
    ):
        text = [label.text()] if label is not None else None
        restored = np.clip(predictor(state, degraded[None], text)[0], 0, 1)
        scores = image_metrics(restored, clean)  # the numbers `lmdir evaluate` reports
        psnrs.append(scores["psnr_rgb"])
        inputs.append(image_metrics(np.clip(degraded, 0, 1), clean)["psnr_rgb"])
        ssims.append(scores["ssim_rgb"])
        if len(rows) < 4:
            rows.append((degraded, restored, clean))
    if not psnrs:
        return {}, []
    result = {
        "val_psnr": float(np.mean(psnrs)),
        "val_ssim": float(np.mean(ssims)),
        "val_input_psnr": float(np.mean(inputs)),
        "val_images": float(len(psnrs)),
    }
    return result, rows


def _save_grid(workdir: Path, name: str, rows: list) -> None:
    if rows and _is_main():
        from lmdir_jax.data.io import write_image

        out = workdir / "plots" / name
        out.parent.mkdir(parents=True, exist_ok=True)
        write_image(out, _grid(rows))


class _StopFlag:
    """SIGINT/SIGTERM -> finish the current step, save, exit cleanly (main thread only)."""

    def __init__(self):
        self.signal: int | None = None
        self._old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # second Ctrl-C: give up immediately
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def _load_clip(config):
    if not str(config.priors.clip):
        return None, None
    from lmdir_jax.priors.clip import load_clip

    clip = load_clip(str(config.priors.clip), max_text_len=int(config.priors.max_text_len))
    clip.check_text_dim(int(config.model.text_dim))
    return clip, clip.params


def _prior_cache(config):
    if not str(config.priors.cache):
        return None
    from lmdir_jax.priors.cache import PriorCache

    return PriorCache(str(config.priors.cache))


def train(config, workdir: str | Path, *, progress: bool = True) -> dict:
    """Train `config` in `workdir` (resuming when it holds checkpoints); returns a summary dict.

    Summary keys: step, start_step, loss, images_per_s, seconds, params, checkpoint_step,
    interrupted, and the last validation scalars when validation ran.
    """
    import jax
    from tqdm import tqdm

    from lmdir_jax.data.pipeline import make_train_iterator
    from lmdir_jax.train import checkpoints as ckpt
    from lmdir_jax.train import mesh as mesh_lib
    from lmdir_jax.train import state as state_lib
    from lmdir_jax.train import step as step_lib

    mesh_lib.maybe_initialize_distributed()
    workdir = Path(workdir).resolve()
    tc = config.train
    total = int(tc.steps)
    if total < 1:
        raise UsageError(f"train.steps must be >= 1, got {total}")
    mesh = mesh_lib.mesh_from_config(config)
    gbatch = int(config.data.batch_size)
    if gbatch % mesh.size or gbatch % jax.process_count():
        raise UsageError(
            f"data.batch_size={gbatch} must be a multiple of the {mesh.size} devices in the mesh"
        )

    # Data first: a source without usable images fails here, before anything is compiled.
    iterator = make_train_iterator(config, prior_cache=_prior_cache(config))
    clip, clip_params = _load_clip(config)
    write_config(config, workdir)

    setup = state_lib.make_setup(config, mesh)
    manager = ckpt.make_manager(workdir, keep=int(tc.keep_checkpoints))
    logger = _Logger(workdir)
    restored = ckpt.restore_latest(manager, setup.abstract, iterator)
    if restored is None:
        start, state = 0, state_lib.init_state(config, setup)
    else:
        start, state = restored
        if setup.use_ema and "ema" not in state:
            from flax import nnx

            state["ema"] = jax.jit(lambda s: s, out_shardings=setup.shardings["ema"])(
                nnx.filter_state(state["model"], nnx.Param)
            )
        if setup.use_ema is False:
            state.pop("ema", None)
    if clip_params is not None:
        clip_params = jax.device_put(clip_params, mesh_lib.replicated(mesh))
    step_fn = step_lib.make_train_step(config, setup, clip)
    predictor = _Predictor(config, setup, clip)

    kill_at, nan_at = _env_int(DEBUG_SIGKILL_ENV), _env_int(DEBUG_NAN_ENV)
    log_every = max(1, int(tc.log_every))
    ckpt_every, val_every, plot_every = int(tc.ckpt_every), int(tc.val_every), int(tc.plot_every)
    summary: dict = {"start_step": start, "interrupted": False, "params": state_lib.param_count(state)}
    last_saved = start if restored is not None else -1
    pending: list = []
    step, window_t, window_n, t0 = start, time.perf_counter(), 0, time.perf_counter()
    images_per_s, last_loss = float("nan"), float("nan")
    last_batch = None

    def flush() -> None:
        """Fetch pending metrics, stop on a non-finite loss, log the window's means."""
        nonlocal pending, window_t, window_n, images_per_s, last_loss
        if not pending:
            return
        fetched = jax.device_get([m for _, m in pending])
        for (s, _), m in zip(pending, fetched, strict=True):
            if not math.isfinite(float(m["loss"])):
                good = last_saved if last_saved >= 0 else None
                raise TrainingDiverged(
                    f"loss became {float(m['loss'])} at step {s}; stopped without saving "
                    f"(last good checkpoint: {'none' if good is None else f'step {good}'})"
                )
        dt = time.perf_counter() - window_t
        images_per_s = window_n * gbatch / max(dt, 1e-9)
        means = {k: float(np.mean([float(m[k]) for m in fetched])) for k in fetched[0]}
        last_loss = means["loss"]
        logger.write(pending[-1][0], {**means, "images_per_s": images_per_s})
        bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{images_per_s:.1f}", refresh=False)
        pending, window_t, window_n = [], time.perf_counter(), 0

    def save(s: int) -> None:
        nonlocal last_saved
        flush()
        ckpt.save(manager, s, state, iterator, meta={"mesh": list(mesh.shape.values())})
        last_saved = s

    bar = tqdm(
        total=total, initial=start, desc="train", unit="step", disable=not (progress and _is_main()),
        dynamic_ncols=True,
    )
    try:
        with _StopFlag() as stop:
            while step < total:
                local = next(iterator)
                if nan_at is not None and step + 1 == nan_at:
                    local = dict(local, lq=np.full_like(local["lq"], np.nan))
                batch = mesh_lib.global_batch(local, mesh)
                if clip is not None:
                    batch.update(
                        mesh_lib.global_batch(step_lib.host_tokens(clip, local["deg_text"]), mesh)
                    )
                state, metrics = step_fn(state, batch, clip_params)
                step += 1
                window_n += 1
                pending.append((step, metrics))
                bar.update(1)
                last_batch = local
                if step % log_every == 0 or step == total:
                    flush()
                if ckpt_every > 0 and step % ckpt_every == 0 and step < total:
                    save(step)
                if kill_at is not None and step == kill_at:
                    manager.wait_until_finished()  # earlier checkpoints committed, then die hard
                    os.kill(os.getpid(), signal.SIGKILL)
                if val_every > 0 and step % val_every == 0:
                    flush()
                    scalars, rows = validate(config, state, predictor)
                    if scalars:
                        logger.write(step, scalars)
                        summary.update(scalars)
                        _save_grid(workdir, f"val_{step:06d}.png", rows)
                if plot_every > 0 and step % plot_every == 0:
                    flush()
                    plot_loss(workdir)
                    _save_grid(workdir, f"train_{step:06d}.png", _train_rows(predictor, state, local, clip))
                if stop.signal is not None:
                    summary["interrupted"] = True
                    break
            flush()
            if last_saved != step:
                save(step)
    finally:
        bar.close()
        manager.wait_until_finished()
        manager.close()
        logger.close()
    seconds = time.perf_counter() - t0
    plot_loss(workdir)
    if last_batch is not None and not summary["interrupted"]:
        _save_grid(workdir, f"train_{step:06d}.png", _train_rows(predictor, state, last_batch, clip))
    summary.update(
        step=step,
        loss=last_loss,
        images_per_s=images_per_s,
        seconds=seconds,
        checkpoint_step=last_saved,
        workdir=str(workdir),
    )
    return summary


def _train_rows(predictor: _Predictor, state: dict, local: dict, clip) -> list:
    """(degraded, restored, clean) rows for the first few patches of a training batch."""
    n = min(4, local["lq"].shape[0])
    texts = [str(t) for t in local["deg_text"][:n]] if clip is not None else None
    restored = predictor(state, local["lq"][:n], texts)
    return [(local["lq"][i], restored[i], local["gt"][i]) for i in range(n)]


def print_summary(summary: dict, file=sys.stdout) -> None:
    """One line per fact of a finished run (for the CLI)."""
    keys = ("step", "loss", "images_per_s", "seconds", "val_psnr", "val_ssim", "checkpoint_step")
    parts = [f"{k}={summary[k]:.4g}" if isinstance(summary.get(k), float) else f"{k}={summary[k]}"
             for k in keys if k in summary]
    print("trained: " + " ".join(parts), file=file)
