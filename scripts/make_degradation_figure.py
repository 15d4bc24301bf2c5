"""Draw docs/images/degradations.png: one photo under each degradation kind at three severities.

Usage: .venv/bin/python scripts/make_degradation_figure.py [--out docs/images/degradations.png]
"""

from __future__ import annotations

import argparse

import cv2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from skimage import data  # noqa: E402

from lmdir_jax.degradations import KINDS, apply_spec, degrade  # noqa: E402

SEVERITIES = (0.2, 0.5, 0.9)
MIXTURES = ("rain+noise:25", "haze+lowlight:0.3", "blur:1.5+downsample:2+jpeg:30")


def main() -> None:
    """Render the grid (rows: kinds, then a row of mixtures; columns: clean and three severities)."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="docs/images/degradations.png")
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dpi", type=int, default=80)
    args = ap.parse_args()

    img = data.astronaut().astype(np.float32) / 255.0
    img = cv2.resize(img, (args.size, args.size), interpolation=cv2.INTER_AREA)
    rows = len(KINDS) + 1
    fig, axes = plt.subplots(rows, 4, figsize=(4 * 2.1, rows * 2.25))
    for r, kind in enumerate(KINDS):
        axes[r, 0].imshow(img)
        axes[r, 0].set_title("clean", fontsize=8)
        axes[r, 0].set_ylabel(kind, fontsize=10)
        for c, sev in enumerate(SEVERITIES, start=1):
            out, label = degrade(img, kind, np.random.default_rng(args.seed + c), sev)
            axes[r, c].imshow(out)
            axes[r, c].set_title(f"{sev:.1f}: {label.text()}", fontsize=6)
    axes[-1, 0].imshow(img)
    axes[-1, 0].set_ylabel("mixtures", fontsize=10)
    for c, spec in enumerate(MIXTURES, start=1):
        out, label = apply_spec(img, spec, np.random.default_rng(args.seed))
        axes[-1, c].imshow(out)
        axes[-1, c].set_title(spec, fontsize=6)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(args.out, dpi=args.dpi)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
