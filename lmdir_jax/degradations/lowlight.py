"""Low light (kind "lowlight"): gamma and exposure darkening plus signal-dependent sensor noise.

dark = exposure * image ** gamma, then Poisson-Gaussian noise (shot + read) on the dark signal, as a
camera would record an under-exposed scene. Severity maps to gamma 1.2-3.0, exposure 0.8-0.15 and
the noise gains together. In a spec, `lowlight:V` is a severity when V <= 1 and a gamma when V > 1.
"""

from __future__ import annotations

import cv2
import numpy as np

from lmdir_jax.degradations.imageops import as_float_image, clamp01, clip01, lerp
from lmdir_jax.degradations.label import Label
from lmdir_jax.degradations.noise import add_poisson_gaussian_noise

GAMMA_RANGE = (1.2, 3.0)
EXPOSURE_RANGE = (0.8, 0.15)
SHOT_RANGE = (0.0005, 0.006)
READ_RANGE = (0.5 / 255.0, 4.0 / 255.0)


def apply_lowlight(
    image: np.ndarray,
    rng: np.random.Generator,
    gamma: float,
    exposure: float,
    shot: float,
    read: float,
) -> np.ndarray:
    """exposure * image ** gamma plus Poisson-Gaussian noise (shot gain, read sigma in [0, 1])."""
    image = as_float_image(image)
    dark = cv2.pow(np.maximum(image, 0.0), float(gamma))
    dark *= np.float32(exposure)
    if shot > 0 or read > 0:
        dark = add_poisson_gaussian_noise(dark, rng, shot, read)
    return clip01(dark)


def lowlight_params(rng: np.random.Generator, severity: float) -> dict:
    """Draw low-light parameters for a severity in [0, 1]."""
    s = clamp01(severity)
    j = float(rng.uniform(0.7, 1.3))
    return dict(
        gamma=round(lerp(*GAMMA_RANGE, s), 3),
        exposure=round(lerp(*EXPOSURE_RANGE, s), 4),
        shot=round(lerp(*SHOT_RANGE, s) * j, 6),
        read=round(lerp(*READ_RANGE, s) * j, 6),
    )


def lowlight(
    image: np.ndarray, rng: np.random.Generator, severity: float
) -> tuple[np.ndarray, Label]:
    """Low light at the given severity (parameters drawn by `lowlight_params`)."""
    p = lowlight_params(rng, severity)
    return apply_lowlight(image, rng, **p), Label.single("lowlight", clamp01(severity), **p)


def lowlight_gamma(
    image: np.ndarray, rng: np.random.Generator, gamma: float
) -> tuple[np.ndarray, Label]:
    """Low light with a fixed gamma (> 1); exposure and noise follow the matching severity."""
    lo, hi = GAMMA_RANGE
    s = clamp01((gamma - lo) / (hi - lo))
    p = lowlight_params(rng, s)
    p["gamma"] = round(float(gamma), 3)
    return apply_lowlight(image, rng, **p), Label.single("lowlight", max(s, 0.01), **p)
