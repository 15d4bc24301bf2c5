"""Benchmark tables: restore evaluation sets and score them with PSNR/SSIM on RGB and on Y.

An evaluation set is a folder of clean images degraded with a spec at a fixed seed (e.g. CBSD68
with `noise:25`), or a paired folder used as is (`degraded/` + `clean/`, e.g. Rain100L, SOTS).
Each image is restored whole (as the literature does; `tile` is available for very large images)
and scored against its clean image; the degraded input is scored too, for reference. Results are
one row per (dataset, task), their average, and one record per image (CSV / JSON).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmdir_jax.data.evaluation import iter_eval_pairs
from lmdir_jax.data.sources import is_named_source
from lmdir_jax.errors import UsageError
from lmdir_jax.metrics import crop_to_multiple, image_metrics
from lmdir_jax.outputs import atomic_write_bytes
from lmdir_jax.progress import progress_bar
from lmdir_jax.protocols import CROP_MULTIPLE, NOISE_SEED, find_sets, protocol_sets, published

METRIC_KEYS = ("psnr_rgb", "ssim_rgb", "psnr_y", "ssim_y")


@dataclass
class EvalSet:
    """One evaluation set: a folder, and the degradation spec applied to it (None = paired)."""

    path: str
    spec: str | None = None

    @property
    def dataset(self) -> str:
        """Display name: the folder's name (or the source's name: `skimage`, `tfds:...`)."""
        if is_named_source(self.path):
            return self.path
        return Path(self.path).resolve().name

    @property
    def task(self) -> str:
        """The spec, or `paired` for a paired folder used as is."""
        return self.spec or "paired"


@dataclass
class ImageResult:
    """Scores of one restored image (and of its degraded input) plus the prior that guided it."""

    dataset: str
    task: str
    image: str
    height: int
    width: int
    restored: dict[str, float]
    degraded: dict[str, float]
    degradation: str = ""
    probability: float | None = None
    caption: str = ""

    def flat(self) -> dict[str, Any]:
        """A flat record for CSV: restored metrics bare, input metrics prefixed `input_`."""
        row: dict[str, Any] = {
            "dataset": self.dataset, "task": self.task, "image": self.image,
            "height": self.height, "width": self.width,
        }
        row.update({k: self.restored[k] for k in METRIC_KEYS})
        row.update({f"input_{k}": self.degraded[k] for k in METRIC_KEYS})
        row.update(
            degradation=self.degradation,
            probability="" if self.probability is None else round(self.probability, 4),
            caption=self.caption,
        )
        return row


@dataclass
class EvalReport:
    """All per-image results, the per-(dataset, task) means and their average."""

    images: list[ImageResult] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> list[dict[str, Any]]:
        """One row per (dataset, task) in first-seen order: count, restored and input means."""
        groups: dict[tuple[str, str], list[ImageResult]] = {}
        for r in self.images:
            groups.setdefault((r.dataset, r.task), []).append(r)
        rows = []
        for (ds, task), rs in groups.items():
            row: dict[str, Any] = {"dataset": ds, "task": task, "images": len(rs)}
            for k in METRIC_KEYS:
                row[k] = _mean([r.restored[k] for r in rs])
                row[f"input_{k}"] = _mean([r.degraded[k] for r in rs])
            rows.append(row)
        return rows

    def average(self) -> dict[str, Any]:
        """The unweighted mean of the per-(dataset, task) rows (the 'Average' column of papers)."""
        rows = self.summary()
        out: dict[str, Any] = {"dataset": "average", "task": "", "images": sum(r["images"] for r in rows)}
        for k in METRIC_KEYS:
            out[k] = _mean([r[k] for r in rows])
            out[f"input_{k}"] = _mean([r[f"input_{k}"] for r in rows])
        return out

    def to_json(self) -> dict[str, Any]:
        """Everything as JSON-ready data: settings, summary, average, per-image records."""
        return {
            "settings": self.settings,
            "summary": self.summary(),
            "average": self.average(),
            "images": [asdict(r) for r in self.images],
        }


def _mean(values: list[float]) -> float:
    """Mean that keeps +inf (identical images) meaningful and returns nan for no values."""
    if not values:
        return math.nan
    return float(np.mean(values))


def format_table(report: EvalReport) -> str:
    """A plain-text table: dataset, task, N, PSNR/SSIM (RGB and Y) restored and of the input."""
    head = (
        f"{'dataset':<22} {'task':<18} {'N':>4}  {'PSNR':>6} {'SSIM':>6} {'PSNR-Y':>6} {'SSIM-Y':>6}"
        f"   | input {'PSNR':>6} {'SSIM':>6} {'PSNR-Y':>6} {'SSIM-Y':>6}"
    )
    lines = [head, "-" * len(head)]

    def line(r: dict[str, Any]) -> str:
        return (
            f"{r['dataset'][:22]:<22} {r['task'][:18]:<18} {r['images']:>4}  "
            f"{r['psnr_rgb']:6.2f} {r['ssim_rgb']:6.4f} {r['psnr_y']:6.2f} {r['ssim_y']:6.4f}"
            f"   |       {r['input_psnr_rgb']:6.2f} {r['input_ssim_rgb']:6.4f} "
            f"{r['input_psnr_y']:6.2f} {r['input_ssim_y']:6.4f}"
        )

    lines += [line(r) for r in report.summary()]
    lines.append("-" * len(head))
    lines.append(line(report.average()))
    return "\n".join(lines)


def write_csv(report: EvalReport, path: str | Path) -> Path:
    """Per-image results as CSV (one row per image)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [r.flat() for r in report.images]
    fields = list(rows[0]) if rows else ["dataset", "task", "image"]
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    w.writerows(rows)
    return atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


