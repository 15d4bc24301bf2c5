"""Rain streaks (kind "rain"): anti-aliased near-vertical line segments, screen-blended.

Parameters: density (streaks per pixel), length (px), angle (degrees from the horizontal; 90 is
vertical), width (px) and intensity (streak brightness). Each streak's length varies by +-60%, its
angle by +-3 degrees and its brightness among four levels; a light blur softens them. Severity raises density, length, width
and intensity together; the angle is random around vertical. `rain:S` in a spec is severity S in
[0, 1].
"""

from __future__ import annotations

import cv2
import numpy as np

from lmdir_jax.degradations.imageops import as_float_image, clamp01, clip01, lerp, screen, segments
from lmdir_jax.degradations.label import Label

DENSITY_RANGE = (0.0006, 0.01)
LENGTH_RANGE = (10.0, 36.0)
INTENSITY_RANGE = (0.45, 0.9)
MAX_TILT = 20.0  # degrees away from vertical
LEVELS = (0.3, 0.5, 0.75, 1.0)  # relative brightness of the streak groups
LENGTH_JITTER = 0.6  # each streak's length varies by +-60%
SOFTNESS = 0.6  # Gaussian sigma (px) that softens the drawn streaks


def rain_layer(
    rng: np.random.Generator,
    shape: tuple[int, int],
    density: float,
    length: float,
    angle: float,
    width: int,
) -> np.ndarray:
    """float32 HxW streak layer in [0, 1] (streak count ~ Poisson(density * area))."""
    h, w = shape
    area = (h + length) * (w + length)
    count = int(rng.poisson(density * area))
    segs = segments(rng, shape, count, length, angle, LENGTH_JITTER)
    layer = np.zeros(shape, np.float32)
    k = len(LEVELS)
    for g, level in enumerate(LEVELS):
        if segs[g::k]:
            cv2.polylines(layer, segs[g::k], False, level, int(width), cv2.LINE_AA, 4)
    return cv2.GaussianBlur(layer, (0, 0), sigmaX=SOFTNESS)


def apply_rain(
    image: np.ndarray,
    rng: np.random.Generator,
    density: float,
    length: float,
    angle: float,
    width: int,
    intensity: float,
) -> np.ndarray:
    """Add rain streaks with explicit parameters (see module docstring)."""
    image = as_float_image(image)
    layer = rain_layer(rng, image.shape[:2], density, length, angle, width)
    layer *= np.float32(intensity)
    return clip01(screen(image, layer))


def rain_params(rng: np.random.Generator, severity: float) -> dict:
    """Draw rain parameters for a severity in [0, 1]."""
    s = clamp01(severity)
    return dict(
        density=round(lerp(*DENSITY_RANGE, s) * float(rng.uniform(0.8, 1.2)), 5),
        length=round(lerp(*LENGTH_RANGE, s) * float(rng.uniform(0.8, 1.2)), 2),
        angle=round(90.0 + float(rng.uniform(-MAX_TILT, MAX_TILT)), 1),
        width=int(1 + (rng.random() < 0.05 + 0.35 * s)),
        intensity=round(lerp(*INTENSITY_RANGE, s), 3),
    )


def rain(image: np.ndarray, rng: np.random.Generator, severity: float) -> tuple[np.ndarray, Label]:
    """Rain streaks at the given severity (parameters drawn by `rain_params`)."""
    p = rain_params(rng, severity)
    return apply_rain(image, rng, **p), Label.single("rain", clamp01(severity), **p)
