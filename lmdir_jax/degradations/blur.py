"""Optical blur: isotropic Gaussian (defocus-like) blur and linear motion blur (kind "blur").

Severity maps to the Gaussian sigma 0.5-4 px or the motion length 3-25 px; the motion angle is
uniform. `blur:SIGMA` in a spec is a Gaussian blur of that sigma in pixels.
"""

from __future__ import annotations

import cv2
import numpy as np

from lmdir_jax.degradations.imageops import (
    as_float_image,
    clamp01,
    clip01,
    filter_image,
    lerp,
    line_kernel,
)
from lmdir_jax.degradations.label import Label

SIGMA_RANGE = (0.5, 4.0)  # Gaussian sigma in pixels at severity 0 and 1
LENGTH_RANGE = (3.0, 25.0)  # motion length in pixels at severity 0 and 1
MOTION_PROB = 0.4  # share of motion blur when sampling by severity


def apply_gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """cv2.GaussianBlur with the given sigma in pixels (kernel size chosen by OpenCV)."""
    image = as_float_image(image)
    if sigma <= 0:
        return image.copy()
    return clip01(
        cv2.GaussianBlur(image, (0, 0), sigmaX=float(sigma), borderType=cv2.BORDER_REFLECT_101)
    )


def apply_motion_blur(image: np.ndarray, length: float, angle: float) -> np.ndarray:
    """Blur along a straight line of `length` pixels at `angle` degrees."""
    return clip01(filter_image(as_float_image(image), line_kernel(length, angle)))


def gaussian_blur_sigma(image: np.ndarray, sigma: float) -> tuple[np.ndarray, Label]:
    """Gaussian blur of a given sigma in pixels; the spec form `blur:SIGMA`."""
    lo, hi = SIGMA_RANGE
    sev = (float(sigma) - lo) / (hi - lo) if sigma > 0 else 0.0
    return apply_gaussian_blur(image, sigma), Label.single(
        "blur", max(sev, 0.01 if sigma > 0 else 0.0), "gaussian", sigma=round(float(sigma), 3)
    )


def gaussian_blur(
    image: np.ndarray, rng: np.random.Generator, severity: float
) -> tuple[np.ndarray, Label]:
    """Gaussian blur with sigma from 0.5 px (severity 0) to 4 px (severity 1)."""
    s = clamp01(severity)
    sigma = lerp(*SIGMA_RANGE, s)
    return apply_gaussian_blur(image, sigma), Label.single(
        "blur", s, "gaussian", sigma=round(sigma, 3)
    )


def motion_blur(
    image: np.ndarray, rng: np.random.Generator, severity: float
) -> tuple[np.ndarray, Label]:
    """Linear motion blur, length 3-25 px by severity, uniform random angle."""
    s = clamp01(severity)
    length = lerp(*LENGTH_RANGE, s)
    angle = float(rng.uniform(0.0, 180.0))
    return apply_motion_blur(image, length, angle), Label.single(
        "blur", s, "motion", length=round(length, 2), angle=round(angle, 1)
    )


def blur(image: np.ndarray, rng: np.random.Generator, severity: float) -> tuple[np.ndarray, Label]:
    """Gaussian blur (60%) or motion blur (40%) at the given severity."""
    if rng.random() < MOTION_PROB:
        return motion_blur(image, rng, severity)
    return gaussian_blur(image, rng, severity)
