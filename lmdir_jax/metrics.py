"""Image quality metrics as the restoration literature reports them: PSNR and SSIM on RGB and on Y.

Conventions (BasicSR / Restormer):
- images are float HxWx3 in [0, 1]; by default both are quantised to 8 bits first, as the published
  numbers are computed on saved 8-bit PNGs;
- Y is ITU-R BT.601 luma of the "studio swing" YCbCr: Y = 16 + 65.481 R + 128.553 G + 24.966 B
  (R, G, B in [0, 1], Y in [16, 235] on the 0-255 scale), compared with a peak of 255;
- SSIM (`window="gaussian"`, the default) follows BasicSR/Restormer and Wang et al. 2004: 11x11
  Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, population covariances; on RGB it is the
  mean over the three channels. PromptIR's test script instead calls scikit-image's
  `structural_similarity` with its defaults: a 7x7 uniform window with sample covariances
  (`window="uniform"`); the two differ by up to about 0.03 per image;
- the AirNet/PromptIR protocol first centre-crops both images to a multiple of 16 (`crop_multiple`).
"""

from __future__ import annotations

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

BT601_Y = np.array([65.481, 128.553, 24.966], np.float64)


def crop_to_multiple(image: np.ndarray, multiple: int) -> np.ndarray:
    """Centre-crop H and W down to a multiple of `multiple` (AirNet/PromptIR `crop_img`); 0/1 = as is.

    A side shorter than `multiple` is kept whole rather than cropped to nothing.
    """
    if multiple <= 1:
        return image
    h, w = image.shape[:2]
    ch = h % multiple if h >= multiple else 0
    cw = w % multiple if w >= multiple else 0
    return image[ch // 2 : h - ch + ch // 2, cw // 2 : w - cw + cw // 2]


def quantize(image: np.ndarray) -> np.ndarray:
    """Round a [0, 1] float image to the 8-bit grid (what writing and re-reading a PNG does)."""
    return np.round(np.clip(image, 0.0, 1.0) * 255.0) / 255.0


def rgb_to_y(image: np.ndarray) -> np.ndarray:
    """BT.601 luma of an RGB image in [0, 1], returned in [0, 1] units of the 0-255 scale (Y/255)."""
    return (16.0 + image[..., :3].astype(np.float64) @ BT601_Y) / 255.0


def psnr(restored: np.ndarray, target: np.ndarray) -> float:
    """PSNR in dB for images in [0, 1] (peak 1); identical images give +inf."""
    with np.errstate(divide="ignore"):
        return float(
            peak_signal_noise_ratio(
                target.astype(np.float64), restored.astype(np.float64), data_range=1.0
            )
        )


SSIM_WINDOWS = ("gaussian", "uniform")


def ssim(restored: np.ndarray, target: np.ndarray, window: str = "gaussian") -> float:
    """SSIM for HxW or HxWxC images in [0, 1].

    `window`: 'gaussian' (BasicSR/Restormer: 11x11 Gaussian, sigma 1.5, population covariance) or
    'uniform' (scikit-image's defaults as PromptIR's test script uses them: 7x7 uniform window,
    sample covariance).
    """
    a, b = restored.astype(np.float64), target.astype(np.float64)
    axis = -1 if a.ndim == 3 else None
    if window == "uniform":
        return float(structural_similarity(b, a, data_range=1.0, channel_axis=axis))
    if window != "gaussian":
        raise ValueError(f"SSIM window must be one of {SSIM_WINDOWS}, got {window!r}")
    return float(
        structural_similarity(
            b,
            a,
            data_range=1.0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            channel_axis=axis,
        )
    )


def image_metrics(
    restored: np.ndarray,
    target: np.ndarray,
    *,
    crop_multiple: int = 0,
    border: int = 0,
    to_uint8: bool = True,
    ssim_window: str = "gaussian",
) -> dict[str, float]:
    """PSNR/SSIM on RGB and on Y of `restored` against `target` (both HxWx3 in [0, 1]).

    `crop_multiple` applies the AirNet/PromptIR centre crop; `border` shaves that many pixels off
    every side (the super-resolution convention); `to_uint8` quantises both images first;
    `ssim_window` is `ssim`'s window ('gaussian' or 'uniform').
    Returns {"psnr_rgb", "ssim_rgb", "psnr_y", "ssim_y"}.
    """
    if restored.shape[:2] != target.shape[:2]:
        raise ValueError(f"image sizes differ: {restored.shape[:2]} vs {target.shape[:2]}")
    a, b = restored[..., :3], target[..., :3]
    a, b = crop_to_multiple(a, crop_multiple), crop_to_multiple(b, crop_multiple)
    if border > 0:
        a, b = a[border:-border, border:-border], b[border:-border, border:-border]
    if to_uint8:
        a, b = quantize(a), quantize(b)
    ya, yb = rgb_to_y(a), rgb_to_y(b)
    return {
        "psnr_rgb": psnr(a, b),
        "ssim_rgb": ssim(a, b, ssim_window),
        "psnr_y": psnr(ya, yb),
        "ssim_y": ssim(ya, yb, ssim_window),
    }
