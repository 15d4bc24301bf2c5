"""Full-size (degraded, clean) pairs for evaluation and validation.

A clean source is degraded by a spec at a fixed per-image seed (seed, index), so every evaluation
of the same folder sees the same degraded inputs; a paired source is used as it is.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lmdir_jax.data.sources import ImageSource, load_source
from lmdir_jax.degradations import apply_spec, parse_spec
from lmdir_jax.errors import UsageError
from lmdir_jax.metrics import crop_to_multiple


def center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """The central min(size, H) x min(size, W) window."""
    h, w = img.shape[:2]
    ch, cw = min(size, h), min(size, w)
    y, x = (h - ch) // 2, (w - cw) // 2
    return img[y : y + ch, x : x + cw]


def iter_eval_pairs(
    source: str | Path | ImageSource,
    spec: str | None = None,
    seed: int = 0,
    crop_multiple: int = 0,
    max_images: int | None = None,
    center_crop: int = 0,
) -> Iterator[tuple[str, np.ndarray, np.ndarray, Any]]:
    """Yield (key, degraded, clean, label or None) for each image of a source, full size.

    Clean sources need `spec` (e.g. 'noise:25'): image i is degraded with a Generator seeded by
    (seed, i) after cropping, so results do not depend on which images are evaluated. Paired
    sources are yielded as they are (spec must be None; label None). `center_crop` (> 0) keeps the
    central window of that side, then `crop_multiple` (> 0) trims to a multiple of it.
    """
    src = load_source(source)
    if src.paired and spec:
        raise UsageError(f"{src.name} is a paired folder: it is used as it is, give no --spec")
    if not src.paired and not spec:
        raise UsageError(f"{src.name} holds clean images only: give a degradation --spec, e.g. noise:25")
    items = None if src.paired else parse_spec(spec)  # UsageError for a bad spec
    n = len(src) if max_images is None else min(len(src), int(max_images))
    for i in range(n):
        item = src[i]
        clean = item["clean"]
        degraded = item.get("degraded")
        crops = [clean] if degraded is None else [degraded, clean]
        if center_crop:
            crops = [_center(c, center_crop) for c in crops]
        if crop_multiple:
            crops = [crop_to_multiple(c, crop_multiple) for c in crops]
        if degraded is None:
            clean = crops[0]
            degraded, label = apply_spec(clean, items, np.random.default_rng([seed, i]))
        else:
            degraded, clean = crops
            label = None
        yield item["key"], degraded, clean, label


_center = center_crop
