"""The degradation spec grammar: `kind[:value]` joined by `+`, e.g. `noise:25+jpeg:30`.

Each kind's value has its own meaning (see `VALUE_HELP`); a value may also be a severity word
(`light`, `moderate`, `heavy`), and a kind without a value uses `DEFAULT_SEVERITY` (medium).
`clean` (alone) means no degradation. Kinds are applied in `KINDS` order whatever the order written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lmdir_jax.degradations.blur import gaussian_blur_sigma
from lmdir_jax.degradations.haze import haze_beta
from lmdir_jax.degradations.imageops import as_float_image
from lmdir_jax.degradations.jpeg import jpeg_quality
from lmdir_jax.degradations.label import KINDS, Label
from lmdir_jax.degradations.lowlight import lowlight_gamma
from lmdir_jax.degradations.mixture import KindOptions, degrade
from lmdir_jax.degradations.noise import gaussian_noise_sigma
from lmdir_jax.degradations.resample import downsample_factor
from lmdir_jax.errors import UsageError

DEFAULT_SEVERITY = 0.5
SEVERITY_LEVELS = {"light": 0.2, "moderate": 0.5, "medium": 0.5, "heavy": 0.85}

# What a numeric value means for each kind, with its valid closed range.
VALUE_HELP: dict[str, tuple[str, float, float]] = {
    "rain": ("severity", 0.0, 1.0),
    "snow": ("severity", 0.0, 1.0),
    "haze": ("scattering coefficient beta", 0.0, 5.0),
    "lowlight": ("severity (<= 1) or gamma (> 1)", 0.0, 6.0),
    "blur": ("gaussian sigma in pixels", 0.0, 10.0),
    "downsample": ("factor", 1.0, 8.0),
    "noise": ("gaussian sigma on the 0-255 scale", 0.0, 100.0),
    "jpeg": ("quality", 1.0, 100.0),
}

Apply = Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, Label]]


def _value_fn(kind: str, v: float, options: KindOptions | None = None) -> Apply:
    """The function applying `kind` with numeric spec value `v` (already range-checked); `options`
    reach a severity kind's function as in `mixture.degrade`."""
    if kind == "noise":
        return lambda im, rng: gaussian_noise_sigma(im, rng, v)
    if kind == "jpeg":
        return lambda im, rng: jpeg_quality(im, int(round(v)))
    if kind == "downsample":
        return lambda im, rng: downsample_factor(im, rng, v)
    if kind == "blur":
        return lambda im, rng: gaussian_blur_sigma(im, v)
    if kind == "haze":
        return lambda im, rng: haze_beta(im, rng, v)
    if kind == "lowlight" and v > 1.0:
        return lambda im, rng: lowlight_gamma(im, rng, v)
    return lambda im, rng: degrade(im, kind, rng, v, options)  # a severity (rain, snow, lowlight <= 1)


@dataclass(frozen=True)
class SpecItem:
    """One parsed `kind[:value]`: value is a float, a severity word, or None (default severity)."""

    kind: str
    value: float | str | None = None

    def __str__(self) -> str:
        if self.value is None:
            return self.kind
        v = self.value
        return f"{self.kind}:{v:g}" if isinstance(v, float) else f"{self.kind}:{v}"

    def apply(self, image: np.ndarray, rng: np.random.Generator,
              options: KindOptions | None = None) -> tuple[np.ndarray, Label]:
        """Apply this item to an image (with its kind's keyword `options`, if any)."""
        if self.value is None or isinstance(self.value, str):
            sev = DEFAULT_SEVERITY if self.value is None else SEVERITY_LEVELS[self.value]
            return degrade(image, self.kind, rng, sev, options)
        return _value_fn(self.kind, self.value, options)(image, rng)


def _bad(part: str, why: str) -> UsageError:
    return UsageError(
        f"bad degradation spec part {part!r}: {why} (valid kinds: {', '.join(KINDS)})"
    )


def parse_spec(spec: str) -> list[SpecItem]:
    """Parse `kind[:value]+...` into items sorted in `KINDS` order; `clean` gives [].

    Raises UsageError naming the bad part and listing the valid kinds.
    """
    text = (spec or "").strip().lower()
    if not text:
        raise UsageError(f"empty degradation spec (valid kinds: {', '.join(KINDS)}, or clean)")
    if text == "clean":
        return []
    items: dict[str, SpecItem] = {}
    for raw in text.split("+"):
        part = raw.strip()
        kind, sep, val = part.partition(":")
        kind, val = kind.strip(), val.strip()
        if kind not in VALUE_HELP:
            raise _bad(part, f"unknown kind {kind!r}")
        if kind in items:
            raise _bad(part, f"{kind} given twice")
        if not sep:
            items[kind] = SpecItem(kind)
            continue
        meaning, lo, hi = VALUE_HELP[kind]
        if val in SEVERITY_LEVELS:
            items[kind] = SpecItem(kind, val)
            continue
        try:
            v = float(val)
        except ValueError:
            raise _bad(
                part,
                f"value {val!r} is not a number ({kind} takes {meaning}) nor light/moderate/heavy",
            ) from None
        if not (lo <= v <= hi) or (kind == "downsample" and v == 1.0):
            rng_txt = f"({lo:g}, {hi:g}]" if kind == "downsample" else f"[{lo:g}, {hi:g}]"
            raise _bad(part, f"{kind} takes {meaning} in {rng_txt}, got {v:g}")
        items[kind] = SpecItem(kind, v)
    return sorted(items.values(), key=lambda it: KINDS.index(it.kind))


def format_spec(items: list[SpecItem]) -> str:
    """Inverse of parse_spec (canonical order): '' items -> 'clean'."""
    return "+".join(str(it) for it in items) or "clean"


def apply_spec(
    image: np.ndarray, spec: str | list[SpecItem], rng: np.random.Generator,
    options: KindOptions | None = None,
) -> tuple[np.ndarray, Label]:
    """Degrade an image by a spec (string or parsed items), in `KINDS` order; `options` as in
    `mixture.sample_degradation`."""
    items = parse_spec(spec) if isinstance(spec, str) else spec
    out = as_float_image(image).copy()
    labels = []
    for it in items:
        out, lab = it.apply(out, rng, options)
        labels.append(lab)
    return out, Label.merge(labels)
