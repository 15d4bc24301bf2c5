"""Rain streaks (kind "rain") in two styles, drawn at random per image:

- "screen": anti-aliased near-vertical segments of four brightness levels, screen-blended, up to 2 px
  wide: heavy rain that veils the image (each streak's angle varies by +-3 degrees).
- "additive": thin (1 px) streaks whose brightness varies along their length, added to the image
  as a grey layer (degraded = clip(clean + layer)), nearly parallel within an image (+-0.5 degrees),
  tilted up to 27 degrees: the rain of Rain100L and of the Rain100L/Rain200L training pairs.
  Its constants were set so that `scripts/rain_statistics.py`'s streak statistics (angle, width,
  length, density, brightness, blending, input PSNR) match Rain100L's; docs/degradations.md ("Rain
  against Rain100L") has the table.

Parameters: style, density (streaks per pixel), length (px), angle (degrees from the horizontal; 90
is vertical), width (px) and intensity (the brightest streak's light). Each streak's length varies
by +-60%; a Gaussian blur (sigma 0.6 px) softens the streaks. Severity raises density, length and
intensity (and the screen style's width) together. `rain:S` in a spec is severity S in [0, 1];
a share `additive_share` of the images (default ADDITIVE_SHARE; in training `data.rain_additive_share`)
get the additive style.
"""

from __future__ import annotations

from typing import NamedTuple

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

STYLES = ("screen", "additive")
ADDITIVE_SHARE = 0.5  # the share of images with the additive (Rain100L) style
LENGTH_JITTER = 0.6  # each streak's length varies by +-60%
SOFTNESS = 0.6  # Gaussian sigma (px) that softens the drawn streaks


class _Style(NamedTuple):
    """The constants of one style (module doc)."""

    density: tuple[float, float]  # streaks per pixel over severity
    length: tuple[float, float]  # px
    intensity: tuple[float, float]  # the brightest streak's light
    max_tilt: float  # degrees away from vertical
    angle_jitter: float  # degrees, per streak
    levels: tuple[float, ...]  # relative brightness of the streak pieces
    pieces: int  # pieces per streak, each at its own level


SCREEN = _Style(density=(0.0006, 0.01), length=(10.0, 36.0), intensity=(0.45, 0.9), max_tilt=20.0,
                angle_jitter=3.0, levels=(0.3, 0.5, 0.75, 1.0), pieces=1)
ADDITIVE = _Style(density=(0.0017, 0.007), length=(10.0, 28.0), intensity=(0.35, 0.7),
                  max_tilt=27.0, angle_jitter=0.5,
                  levels=(0.07, 0.1, 0.15, 0.22, 0.33, 0.5, 0.7, 1.0), pieces=4)
_STYLES = {"screen": SCREEN, "additive": ADDITIVE}


def _style(name: str) -> _Style:
    if name not in _STYLES:
        raise ValueError(f"rain style must be one of {', '.join(STYLES)}, got {name!r}")
    return _STYLES[name]


def rain_layer(
    rng: np.random.Generator,
    shape: tuple[int, int],
    density: float,
    length: float,
    angle: float,
    width: int,
    style: str = "screen",
) -> np.ndarray:
    """float32 HxW streak layer in [0, 1] (streak count ~ Poisson(density * area))."""
    st = _style(style)
    h, w = shape
    area = (h + length) * (w + length)
    count = int(rng.poisson(density * area))
    layer = np.zeros(shape, np.float32)
    if count == 0:
        return layer
    ends = segment_array(rng, shape, count, length, angle, LENGTH_JITTER, st.angle_jitter)
    k = len(st.levels)
    if st.pieces == 1:  # streak i at level i mod k
        pieces, level = ends, np.arange(count) % k
    else:  # a base level per streak; each piece that level or a neighbouring one
        t = np.linspace(0.0, 1.0, st.pieces + 1)[:, None, None]
        knots = ends[None, :, 0] + t * (ends[None, :, 1] - ends[None, :, 0]).astype(np.float64)
        pieces = np.round(np.stack([knots[:-1], knots[1:]], 2).reshape(-1, 2, 2)).astype(np.int32)
        base = rng.integers(0, k, count)
        step = rng.integers(-1, 2, (st.pieces, count))
        level = np.clip(base[None] + step, 0, k - 1).ravel()
    for g, value in enumerate(st.levels):
        sel = pieces[level == g]
        if len(sel):
            cv2.polylines(layer, sel, False, value, int(width), cv2.LINE_AA, 4)
    return cv2.GaussianBlur(layer, (0, 0), sigmaX=SOFTNESS)


def apply_rain(
    image: np.ndarray,
    rng: np.random.Generator,
    density: float,
    length: float,
    angle: float,
    width: int,
    intensity: float,
    style: str = "screen",
) -> np.ndarray:
    """Add rain streaks with explicit parameters (see module docstring)."""
    image = as_float_image(image)
    layer = rain_layer(rng, image.shape[:2], density, length, angle, width, style)
    layer *= np.float32(intensity)
    if style == "screen":
        return clip01(screen(image, layer))
    out = image + layer[..., None]
    return np.minimum(out, 1.0, out=out)  # the layer is >= 0: only 1 can be exceeded


def rain_params(rng: np.random.Generator, severity: float, style: str | None = None,
                additive_share: float = ADDITIVE_SHARE) -> dict:
    """Draw rain parameters for a severity in [0, 1]; the style too unless given (additive with
    probability `additive_share`)."""
    s = clamp01(severity)
    if style is None:
        style = "additive" if rng.random() < additive_share else "screen"
    st = _style(style)
    width = int(1 + (rng.random() < 0.05 + 0.35 * s)) if style == "screen" else 1
    return dict(
        style=style,
        density=round(lerp(*st.density, s) * float(rng.uniform(0.8, 1.2)), 5),
        length=round(lerp(*st.length, s) * float(rng.uniform(0.8, 1.2)), 2),
        angle=round(90.0 + float(rng.uniform(-st.max_tilt, st.max_tilt)), 1),
        width=width,
        intensity=round(lerp(*st.intensity, s), 3),
    )


def rain(image: np.ndarray, rng: np.random.Generator, severity: float,
         additive_share: float = ADDITIVE_SHARE) -> tuple[np.ndarray, Label]:
    """Rain streaks at the given severity (style and parameters drawn by `rain_params`)."""
    p = rain_params(rng, severity, additive_share=additive_share)
    return apply_rain(image, rng, **p), Label.single("rain", clamp01(severity), **p)
