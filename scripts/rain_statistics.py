"""Compare the rain streaks of a paired rainy/clean folder (e.g. Rain100L) with our synthetic `rain`.

Usage:
  python scripts/rain_statistics.py --real ../shared/data/test/Rain100L \
      --photos ../shared/data/train/bsds --severities 0.2,0.5,0.9 --json rain_stats.json

Both sides are measured the same way, from the rain layer L = mean over channels of
(degraded - clean), clipped at 0 (the light the rain adds). Streak pixels are those with L above
`STREAK_THRESHOLD`. Per image:

- input PSNR (degraded vs clean, RGB);
- angle: structure-tensor orientation of L on streak pixels (degrees from the horizontal, 90 is
  vertical), the image's weighted circular mean and its spread (circular standard deviation);
- density: streak pixel fraction and streak components per 1000 pixels;
- length and width: median over the streak components (8-connected, area >= 4) of
  sqrt(12 * major variance + 1) and area / length;
- brightness: percentiles of L on streak pixels and the median of each component's peak;
- blending: the exponent b of residual_k = L (1 - clean_k)^b fitted across the three channels of
  unclipped streak pixels (0: additive degraded = clean + L, 1: screen 1 - (1 - clean)(1 - L)), and
  the streak chroma (max - min over channels of the residual / its mean; 0 for grey streaks).

The real side is `--real DIR` with DIR/degraded/NAME and DIR/clean/NAME. The synthetic side draws
`rain` on the `--photos` at each of `--severities` and at the training distribution (severity
uniform in `SEVERITY_RANGE`, one kind, as a `tasks={"rain": 1}` source with mix_prob 0 draws it),
and with `--styles` at the training distribution in each named style alone.
Prints one table (real vs synthetic: the mean over images, with the across-image standard deviation
of the angle) and writes every per-image value with the summaries to `--json`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import cv2
import numpy as np

from lmdir_jax.data.io import read_image
from lmdir_jax.degradations import degrade
from lmdir_jax.degradations.mixture import SEVERITY_RANGE
from lmdir_jax.degradations.rain import STYLES, apply_rain, rain_params

STREAK_THRESHOLD = 0.03  # L above this (about 8/255) is a streak pixel
MIN_COMPONENT = 4  # pixels; smaller components are ignored for length and width
TENSOR_SIGMA = 1.5  # px, smoothing of the structure tensor
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# (key, label, format) of the table rows, in order
ROWS = (
    ("psnr", "input PSNR (dB)", "{:.2f}"),
    ("psnr_p10", "  10th percentile over images", "{:.2f}"),
    ("psnr_p90", "  90th percentile over images", "{:.2f}"),
    ("angle_mean", "streak angle (deg, 90 = vertical)", "{:.1f}"),
    ("angle_across_std", "  std of the image angles", "{:.1f}"),
    ("angle_within_std", "  spread within an image", "{:.1f}"),
    ("streak_fraction", "streak pixel fraction (%)", "{:.2f}"),
    ("streaks_per_kpx", "streaks per 1000 px", "{:.2f}"),
    ("length", "streak length (px, median)", "{:.1f}"),
    ("width", "streak width (px, median)", "{:.2f}"),
    ("layer_p50", "layer on streaks, median", "{:.3f}"),
    ("layer_p90", "layer on streaks, 90th pct", "{:.3f}"),
    ("layer_p99", "layer on streaks, 99th pct", "{:.3f}"),
    ("peak", "streak peak (median)", "{:.3f}"),
    ("layer_mean", "mean layer over the image", "{:.4f}"),
    ("blend_exponent", "blend exponent (0 add, 1 screen)", "{:.2f}"),
    ("chroma", "streak chroma (0 = grey)", "{:.3f}"),
)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two images in [0, 1]."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 100.0 if mse <= 0 else 10.0 * math.log10(1.0 / mse)


def orientation(layer: np.ndarray, mask: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Structure-tensor streak orientation on the mask: (weighted circular mean, circular std, the
    per-pixel angles), degrees from the horizontal counter-clockwise in [0, 180), 90 = vertical."""
    gx = cv2.Sobel(layer, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(layer, cv2.CV_32F, 0, 1, ksize=3)
    jxx = cv2.GaussianBlur(gx * gx, (0, 0), TENSOR_SIGMA)
    jyy = cv2.GaussianBlur(gy * gy, (0, 0), TENSOR_SIGMA)
    jxy = cv2.GaussianBlur(gx * gy, (0, 0), TENSOR_SIGMA)
    jxx, jyy, jxy = jxx[mask], jyy[mask], jxy[mask]
    # dominant gradient direction (image axes, y down); the streak runs across it
    phi = 0.5 * np.arctan2(2.0 * jxy, jxx - jyy)
    coherence = np.sqrt((jxx - jyy) ** 2 + 4.0 * jxy**2) / (jxx + jyy + 1e-12)
    # streak direction in image axes is phi + 90 deg; flip y to count counter-clockwise
    ang = np.mod(-(phi + np.pi / 2.0), np.pi)
    w = coherence * layer[mask]
    if w.sum() <= 0:
        return float("nan"), float("nan"), np.degrees(ang)
    c = np.sum(w * np.cos(2 * ang)) / w.sum()
    s = np.sum(w * np.sin(2 * ang)) / w.sum()
    mean = np.mod(0.5 * math.atan2(s, c), np.pi)
    r = min(1.0, math.hypot(c, s))
    std = 0.5 * math.sqrt(-2.0 * math.log(max(r, 1e-12)))  # circular std of the doubled angle / 2
    return math.degrees(mean), math.degrees(std), np.degrees(ang)


def components(layer: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Streak count, median length, width and peak of the 8-connected components of the mask."""
    n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return dict(count=0, length=float("nan"), width=float("nan"), peak=float("nan"))
    lab = labels.ravel()
    sel = lab > 0
    lab = lab[sel]
    ys, xs = np.divmod(np.flatnonzero(sel), mask.shape[1])
    xs, ys = xs.astype(np.float64), ys.astype(np.float64)
    area = np.bincount(lab, minlength=n).astype(np.float64)
    keep = area >= MIN_COMPONENT
    keep[0] = False
    a = np.maximum(area, 1.0)
    mx, my = np.bincount(lab, xs, n) / a, np.bincount(lab, ys, n) / a
    vxx = np.bincount(lab, xs * xs, n) / a - mx**2
    vyy = np.bincount(lab, ys * ys, n) / a - my**2
    vxy = np.bincount(lab, xs * ys, n) / a - mx * my
    major = 0.5 * (vxx + vyy) + np.sqrt(0.25 * (vxx - vyy) ** 2 + vxy**2)
    length = np.sqrt(12.0 * np.maximum(major, 0.0) + 1.0)
    width = area / length
    peak = np.zeros(n)
    np.maximum.at(peak, lab, layer.ravel()[sel])
    if not keep.any():
        return dict(count=0, length=float("nan"), width=float("nan"), peak=float("nan"))
    return dict(
        count=int(keep.sum()),
        length=float(np.median(length[keep])),
        width=float(np.median(width[keep])),
        peak=float(np.median(peak[keep])),
    )


def blending(clean: np.ndarray, degraded: np.ndarray, mask: np.ndarray) -> tuple[float, float, int]:
    """(blend exponent b of residual_k = L (1 - clean_k)^b, streak chroma, pixels used for b).

    b is fitted by least squares on log residual vs log(1 - clean) across the channels of each
    streak pixel (each pixel's own mean removed), on pixels where no channel is clipped, every
    channel's residual is above 0.01 and the channels of 1 - clean differ by at least 30%."""
    r = (degraded - clean)[mask].astype(np.float64)
    c = clean[mask].astype(np.float64)
    d = degraded[mask]
    rm = r.mean(1)
    chroma = float(np.median((r.max(1) - r.min(1)) / np.maximum(rm, 1e-6))) if len(r) else float("nan")
    one_minus = 1.0 - c
    ok = (
        (d.max(1) < 0.98)
        & (r.min(1) > 0.01)
        & (one_minus.min(1) > 0.02)
        & (one_minus.max(1) > 1.3 * one_minus.min(1))
    )
    if ok.sum() < 20:
        return float("nan"), chroma, int(ok.sum())
    x = np.log(one_minus[ok])
    y = np.log(r[ok])
    x -= x.mean(1, keepdims=True)
    y -= y.mean(1, keepdims=True)
    return float(np.sum(x * y) / np.sum(x * x)), chroma, int(ok.sum())


def pair_statistics(clean: np.ndarray, degraded: np.ndarray) -> dict[str, float]:
    """Every per-image statistic of one (clean, rainy) pair of float HxWx3 images in [0, 1]."""
    clean = np.asarray(clean, np.float32)
    degraded = np.asarray(degraded, np.float32)
    layer = np.maximum((degraded - clean).mean(2), 0.0).astype(np.float32)
    mask = layer > STREAK_THRESHOLD
    out: dict[str, float] = dict(psnr=psnr(degraded, clean))
    out["streak_fraction"] = 100.0 * float(mask.mean())
    out["layer_mean"] = float(layer.mean())
    nan = float("nan")
    if mask.sum() < 20:
        out.update(dict.fromkeys(
            ("angle_mean", "angle_within_std", "length", "width", "peak", "layer_p50",
             "layer_p90", "layer_p99", "blend_exponent", "chroma"), nan))
        out["streaks_per_kpx"] = 0.0
        return out
    out["angle_mean"], out["angle_within_std"], _ = orientation(layer, mask)
    comp = components(layer, mask)
    out["streaks_per_kpx"] = 1000.0 * comp["count"] / mask.size
    out["length"], out["width"], out["peak"] = comp["length"], comp["width"], comp["peak"]
    p50, p90, p99 = np.percentile(layer[mask], (50, 90, 99))
    out["layer_p50"], out["layer_p90"], out["layer_p99"] = float(p50), float(p90), float(p99)
    out["blend_exponent"], out["chroma"], _ = blending(clean, degraded, mask)
    return out


def summarise(per_image: list[dict[str, float]]) -> dict[str, float]:
    """Mean over images of each statistic (NaNs skipped), with PSNR percentiles and the across-image
    (circular) spread of the angle."""
    keys = sorted({k for rec in per_image for k, v in rec.items() if isinstance(v, int | float)})
    out: dict[str, float] = {"images": len(per_image)}
    for k in keys:
        v = np.array([rec.get(k, np.nan) for rec in per_image], np.float64)
        v = v[np.isfinite(v)]
        out[k] = float(v.mean()) if len(v) else float("nan")
    ps = np.array([rec["psnr"] for rec in per_image], np.float64)
    if len(ps):
        out["psnr_p10"], out["psnr_p90"] = (float(x) for x in np.percentile(ps, (10, 90)))
    ang = np.radians([rec["angle_mean"] for rec in per_image if np.isfinite(rec.get("angle_mean", np.nan))])
    if len(ang):
        c, s = np.cos(2 * ang).mean(), np.sin(2 * ang).mean()
        out["angle_mean"] = math.degrees(np.mod(0.5 * math.atan2(s, c), np.pi))
        r = min(1.0, math.hypot(c, s))
        out["angle_across_std"] = math.degrees(0.5 * math.sqrt(-2.0 * math.log(max(r, 1e-12))))
    return out


def list_images(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name (none if it is not a folder)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)


def real_statistics(root: Path, max_images: int | None) -> list[dict[str, float]]:
    """Per-image statistics of root/degraded/NAME against root/clean/NAME."""
    names = [p.name for p in list_images(root / "degraded") if (root / "clean" / p.name).exists()]
    if not names:
        raise SystemExit(f"no pairs in {root}: expected {root}/degraded/NAME and {root}/clean/NAME")
    rows = []
    for name in names[:max_images]:
        d, c = read_image(root / "degraded" / name), read_image(root / "clean" / name)
        if d is None or c is None or d.shape != c.shape:
            print(f"skipping {name}: unreadable or sizes differ", file=sys.stderr)
            continue
        rows.append(dict(name=name, **pair_statistics(c, d)))
    return rows


def synthetic_statistics(
    photos: list[Path], severity: float | None, seed: int, style: str | None = None
) -> list[dict[str, float]]:
    """Per-image statistics of `rain` drawn on each photo at `severity` (None: uniform in
    SEVERITY_RANGE) in `style` (None: drawn, as in training); photo i uses
    np.random.default_rng([seed, i])."""
    rows = []
    for i, path in enumerate(photos):
        c = read_image(path)
        if c is None:
            continue
        rng = np.random.default_rng([seed, i])
        s = float(rng.uniform(*SEVERITY_RANGE)) if severity is None else severity
        if style is None:
            d, label = degrade(c, "rain", rng, s)
            params = label.items[0].params
        else:
            params = rain_params(rng, s, style)
            d = apply_rain(c, rng, **params)
        rows.append(dict(name=path.name, severity=s, params=params, **pair_statistics(c, d)))
    return rows


def format_table(summaries: dict[str, dict[str, float]]) -> str:
    """Markdown table: one row per statistic, one column per summary."""
    cols = list(summaries)
    lines = [
        "| statistic | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
        "| images | " + " | ".join(str(summaries[c]["images"]) for c in cols) + " |",
    ]
    for key, label, fmt in ROWS:
        vals = []
        for c in cols:
            v = summaries[c].get(key, float("nan"))
            vals.append("-" if not np.isfinite(v) else fmt.format(v))
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Measure both sides, print the table and write the JSON."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", type=Path, help="paired folder with degraded/ and clean/")
    ap.add_argument("--photos", type=Path, help="clean photos to draw synthetic rain on")
    ap.add_argument("--severities", default="",
                    help="comma-separated severities for extra synthetic columns, e.g. 0.2,0.5,0.9")
    ap.add_argument("--styles", default="",
                    help=f"comma-separated rain styles ({', '.join(STYLES)}) for extra columns at the "
                         "training severities, each style alone")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-images", type=int, default=None, help="at most this many images per side")
    ap.add_argument("--json", type=Path, help="write the summaries and per-image values here")
    args = ap.parse_args(argv)
    if args.real is None and args.photos is None:
        ap.error("give --real, --photos or both")
    severities = [float(s) for s in args.severities.split(",") if s.strip()]
    styles = [s.strip() for s in args.styles.split(",") if s.strip()]
    if set(styles) - set(STYLES):
        ap.error(f"--styles: unknown style {sorted(set(styles) - set(STYLES))[0]!r}; valid: {', '.join(STYLES)}")
    per_image: dict[str, list[dict[str, float]]] = {}
    if args.real is not None:
        per_image["real"] = real_statistics(args.real, args.max_images)
    if args.photos is not None:
        photos = list_images(args.photos)[: args.max_images]
        if not photos:
            raise SystemExit(f"no images in {args.photos}")
        lo, hi = SEVERITY_RANGE
        per_image[f"synthetic U({lo:g}, {hi:g})"] = synthetic_statistics(photos, None, args.seed)
        for style in styles:
            per_image[f"{style} U({lo:g}, {hi:g})"] = synthetic_statistics(photos, None, args.seed, style)
        for s in severities:
            per_image[f"synthetic {s:g}"] = synthetic_statistics(photos, s, args.seed)
    summaries = {k: summarise(v) for k, v in per_image.items()}
    print(format_table(summaries))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        doc = dict(
            real=str(args.real) if args.real else None,
            photos=str(args.photos) if args.photos else None,
            seed=args.seed,
            threshold=STREAK_THRESHOLD,
            summaries=summaries,
            per_image=per_image,
        )
        args.json.write_text(json.dumps(doc, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
