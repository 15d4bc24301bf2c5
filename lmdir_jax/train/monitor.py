"""What a training run shows: metrics.jsonl + TensorBoard, loss plot, image grids, validation."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tensorboardX import SummaryWriter

from lmdir_jax.data.evaluation import iter_eval_pairs
from lmdir_jax.data.io import write_image
from lmdir_jax.data.sources import is_paired_folder
from lmdir_jax.metrics import image_metrics
from lmdir_jax.models.priors import Priors
from lmdir_jax.train.distributed import barrier
from lmdir_jax.train.mesh import replicated
from lmdir_jax.workdir import LOSS_PLOT, config_file, metrics_file, plot_file, tensorboard_dir


def is_main() -> bool:
    """Whether this is process 0 (the one that writes logs and plots)."""
    return jax.process_index() == 0


class Logger:
    """Scalars to WORKDIR/metrics.jsonl and TensorBoard event files (process 0 only)."""

    def __init__(self, workdir: Path):
        self.main = is_main()
        self.path = metrics_file(workdir)
        self.tb = None
        if self.main:
            try:
                self.tb = SummaryWriter(str(tensorboard_dir(workdir)))
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
    path = metrics_file(workdir)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loss_curves(records: list[dict], smooth: int = 1) -> dict[str, list[tuple[int, float]]]:
    """(step, value) curves of metrics.jsonl records: 'loss' and, for a mixture, each source's
    'loss/<source>'. Each source's curve is averaged over `smooth` consecutive records (its batches
    hold only part of the examples, so it is noisier than the total)."""
    names = ["loss"] + sorted({k for r in records for k in r if k.startswith("loss/")})
    curves = {}
    for name in names:
        points = [(int(r["step"]), float(r[name])) for r in records if name in r]
        if name != "loss" and smooth > 1 and len(points) >= smooth:
            vals = np.convolve([v for _, v in points], np.ones(smooth) / smooth, mode="valid")
            points = [(points[i + smooth - 1][0], float(v)) for i, v in enumerate(vals)]
        if points:
            curves[name] = points
    return curves


def plot_loss(workdir: Path) -> Path | None:
    """WORKDIR/plots/loss.png: training loss (and validation PSNR when present) against step; a
    mixture's run adds one curve per source (`loss_curves`), the loss curve per task."""
    if not is_main():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(workdir)
    curves = loss_curves(records, smooth=max(1, len(records) // 50))
    train = curves.pop("loss", [])
    val = [(r["step"], r["val_psnr"]) for r in records if "val_psnr" in r]
    if not train:
        return None
    out = plot_file(workdir, LOSS_PLOT)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        loss_name = json.loads(config_file(workdir).read_text())["train"].get("loss", "l1")
    except (OSError, ValueError, KeyError):
        loss_name = "l1"
    label = {"l1": "L1 loss", "psnr": "PSNR loss (-dB)"}.get(loss_name, f"{loss_name} loss")
    ax.plot(*zip(*train, strict=True), color="tab:gray" if curves else "tab:blue", alpha=0.6 if curves else 1.0,
            label=f"train {label}" + (" (all)" if curves else ""))
    for name, points in curves.items():
        ax.plot(*zip(*points, strict=True), linewidth=1.5, label=name.split("/", 1)[1])
    if curves:
        ax.legend(loc="upper right", fontsize="small")
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


def grid(rows: list[tuple[np.ndarray, ...]]) -> np.ndarray:
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


class Predictor:
    """Jitted forward pass of the (EMA) model on inputs replicated over the mesh."""

    def __init__(self, config, setup, clip):
        self.config, self.setup, self.clip = config, setup, clip
        self.mesh = setup.mesh

        def forward(model_state, ema, lq, priors):
            model = nnx.merge(setup.model_graphdef, model_state)
            if ema is not None:
                nnx.update(model, ema)
            return model(lq, priors)

        self._forward = jax.jit(forward)
        self._compiled: dict = {}
        self._Priors = Priors

    def __call__(self, state: dict, lq: np.ndarray, texts: list[str] | None = None) -> np.ndarray:
        c = self.config
        b = lq.shape[0]
        priors = self._Priors.empty(b, int(c.model.text_dim), 1, int(c.priors.ref_size))
        if self.clip is not None and texts is not None:
            states, mask = self.clip.encode_text(list(texts))
            priors = priors.replace(deg_states=jnp.asarray(states), deg_mask=jnp.asarray(mask))
        rep = replicated(self.mesh)
        lq = jax.device_put(jnp.asarray(lq, jnp.float32), rep)
        priors = jax.device_put(priors, rep)
        args = (state["model"], state.get("ema"), lq, priors)
        if jax.process_count() > 1:  # all processes compiled before any enters a collective
            key = jax.tree.map(lambda x: (x.shape, str(x.dtype)), args)
            key = str(jax.tree.leaves(key))
            if key not in self._compiled:
                self._compiled[key] = self._forward.lower(*args).compile()
                barrier(f"lmdir_predictor_compiled_{len(self._compiled)}")
            out = self._compiled[key](*args)
        else:
            out = self._forward(*args)
        return np.asarray(jax.device_get(out), np.float32)


def validate(config, state: dict, predictor: Predictor) -> tuple[dict, list]:
    """PSNR/SSIM of the (EMA) model on config.data.val_source degraded with val_spec.

    The metrics are `lmdir evaluate`'s (`metrics.image_metrics`: uint8-quantised RGB PSNR and
    Gaussian SSIM), so validation numbers and evaluation tables agree.

    Returns ({'val_psnr', 'val_ssim', 'val_input_psnr', 'val_images'}, grid rows); empty when
    no validation source is configured or it yields no image.
    """
    dc = config.data
    if not str(dc.val_source):
        return {}, []
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
        got = image_metrics(restored, clean)  # what `lmdir evaluate` reports (uint8, RGB)
        psnrs.append(got["psnr_rgb"])
        ssims.append(got["ssim_rgb"])
        inputs.append(image_metrics(np.clip(degraded, 0, 1), clean)["psnr_rgb"])
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


def save_grid(workdir: Path, name: str, rows: list) -> None:
    if rows and is_main():
        out = plot_file(workdir, name)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_image(out, grid(rows))




def train_rows(predictor: Predictor, state: dict, local: dict, clip) -> list:
    """(degraded, restored, clean) rows for the first few patches of a training batch.

    With several processes every process must feed the same replicated inputs: the first patches
    of each process's batch are gathered (and shown without degradation texts).
    """
    n = min(4, local["lq"].shape[0])
    lq, gt = local["lq"][:n], local["gt"][:n]
    texts = [str(t) for t in local["deg_text"][:n]] if clip is not None else None
    if jax.process_count() > 1:
        k = max(1, n // jax.process_count())
        lq, gt = (np.asarray(multihost_utils.process_allgather(x[:k], tiled=True)) for x in (lq, gt))
        n, texts = lq.shape[0], None
    restored = predictor(state, lq, texts)
    return [(lq[i], restored[i], gt[i]) for i in range(n)]
