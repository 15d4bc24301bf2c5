"""Low resolution (kind "downsample"): resize down by a factor and back up to the original size.

Severity picks the factor: 2 (severity < 1/3), 3 (< 2/3) or 4; the interpolation of each step is
random (down: area, bilinear or bicubic; up: bilinear or bicubic). `downsample:F` in a spec fixes
the factor F (any real number > 1). The label severity is (F - 1) / 3.5, so 2, 3 and 4 read as
light, moderate and heavy.
"""

from __future__ import annotations

import cv2
import numpy as np

from lmdir_jax.degradations.imageops import as_float_image, clamp01, clip01
from lmdir_jax.degradations.label import Label

FACTORS = (2, 3, 4)
DOWN_INTERP = {"area": cv2.INTER_AREA, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}
UP_INTERP = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}


def apply_downsample(
    image: np.ndarray, factor: float, down: str = "area", up: str = "bicubic"
) -> np.ndarray:
    """Resize by 1/factor with `down` interpolation and back to HxW with `up` interpolation."""
    image = as_float_image(image)
    h, w = image.shape[:2]
    small = cv2.resize(
        image,
        (max(1, int(round(w / factor))), max(1, int(round(h / factor)))),
        interpolation=DOWN_INTERP[down],
    )
    if small.ndim == 2:
        small = small[..., None]
    return clip01(cv2.resize(small, (w, h), interpolation=UP_INTERP[up]).reshape(h, w, 3))


def factor_severity(factor: float) -> float:
    """Label severity of a down-sampling factor: (factor - 1) / 3.5, clipped to [0, 1]."""
    return clamp01((float(factor) - 1.0) / 3.5)


def downsample_factor(
    image: np.ndarray, rng: np.random.Generator, factor: float
) -> tuple[np.ndarray, Label]:
    """Down- and up-sampling by a fixed factor with random interpolations; the spec form
    `downsample:F`."""
    down = list(DOWN_INTERP)[rng.integers(len(DOWN_INTERP))]
    up = list(UP_INTERP)[rng.integers(len(UP_INTERP))]
    f = round(float(factor), 4)
    return apply_downsample(image, f, down, up), Label.single(
        "downsample", factor_severity(f), factor=f, down=down, up=up
    )


def downsample(
    image: np.ndarray, rng: np.random.Generator, severity: float
) -> tuple[np.ndarray, Label]:
    """Down-sampling by 2, 3 or 4 picked by severity (thirds of [0, 1])."""
    s = clamp01(severity)
    return downsample_factor(image, rng, FACTORS[min(2, int(s * 3.0))])
