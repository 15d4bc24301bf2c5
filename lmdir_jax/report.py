"""A one-page Markdown report of a run: what was trained, the loss curve, a before/after picture
with PSNR, and the evaluation table — what a person looks at after `./scripts/quickstart.sh`."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from lmdir_jax.data.io import read_image
from lmdir_jax.data.sources import SKIMAGE_HELDOUT_NAMES, SKIMAGE_NAMES
from lmdir_jax.errors import UsageError
from lmdir_jax.metrics import psnr
from lmdir_jax.outputs import atomic_write_bytes
from lmdir_jax.train.loop import read_metrics
from lmdir_jax.workdir import CONFIG, LOSS_PLOT, VAL_GRID, config_file, grids, plot_file


def comparison_figure(
    degraded: np.ndarray, restored: np.ndarray, clean: np.ndarray | None, path: Path
) -> dict[str, float]:
    """Save degraded | restored | clean side by side with their PSNR; return the PSNRs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("degraded", degraded), ("restored", restored)]
    scores: dict[str, float] = {}
    if clean is not None:
        panels.append(("clean", clean))
        for name, img in panels[:2]:
            if img.shape == clean.shape:
                scores[name] = float(psnr(img, clean))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), dpi=100)
    for ax, (name, img) in zip(axes, panels, strict=True):
        ax.imshow(np.clip(img, 0, 1))
        title = name if name not in scores else f"{name}: {scores[name]:.2f} dB"
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return scores


def _rel(path: Path, start: Path) -> str:
    return os.path.relpath(path, start).replace(os.sep, "/")


def _describe_source(source: str) -> str:
    """One line on what the network trained on (and which skimage photos it never saw)."""
    if source == "skimage":
        return (f"`skimage` ({len(SKIMAGE_NAMES)} scikit-image photos: {', '.join(SKIMAGE_NAMES)}); "
                f"held out, never trained on: {', '.join(SKIMAGE_HELDOUT_NAMES)} (`skimage-heldout`, "
                "the quick start's sample and its evaluation without ../shared)")
    return f"`{source}`"


def _sample_note(clean: Path, source: str) -> str:
    """Whether the sample's clean photo was one of the training photos."""
    if clean.stem in SKIMAGE_HELDOUT_NAMES:
        return f"The sample photo (`{clean.name}`) is held out: the network never trained on it."
    if source == "skimage" and clean.stem in SKIMAGE_NAMES:
        return f"The sample photo (`{clean.name}`) is one of the training photos."
    return f"Sample photo: `{clean.name}`."


