"""Haze by the atmospheric scattering model (kind "haze").

I = J * t + A * (1 - t), t = exp(-beta * d), with d a smooth pseudo-depth in [0.3, 1]: a
top-to-bottom ramp (the sky and horizon are far, the ground is near) mixed with a smooth random
field. Severity maps linearly to beta 0.2-1.0; the airlight A is a near-white grey in 0.75-1.0 with a
slight tint. `haze:BETA` in a spec fixes beta.

Two choices make the synthetic haze look like RESIDE's, the dehazing benchmark's:
- the transmission stays in about [0.37, 0.94] (severity 0.5: [0.55, 0.84]); SOTS-outdoor's pairs have
  t of about 0.45-0.82. The old beta range (to 2.2, t down to 0.11) made haze far heavier than the
  test data (training input median 11.6 dB against SOTS's 18 dB) and the network did not learn it;
- the depth field has a fixed spatial scale (`DEPTH_CANVAS` pixels, the size of a typical photo) and a
  small image or training patch gets a random window of it, so a 96-pixel patch sees the gentle depth
  change of a crop of a hazy photo, not a whole 4x4 depth field squeezed into 96 pixels.
"""

from __future__ import annotations

import cv2
import numpy as np

from lmdir_jax.degradations.imageops import as_float_image, clamp01, clip01, lerp
from lmdir_jax.degradations.label import Label

BETA_RANGE = (0.2, 1.0)
AIRLIGHT_RANGE = (0.75, 1.0)
DEPTH_RANGE = (0.3, 1.0)
DEPTH_CANVAS = 384  # pixels: the depth field of an image at least this large spans the image


def pseudo_depth(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Smooth float32 (H, W) pseudo-depth in DEPTH_RANGE: a top-to-bottom ramp mixed with a random
    field, built on a 4x4 grid and cubic-upsampled to a canvas of at least DEPTH_CANVAS pixels a
    side, of which an image smaller than the canvas gets a random window (so patches see depth at
    the scale whole photos do)."""
    h, w = shape
    ch, cw = max(h, DEPTH_CANVAS), max(w, DEPTH_CANVAS)
    ramp = np.linspace(1.0, 0.0, 4, dtype=np.float32)[:, None]
    mix = np.float32(rng.uniform(0.3, 0.8))
    coarse = mix * ramp + (1 - mix) * rng.random((4, 4), dtype=np.float32)
    coarse -= coarse.min()
    lo, hi = DEPTH_RANGE
    coarse *= np.float32((hi - lo) / max(float(coarse.max()), 1e-6))
    coarse += np.float32(lo)
    d = cv2.resize(coarse, (cw, ch), interpolation=cv2.INTER_CUBIC)
    y, x = int(rng.integers(ch - h + 1)), int(rng.integers(cw - w + 1))
    d = np.ascontiguousarray(d[y : y + h, x : x + w])
    return np.clip(d, lo, hi, out=d)


def apply_haze(
    image: np.ndarray, depth: np.ndarray, beta: float, airlight: tuple[float, float, float]
) -> np.ndarray:
    """J * t + A * (1 - t) with t = exp(-beta * depth)."""
    image = as_float_image(image)
    t = cv2.exp(depth * np.float32(-beta))
    a = (*(float(v) for v in airlight), 0.0)  # an OpenCV Scalar: per-channel without broadcasting
    out = cv2.subtract(image, a)  # A + (J - A) t; cv2 is ~5x faster than numpy's (3,) broadcast
    cv2.multiply(out, cv2.merge((t, t, t)), dst=out)
    cv2.add(out, a, dst=out)
    return clip01(out)


def _airlight(rng: np.random.Generator) -> tuple[float, float, float]:
    a = float(rng.uniform(*AIRLIGHT_RANGE))
    tint = rng.uniform(-0.03, 0.03, 3)
    return tuple(round(clamp01(a + d), 4) for d in tint)


def beta_severity(beta: float) -> float:
    """Severity of a scattering coefficient beta (0 at 0.2 or less, 1 at 1.0 or more)."""
    lo, hi = BETA_RANGE
    return clamp01((beta - lo) / (hi - lo))


def haze_beta(image: np.ndarray, rng: np.random.Generator, beta: float) -> tuple[np.ndarray, Label]:
    """Haze with a fixed beta (random depth and airlight); the spec form `haze:BETA`."""
    depth = pseudo_depth(image.shape[:2], rng)
    a = _airlight(rng)
    sev = max(beta_severity(beta), 0.01 if beta > 0 else 0.0)
    return apply_haze(image, depth, beta, a), Label.single(
        "haze", sev, beta=round(float(beta), 4), airlight=a
    )


def haze(image: np.ndarray, rng: np.random.Generator, severity: float) -> tuple[np.ndarray, Label]:
    """Haze with beta from 0.2 (severity 0) to 1.0 (severity 1)."""
    s = clamp01(severity)
    out, label = haze_beta(image, rng, lerp(*BETA_RANGE, s))
    d = label.items[0]
    return out, Label.single("haze", s, **d.params)
