"""Small image helpers shared by the degradation kinds: input checks, clipping, kernels, blending."""

from __future__ import annotations

import cv2
import numpy as np


def as_float_image(image: np.ndarray) -> np.ndarray:
    """Check an HxWx3 image and return it as contiguous float32 (values are not rescaled)."""
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {image.shape}")
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"expected a float image in [0, 1], got dtype {image.dtype}")
    return np.ascontiguousarray(image, dtype=np.float32)


def clamp01(x: float) -> float:
    """A Python float clipped to [0, 1] (np.clip is ~50x slower on scalars)."""
    return min(1.0, max(0.0, float(x)))


def clip01(image: np.ndarray) -> np.ndarray:
    """Clip to [0, 1] in place when possible and return float32."""
    image = np.asarray(image, dtype=np.float32)
    return np.clip(image, 0.0, 1.0, out=image)


def line_kernel(length: float, angle_deg: float, width: int = 1) -> np.ndarray:
    """Normalised float32 kernel of a centred line segment (motion blur, rain streaks).

    `length` in pixels (>= 1), `angle_deg` measured from the horizontal axis, counter-clockwise.
    """
    length = max(1.0, float(length))
    size = int(np.ceil(length)) | 1  # odd
    size = max(size, width | 1)
    k = np.zeros((size, size), np.float32)
    c = (size - 1) / 2.0
    dx = np.cos(np.deg2rad(angle_deg)) * (length - 1) / 2.0
    dy = -np.sin(np.deg2rad(angle_deg)) * (length - 1) / 2.0
    shift = 4  # sub-pixel precision of cv2.line
    p0 = (int(round((c - dx) * (1 << shift))), int(round((c - dy) * (1 << shift))))
    p1 = (int(round((c + dx) * (1 << shift))), int(round((c + dy) * (1 << shift))))
    cv2.line(k, p0, p1, 1.0, thickness=max(1, int(width)), lineType=cv2.LINE_AA, shift=shift)
    total = k.sum()
    if total <= 0:
        k[int(c), int(c)] = 1.0
        total = 1.0
    return k / total


def filter_image(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Correlate every channel with `kernel`, reflecting at the borders (cv2.filter2D)."""
    return cv2.filter2D(image, -1, kernel, borderType=cv2.BORDER_REFLECT_101)


def screen(image: np.ndarray, layer: np.ndarray) -> np.ndarray:
    """Screen blend 1 - (1 - image)(1 - layer) = image + layer (1 - image): adds light without
    leaving [0, 1]. `layer` is HxW (grey) or HxWx3."""
    if layer.ndim == 2:
        layer = layer[..., None]
    out = 1.0 - image
    out *= layer
    out += image
    return out


def standard_normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """float32 N(0, 1) samples of `shape`, seeded from `rng`.

    OpenCV's cv2.randn is about 4x faster than numpy's Ziggurat for image-sized arrays; its
    generator is thread-local, so seeding it from `rng` right before the call is deterministic.
    """
    out = np.empty(shape, np.float32)
    cv2.setRNGSeed(int(rng.integers(1, 2**31 - 1)))
    cv2.randn(out.reshape(shape[0], -1), 0.0, 1.0)
    return out


def segment_array(
    rng: np.random.Generator,
    shape: tuple[int, int],
    count: int,
    length: float,
    angle_deg: float,
    jitter: float = 0.2,
    angle_jitter: float = 3.0,
) -> np.ndarray:
    """int32 (count, 2, 2) end points of random line segments (for cv2.polylines with shift=4) of
    about `length` px at about `angle_deg` (from the horizontal, counter-clockwise), centred
    uniformly over the HxW canvas grown by length/2 on each side (so streak density does not drop
    near the borders)."""
    h, w = shape
    u = rng.random((count, 4))
    m = 0.5 * length
    centre = u[:, :2] * (w + 2 * m, h + 2 * m) - m
    half = 0.5 * length * (1.0 + jitter * (2.0 * u[:, 2] - 1.0))
    ang = np.deg2rad(angle_deg + angle_jitter * (2.0 * u[:, 3] - 1.0))
    d = np.stack([np.cos(ang) * half, -np.sin(ang) * half], 1)
    pts = np.stack([centre - d, centre + d], 1) * 16.0
    return np.round(pts).astype(np.int32)


def lerp(lo: float, hi: float, t: float) -> float:
    """lo + (hi - lo) * t."""
    return float(lo + (hi - lo) * t)