def write_report(
    output: str | Path,
    workdir: str | Path,
    compare: tuple[str, str, str | None] | None = None,
    eval_text: str | Path | None = None,
    evaluations: Sequence[tuple[str, str | Path]] = (),
) -> Path:
    """Write the Markdown report of a training workdir (plus optional sample and evaluation).

    `evaluations`: (name, `lmdir evaluate --json` file) pairs drawn side by side by
    `compare_evaluations` (e.g. blind / automatic / told the degradation).
    """
    output = Path(output)
    workdir = Path(workdir)
    if not config_file(workdir).is_file():
        raise UsageError(f"not a training workdir (no {CONFIG}): {workdir}")
    out_dir = output.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    config = json.loads(config_file(workdir).read_text())
    records = read_metrics(workdir)
    train_recs = [r for r in records if "loss" in r]
    val_recs = [r for r in records if any(k.startswith("val_") for k in r)]

    lines = [f"# lmdir-jax run report: `{config.get('name', workdir.name)}`", ""]
    lines += [
        f"- machine: {platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores, "
        f"JAX {jax.__version__} on {jax.default_backend()} ({jax.device_count()} device(s))",
        f"- workdir: `{workdir}`",
        f"- model: width {config['model']['width']}, blocks {config['model']['blocks']}, "
        f"patch {config['data']['patch_size']}, batch {config['data']['batch_size']}",
        f"- priors: CLIP `{config['priors'].get('clip') or 'none'}`, cache "
        f"`{config['priors'].get('cache') or 'none'}`",
    ]
    lines.append(f"- training data: {_describe_source(str(config['data'].get('source', '')))}")
    if train_recs:
        last = train_recs[-1]
        first = train_recs[0]
        lines.append(
            f"- training: {last.get('step')} steps, {config['train'].get('loss', 'l1')} loss "
            f"{first['loss']:.4f} → {last['loss']:.4f}"
        )
    if val_recs:
        v = val_recs[-1]
        vals = ", ".join(f"{k} {v[k]:.3f}" for k in sorted(v) if k.startswith("val_"))
        lines.append(f"- last validation (step {v.get('step')}): {vals}")
    lines.append("")

    loss_png = plot_file(workdir, LOSS_PLOT)
    if loss_png.is_file():
        lines += ["## Training curve", "", f"![loss]({_rel(loss_png, out_dir)})", ""]
    val_grids = grids(workdir, VAL_GRID)
    if val_grids:
        lines += [
            "## Validation (degraded | restored | clean)",
            "",
            f"![validation]({_rel(val_grids[-1], out_dir)})",
            "",
        ]

    if compare is not None:
        deg_p, res_p, clean_p = compare
        deg, res = read_image(deg_p), read_image(res_p)
        clean = read_image(clean_p) if clean_p else None
        if deg is None or res is None:
            raise UsageError(f"cannot read the sample images {deg_p} / {res_p}")
        fig = out_dir / "sample.png"
        scores = comparison_figure(deg, res, clean, fig)
        lines += ["## Sample restoration", "", f"![sample]({_rel(fig, out_dir)})", ""]
        if clean_p:
            lines += [_sample_note(Path(clean_p), str(config["data"].get("source", ""))), ""]
        if scores:
            lines += [
                "PSNR against the clean photo: "
                + ", ".join(f"{k} {v:.2f} dB" for k, v in scores.items()),
                "",
            ]

    if evaluations:
        lines += ["## PSNR side by side (RGB, dB)", "", compare_evaluations(evaluations), ""]
    if eval_text is not None and Path(eval_text).is_file():
        lines += ["## Evaluation", "", "```", Path(eval_text).read_text().rstrip(), "```", ""]

    return atomic_write_bytes(output, "\n".join(lines).encode())


def compare_evaluations(named: Sequence[tuple[str, str | Path]]) -> str:
    """A Markdown table of RGB PSNR per test set, one column per named `lmdir evaluate --json`
    report (e.g. blind / automatic / told the degradation), after the input's PSNR.

    Rows are the (dataset, task) pairs in the order the reports first list them; a set that a
    report did not evaluate is left blank; reports given under one name fill one column. A missing
    or unreadable report is a UsageError naming it.
    """
    merged: dict[str, dict] = {}  # reports of one name share a column
    for name, path in named:
        try:
            summary = json.loads(Path(path).read_text())["summary"]
            rows = {(r["dataset"], r["task"]): r for r in summary}
            for r in rows.values():  # the fields the table shows, as numbers
                _ = (float(r["psnr_rgb"]), float(r["input_psnr_rgb"]), int(r["images"]))
        except (OSError, ValueError, KeyError, TypeError):
            raise UsageError(f"not an `lmdir evaluate --json` report: {path}") from None
        merged.setdefault(name, {}).update(rows)
    columns = list(merged.items())
    keys: list[tuple[str, str]] = []
    for _, rows in columns:
        keys += [k for k in rows if k not in keys]
    lines = ["| test set | images | input | " + " | ".join(n for n, _ in columns) + " |",
             "|---|---|---|" + "---|" * len(columns)]
    for key in keys:
        first = next(rows[key] for _, rows in columns if key in rows)
        cells = [f"{rows[key]['psnr_rgb']:.2f}" if key in rows else "" for _, rows in columns]
        lines.append(f"| {key[0]} {key[1]} | {first['images']} | {first['input_psnr_rgb']:.2f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)
