"""Sensor noise: additive Gaussian noise and signal-dependent Poisson-Gaussian noise (kind "noise").

Severity maps linearly to the noise level: Gaussian sigma = 50 * severity on the 0-255 scale.
Poisson-Gaussian noise follows the heteroscedastic model of Foi et al. (2008),
y = x + sqrt(a * x + b^2) * n with n ~ N(0, 1): a is the photon (shot) noise gain and b the read
noise; the Gaussian approximation of the Poisson term is vectorised and much faster than sampling
Poisson counts.
"""

from __future__ import annotations

import numpy as np

from lmdir_jax.degradations.imageops import as_float_image, clamp01, clip01, lerp, standard_normal
from lmdir_jax.degradations.label import Label

SIGMA_MAX = 50.0  # Gaussian sigma at severity 1, on the 0-255 scale
POISSON_GAUSSIAN_PROB = 0.3  # share of the Poisson-Gaussian variant when sampling by severity


def add_gaussian_noise(image: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """image + N(0, (sigma/255)^2), clipped to [0, 1]; sigma on the 0-255 scale."""
    image = as_float_image(image)
    out = standard_normal(rng, image.shape)
    out *= np.float32(sigma / 255.0)
    out += image
    return clip01(out)


def add_poisson_gaussian_noise(
    image: np.ndarray, rng: np.random.Generator, shot: float, read: float
) -> np.ndarray:
    """x + sqrt(shot * x + read^2) * N(0, 1), clipped; shot = 1/photons at full scale, read in [0, 1]."""
    image = as_float_image(image)
    out = image * np.float32(shot)  # the per-pixel variance, then std, in place
    out += np.float32(read * read)
    np.sqrt(out, out=out)
    out *= standard_normal(rng, image.shape)
    out += image
    return clip01(out)


def gaussian_noise(
    image: np.ndarray, rng: np.random.Generator, severity: float
) -> tuple[np.ndarray, Label]:
    """Additive Gaussian noise with sigma = 50 * severity (0-255 scale)."""
    sigma = SIGMA_MAX * clamp01(severity)
    return gaussian_noise_sigma(image, rng, sigma)


def gaussian_noise_sigma(
    image: np.ndarray, rng: np.random.Generator, sigma: float
) -> tuple[np.ndarray, Label]:
    """Additive Gaussian noise of a given sigma (0-255 scale); the spec form `noise:SIGMA`."""
    out = add_gaussian_noise(image, rng, sigma)
    return out, Label.single("noise", sigma / SIGMA_MAX, "gaussian", sigma=round(float(sigma), 3))


def poisson_gaussian_noise(
    image: np.ndarray, rng: np.random.Generator, severity: float
) -> tuple[np.ndarray, Label]:
    """Signal-dependent noise: shot gain up to 0.04 (25 photons at white) plus read noise up to 15/255."""
    s = clamp01(severity)
    u = rng.uniform(0.7, 1.0)  # split of the severity between shot and read noise
    shot = lerp(0.0, 0.04, s * u)
    read = lerp(0.0, 15.0, s * (1.7 - u)) / 255.0
    out = add_poisson_gaussian_noise(image, rng, shot, read)
    return out, Label.single(
        "noise", s, "poisson-gaussian", shot=round(shot, 6), read=round(read * 255.0, 3)
    )


def noise(image: np.ndarray, rng: np.random.Generator, severity: float) -> tuple[np.ndarray, Label]:
    """Gaussian noise (70%) or Poisson-Gaussian noise (30%) at the given severity."""
    if rng.random() < POISSON_GAUSSIAN_PROB:
        return poisson_gaussian_noise(image, rng, severity)
    return gaussian_noise(image, rng, severity)