def write_json(report: EvalReport, path: str | Path) -> Path:
    """The whole report (settings, summary, average, per-image records) as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, json.dumps(report.to_json(), indent=2, allow_nan=True).encode())


def _match_size(lq: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """The degraded image at the clean image's size (bicubic), e.g. for low-resolution inputs."""
    if lq.shape[:2] == gt.shape[:2]:
        return lq
    import cv2

    h, w = gt.shape[:2]
    return np.clip(cv2.resize(lq, (w, h), interpolation=cv2.INTER_CUBIC), 0.0, 1.0)


def evaluate(
    restorer: Any,
    sets: list[EvalSet],
    *,
    seed: int = 0,
    crop_multiple: int = 0,
    max_images: int | None = None,
    degradation: str | None = None,
    oracle: bool = False,
    blind: bool = False,
    tile: int | None = None,
    overlap: int = 32,
    progress: bool = True,
    ssim_window: str = "gaussian",
    iterative: int = 0,
) -> EvalReport:
    """Restore and score every set with `restorer` (an `inference.Restorer`).

    The degradation prior is automatic (CLIP zero-shot) unless `degradation` (one text for all) or
    `oracle` (each image's own label text; needs a spec or a labelled paired set) is given, or
    masked with `blind` (no guidance at all, as PromptIR/AirNet are evaluated).
    `crop_multiple=16` applies the AirNet/PromptIR protocol: images are centre-cropped to a
    multiple of 16 before restoring and scoring. Degradations use `seed` (same seed, same inputs).
    `ssim_window`: 'gaussian' (BasicSR) or 'uniform' (scikit-image defaults, PromptIR's script).
    `iterative` > 0 restores with AutoDIR's loop of at most that many steps
    (`Restorer.restore_iterative`) instead of one automatic pass; the chain's kinds are recorded.
    """
    report = EvalReport(
        settings={
            "seed": seed, "crop_multiple": crop_multiple, "max_images": max_images,
            "prior": f"iterative:{iterative}" if iterative else "oracle" if oracle else (
                "text" if degradation is not None else ("blind" if blind else "auto")),
            "degradation": degradation, "tile": tile, "overlap": overlap, "ssim": ssim_window,
            "sets": [{"path": s.path, "spec": s.spec} for s in sets],
        }
    )
    if oracle:
        for es in sets:
            if es.spec is None:
                raise UsageError(f"--oracle needs a degradation label: {es.path} has none (give --spec)")
    for es in sets:
        pairs = iter_eval_pairs(
            es.path, es.spec, seed=seed, crop_multiple=crop_multiple, max_images=max_images
        )
        bar = progress_bar(pairs, desc=f"{es.dataset} {es.task}", unit="img", disable=not progress)
        for key, degraded, clean, label in bar:
            gt = crop_to_multiple(clean, crop_multiple)
            lq = crop_to_multiple(_match_size(degraded, clean), crop_multiple)
            text = degradation
            if oracle:
                if label is None:
                    raise UsageError(f"--oracle needs a degradation label: {es.path} has none (give --spec)")
                text = label.text()
            if iterative:
                out, chain = restorer.restore_iterative(lq, max_steps=iterative, tile=tile, overlap=overlap)
                kinds = [st["degradation"] for st in chain["steps"]]
                choice = restorer.priors_for(lq, auto=False)[1]
                choice.degradation = " -> ".join(kinds) or "clean"
                choice.probability = chain["steps"][0]["probability"] if kinds else None
            else:
                priors, choice = restorer.priors_for(lq, degradation=text, auto=not blind)
                out = restorer.restore(lq, priors, tile=tile, overlap=overlap)
            report.images.append(
                ImageResult(
                    dataset=es.dataset, task=es.task, image=str(key),
                    height=int(gt.shape[0]), width=int(gt.shape[1]),
                    restored=image_metrics(out, gt, ssim_window=ssim_window),
                    degraded=image_metrics(lq, gt, ssim_window=ssim_window),
                    degradation=choice.degradation, probability=choice.probability,
                    caption=choice.caption,
                )
            )
    return report


