"""JPEG compression artifacts (kind "jpeg"): an encode/decode round trip through OpenCV.

Severity maps linearly to the quality: 90 at severity 0, 10 at severity 1. `jpeg:Q` in a spec is
quality Q (1-100).
"""

from __future__ import annotations

import cv2
import numpy as np

from lmdir_jax.degradations.imageops import as_float_image, clamp01
from lmdir_jax.degradations.label import Label

QUALITY_RANGE = (90, 10)  # quality at severity 0 and 1


def apply_jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """Encode as JPEG of `quality` (4:2:0 chroma, OpenCV defaults) and decode back to float32 RGB."""
    image = as_float_image(image)
    u8 = cv2.cvtColor((np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", u8, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("cv2.imencode failed for JPEG")
    dec = cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return dec.astype(np.float32) * np.float32(1.0 / 255.0)


def quality_severity(quality: float) -> float:
    """Severity of a JPEG quality: 0 at 90 or above, 1 at 10 or below."""
    hi, lo = QUALITY_RANGE
    return clamp01((hi - float(quality)) / (hi - lo))


def jpeg_quality(image: np.ndarray, quality: int) -> tuple[np.ndarray, Label]:
    """JPEG round trip at a fixed quality; the spec form `jpeg:Q`."""
    q = int(round(quality))
    return apply_jpeg(image, q), Label.single("jpeg", quality_severity(q), quality=q)


def jpeg(image: np.ndarray, rng: np.random.Generator, severity: float) -> tuple[np.ndarray, Label]:
    """JPEG round trip with quality from 90 (severity 0) down to 10 (severity 1)."""
    s = clamp01(severity)
    hi, lo = QUALITY_RANGE
    q = int(round(hi + (lo - hi) * s))
    return apply_jpeg(image, q), Label.single("jpeg", s, quality=q)
