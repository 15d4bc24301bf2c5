"""Falling snow (kind "snow"): soft flakes of two sizes, smeared along the fall, and a bright veil.

Flakes are anti-aliased round-capped segments (a short segment is a disc) drawn with OpenCV and
softened by a small Gaussian blur. Severity raises the flake densities and sizes, the smear length
and the veil. `snow:S` in a spec is severity S in [0, 1].
"""

from __future__ import annotations

import cv2
import numpy as np

from lmdir_jax.degradations.imageops import (
    as_float_image,
    clamp01,
    clip01,
    lerp,
    screen,
    segment_array,
)
from lmdir_jax.degradations.label import Label

SMALL_DENSITY_RANGE = (0.002, 0.012)  # small flakes per pixel
LARGE_DENSITY_RANGE = (0.0002, 0.0015)  # large flakes per pixel
VEIL_RANGE = (0.02, 0.2)


def snow_layer(
    rng: np.random.Generator,
    shape: tuple[int, int],
    small_density: float,
    large_density: float,
    small_size: int,
    large_size: int,
    fall_length: float,
    angle: float,
    softness: float,
) -> np.ndarray:
    """float32 HxW flake layer in [0, 1]."""
    h, w = shape
    area = (h + fall_length) * (w + fall_length)
    layer = np.zeros(shape, np.float32)
    for dens, size, levels in (
        (small_density, small_size, (0.7, 0.9)),
        (large_density, large_size, (0.85, 1.0)),
    ):
        segs = list(segment_array(rng, shape, int(rng.poisson(dens * area)), fall_length, angle, 0.5, 10.0))
        for g, level in enumerate(levels):
            if segs[g::2]:
                cv2.polylines(layer, segs[g::2], False, level, int(size), cv2.LINE_AA, 4)
    if softness > 0:
        layer = cv2.GaussianBlur(layer, (0, 0), sigmaX=float(softness))
    return layer


def apply_snow(
    image: np.ndarray,
    rng: np.random.Generator,
    small_density: float,
    large_density: float,
    small_size: int,
    large_size: int,
    fall_length: float,
    angle: float,
    softness: float,
    veil: float,
) -> np.ndarray:
    """Add snow with explicit parameters: flakes per pixel, flake sizes (px), smear length (px)
    and angle (degrees), softness (blur sigma, px) and veil (brightening towards white, 0-1)."""
    image = as_float_image(image)
    layer = snow_layer(
        rng,
        image.shape[:2],
        small_density,
        large_density,
        small_size,
        large_size,
        fall_length,
        angle,
        softness,
    )
    out = image * np.float32(1.0 - veil)
    out += np.float32(0.92 * veil)
    return clip01(screen(out, layer))


def snow_params(rng: np.random.Generator, severity: float) -> dict:
    """Draw snow parameters for a severity in [0, 1]."""
    s = clamp01(severity)
    j = float(rng.uniform(0.8, 1.2))
    return dict(
        small_density=round(lerp(*SMALL_DENSITY_RANGE, s) * j, 5),
        large_density=round(lerp(*LARGE_DENSITY_RANGE, s) * j, 5),
        small_size=int(1 + (rng.random() < s)),
        large_size=int(round(lerp(2.0, 5.0, s) * float(rng.uniform(0.8, 1.2)))),
        fall_length=round(lerp(1.0, 8.0, s) * float(rng.uniform(0.7, 1.3)), 2),
        angle=round(90.0 + float(rng.uniform(-40.0, 40.0)), 1),
        softness=round(lerp(0.5, 1.0, s), 3),
        veil=round(lerp(*VEIL_RANGE, s), 3),
    )


def snow(image: np.ndarray, rng: np.random.Generator, severity: float) -> tuple[np.ndarray, Label]:
    """Snow at the given severity (parameters drawn by `snow_params`)."""
    p = snow_params(rng, severity)
    return apply_snow(image, rng, **p), Label.single("snow", clamp01(severity), **p)
