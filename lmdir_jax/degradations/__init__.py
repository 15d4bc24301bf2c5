"""lmdir_jax.degradations: synthesis of each degradation kind, mixtures, labels and text, spec grammar.

Every kind is a function `fn(image, rng, severity) -> (image, Label)` on float32 HxWx3 images in
[0, 1]; see docs/degradations.md.
"""

from lmdir_jax.degradations.blur import blur, gaussian_blur, motion_blur
from lmdir_jax.degradations.haze import haze
from lmdir_jax.degradations.jpeg import jpeg
from lmdir_jax.degradations.label import KINDS, Degradation, Label, conditioning_text, vocabulary
from lmdir_jax.degradations.lowlight import lowlight
from lmdir_jax.degradations.mixture import (
    KIND_FUNCTIONS,
    apply_kinds,
    degrade,
    sample_degradation,
    sample_kinds,
)
from lmdir_jax.degradations.noise import gaussian_noise, noise, poisson_gaussian_noise
from lmdir_jax.degradations.rain import rain
from lmdir_jax.degradations.resample import downsample
from lmdir_jax.degradations.snow import snow
from lmdir_jax.degradations.spec import SpecItem, apply_spec, format_spec, parse_spec

__all__ = [
    "KINDS",
    "KIND_FUNCTIONS",
    "Degradation",
    "Label",
    "SpecItem",
    "apply_kinds",
    "apply_spec",
    "blur",
    "degrade",
    "downsample",
    "format_spec",
    "gaussian_blur",
    "gaussian_noise",
    "haze",
    "jpeg",
    "lowlight",
    "motion_blur",
    "noise",
    "parse_spec",
    "poisson_gaussian_noise",
    "rain",
    "sample_degradation",
    "sample_kinds",
    "snow",
    "vocabulary",
    "conditioning_text",
]