def evaluate_protocol(
    restorer: Any,
    protocol: str,
    root: str | Path,
    *,
    ssim_window: str = "gaussian",
    max_images: int | None = None,
    degradation: str | None = None,
    oracle: bool = False,
    blind: bool = False,
    tile: int | None = None,
    overlap: int = 32,
    progress: bool = True,
) -> tuple[dict, EvalReport]:
    """Score `restorer` on the test sets of `protocol` found under `root`, beside its published rows.

    Returns (table, report): table = {'protocol', 'root', 'ssim', 'prior', 'columns', 'rows',
    'missing'} where rows are the published methods then 'this checkpoint' with
    {'method', 'source', 'results': {set key: [psnr_rgb, ssim_rgb]}}; missing sets are skipped.
    Raises UsageError when no test set of the protocol is under root.
    """
    found, missing = find_sets(protocol, root)
    if not found:
        raise UsageError(f"no {protocol} test set under {root} (see docs/datasets.md for the layout)")
    report = EvalReport()
    results: dict[str, list[float]] = {}
    for ps, path in found:
        text = degradation
        if oracle and ps.spec is None:
            text = ps.text  # a paired set's label is its task
        part = evaluate(
            restorer, [EvalSet(str(path), ps.spec)], seed=NOISE_SEED, crop_multiple=CROP_MULTIPLE,
            max_images=max_images, degradation=text, oracle=oracle and ps.spec is not None,
            blind=blind, tile=tile, overlap=overlap, progress=progress, ssim_window=ssim_window,
        )
        for r in part.images:
            r.dataset = ps.key
        report.images += part.images
        row = part.summary()[0]
        results[ps.key] = [row["psnr_rgb"], row["ssim_rgb"]]
    prior = "oracle" if oracle else ("text" if degradation is not None else ("blind" if blind else "auto"))
    report.settings = {
        "protocol": protocol, "root": str(root), "crop_multiple": CROP_MULTIPLE, "seed": NOISE_SEED,
        "ssim": ssim_window, "prior": prior, "max_images": max_images,
        "sets": {ps.key: str(path) for ps, path in found},
    }
    rows = published(protocol) + [
        {"method": "this checkpoint", "source": "lmdir evaluate", "results": results}
    ]
    table = {
        "protocol": protocol, "root": str(root), "ssim": ssim_window, "prior": prior,
        "columns": [{"key": ps.key, "label": ps.label} for ps, _ in found]
        + [{"key": ps.key, "label": ps.label} for ps in missing],
        "rows": rows, "missing": [ps.label for ps in missing],
    }
    order = [ps.key for ps in protocol_sets(protocol)]
    table["columns"].sort(key=lambda c: order.index(c["key"]))
    return table, report
