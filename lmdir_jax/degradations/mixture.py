"""Random degradations for training: pick 1..max_kinds kinds by weight and apply them in `KINDS` order."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from lmdir_jax.degradations.blur import blur
from lmdir_jax.degradations.haze import haze
from lmdir_jax.degradations.imageops import as_float_image
from lmdir_jax.degradations.jpeg import jpeg
from lmdir_jax.degradations.label import KINDS, Label
from lmdir_jax.degradations.lowlight import lowlight
from lmdir_jax.degradations.noise import noise
from lmdir_jax.degradations.rain import rain
from lmdir_jax.degradations.resample import downsample
from lmdir_jax.degradations.snow import snow

DegradeFn = Callable[..., tuple[np.ndarray, Label]]  # (image, rng, severity, **options)
# Per-kind keyword options of the kind functions, e.g. {"rain": {"additive_share": 0.7}}.
KindOptions = Mapping[str, Mapping[str, Any]]

KIND_FUNCTIONS: dict[str, DegradeFn] = {
    "rain": rain,
    "snow": snow,
    "haze": haze,
    "lowlight": lowlight,
    "blur": blur,
    "downsample": downsample,
    "noise": noise,
    "jpeg": jpeg,
}
assert tuple(KIND_FUNCTIONS) == KINDS

SEVERITY_RANGE = (0.1, 1.0)  # severities are drawn uniformly in this range
MIXTURE_SEVERITY_RANGE = (0.1, 0.8)  # milder per kind when several are combined


def degrade(
    image: np.ndarray, kind: str, rng: np.random.Generator, severity: float,
    options: KindOptions | None = None,
) -> tuple[np.ndarray, Label]:
    """Apply one kind by name at a severity in [0, 1], with its keyword `options` if any."""
    if kind not in KIND_FUNCTIONS:
        raise ValueError(f"unknown degradation kind {kind!r}; valid: {', '.join(KINDS)}")
    return KIND_FUNCTIONS[kind](image, rng, severity, **(options or {}).get(kind, {}))


def apply_kinds(
    image: np.ndarray,
    rng: np.random.Generator,
    kinds: Mapping[str, float] | Sequence[tuple[str, float]],
    options: KindOptions | None = None,
) -> tuple[np.ndarray, Label]:
    """Apply several (kind, severity) pairs in `KINDS` order, whatever the order given."""
    pairs = list(kinds.items()) if isinstance(kinds, Mapping) else list(kinds)
    pairs.sort(key=lambda p: KINDS.index(p[0]))
    out = as_float_image(image)
    labels = []
    for kind, sev in pairs:
        out, lab = degrade(out, kind, rng, sev, options)
        labels.append(lab)
    if not labels:
        out = out.copy()
    return out, Label.merge(labels)


def sample_kinds(
    rng: np.random.Generator, weights: Mapping[str, float], mix_prob: float, max_kinds: int
) -> list[str]:
    """Pick the kinds of one example: one kind, or with probability mix_prob 2..max_kinds distinct
    kinds, drawn without replacement by weight (weight 0 never); returned in `KINDS` order."""
    unknown = set(weights) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown degradation kinds {sorted(unknown)}; valid: {', '.join(KINDS)}")
    kinds = [k for k in KINDS if float(weights.get(k, 0.0)) > 0]
    if not kinds:
        raise ValueError("every degradation weight is 0; give at least one kind a positive weight")
    p = np.array([float(weights[k]) for k in kinds], np.float64)
    n = 1
    if max_kinds > 1 and len(kinds) > 1 and rng.random() < mix_prob:
        n = int(rng.integers(2, min(max_kinds, len(kinds)) + 1))
    idx = rng.choice(len(kinds), size=n, replace=False, p=p / p.sum())
    return [kinds[i] for i in sorted(idx)]


def sample_degradation(
    image: np.ndarray,
    rng: np.random.Generator,
    weights: Mapping[str, float],
    mix_prob: float = 0.3,
    max_kinds: int = 3,
    options: KindOptions | None = None,
) -> tuple[np.ndarray, Label]:
    """A random training degradation: kinds by `sample_kinds`, each at a uniform random severity
    (0.1-1 alone, 0.1-0.8 in a mixture), applied in `KINDS` order with their `options`."""
    kinds = sample_kinds(rng, weights, mix_prob, max_kinds)
    lo, hi = SEVERITY_RANGE if len(kinds) == 1 else MIXTURE_SEVERITY_RANGE
    return apply_kinds(image, rng, [(k, float(rng.uniform(lo, hi))) for k in kinds], options)
