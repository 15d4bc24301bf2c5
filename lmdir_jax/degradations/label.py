"""Degradation labels: which kinds were applied, how strongly, with which parameters, and their text.

A `Label` is what the data pipeline carries beside a degraded image: the severity vector trains
nothing directly but is logged and evaluated per kind, and the text is the "global degradation
knowledge" prompt that the CLIP text tower encodes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Physical application order: weather in the scene, then the light reaching the sensor, then optics
# and resampling, then sensor noise, then compression.
KINDS: tuple[str, ...] = ("rain", "snow", "haze", "lowlight", "blur", "downsample", "noise", "jpeg")
KIND_INDEX: dict[str, int] = {k: i for i, k in enumerate(KINDS)}

# Canonical noun phrase per (kind, variant); variant None is the kind's only or generic form.
NOUNS: dict[tuple[str, str | None], str] = {
    ("rain", None): "rain streaks",
    ("snow", None): "falling snow",
    ("haze", None): "haze",
    ("lowlight", None): "underexposure",
    ("blur", None): "blur",
    ("blur", "gaussian"): "gaussian blur",
    ("blur", "motion"): "motion blur",
    ("downsample", None): "low resolution",
    ("noise", None): "noise",
    ("noise", "gaussian"): "gaussian noise",
    ("noise", "poisson-gaussian"): "poisson-gaussian noise",
    ("jpeg", None): "jpeg compression artifacts",
}

# Alternative noun phrases for training-time phrasings (the canonical one is always included).
NOUN_SYNONYMS: dict[str, tuple[str, ...]] = {
    "rain streaks": ("rain", "rain streaks", "rainy streaks", "raindrops streaking down"),
    "falling snow": ("snow", "snowflakes", "snowfall"),
    "haze": ("fog", "mist", "atmospheric haze"),
    "underexposure": ("low light", "darkness", "poor lighting", "low-light conditions"),
    "gaussian blur": ("blur", "defocus blur", "out-of-focus blur"),
    "motion blur": ("camera shake", "motion smear", "shake blur"),
    "low resolution": (
        "downsampling",
        "pixelation",
        "upscaling artifacts",
        "low-resolution detail",
    ),
    "gaussian noise": ("noise", "random noise", "grain"),
    "poisson-gaussian noise": ("sensor noise", "photon noise", "camera noise"),
    "jpeg compression artifacts": ("jpeg artifacts", "compression artifacts", "blocking artifacts"),
}

SEVERITY_WORDS: tuple[str, str, str] = ("light", "moderate", "heavy")
# Kinds whose noun reads better with adverbs ("very low resolution").
KIND_SEVERITY_WORDS: dict[str, tuple[str, str, str]] = {
    "downsample": ("slightly", "moderately", "very"),
}
SEVERITY_SYNONYMS: dict[str, tuple[str, ...]] = {
    "light": ("light", "mild", "slight", "weak"),
    "moderate": ("moderate", "medium", "noticeable"),
    "heavy": ("heavy", "strong", "severe", "intense"),
    "slightly": ("slightly", "a little", "somewhat"),
    "moderately": ("moderately", "fairly"),
    "very": ("very", "extremely", "severely"),
}

TEMPLATES: tuple[str, ...] = (
    "{}",
    "a photo with {}",
    "an image degraded by {}",
    "this picture suffers from {}",
    "remove the {}",
    "a photograph affected by {}",
    "{} in the image",
)

CLEAN_TEXT = "no degradation"
CLEAN_PHRASES: tuple[str, ...] = (
    "no degradation",
    "a clean photo",
    "a sharp, clean image",
    "nothing to restore",
)


def severity_word(severity: float, kind: str | None = None) -> str:
    """Canonical word for a severity in [0, 1]: light (< 1/3), moderate (< 2/3) or heavy
    (slightly / moderately / very for downsample)."""
    return KIND_SEVERITY_WORDS.get(kind, SEVERITY_WORDS)[min(2, int(float(severity) * 3.0))]


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


@dataclass(frozen=True)
class Degradation:
    """One applied degradation: kind, severity in [0, 1], variant (or None) and concrete parameters."""

    kind: str
    severity: float
    variant: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)

    def noun(self) -> str:
        """Canonical noun phrase, e.g. 'motion blur'."""
        return NOUNS.get((self.kind, self.variant), NOUNS[(self.kind, None)])

    def text(self, rng: np.random.Generator | None = None) -> str:
        """'heavy rain streaks'; with rng a random synonym of the adjective and the noun."""
        word, noun = severity_word(self.severity, self.kind), self.noun()
        if rng is None:
            return f"{word} {noun}"
        nouns = (noun, *NOUN_SYNONYMS.get(noun, ()))
        word = SEVERITY_SYNONYMS[word][rng.integers(len(SEVERITY_SYNONYMS[word]))]
        noun = nouns[rng.integers(len(nouns))]
        return noun if rng.random() < 0.15 else f"{word} {noun}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "kind": self.kind,
            "severity": round(float(self.severity), 4),
            "variant": self.variant,
            "params": {k: _jsonable(v) for k, v in self.params.items()},
        }


def _join(parts: list[str]) -> str:
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + " and " + parts[-1]


@dataclass(frozen=True)
class Label:
    """The degradations applied to an image, kept in `KINDS` order (empty = clean)."""

    items: tuple[Degradation, ...] = ()

    @classmethod
    def single(cls, kind: str, severity: float, variant: str | None = None, **params: Any) -> Label:
        """A label holding one degradation."""
        if kind not in KIND_INDEX:
            raise ValueError(f"unknown degradation kind {kind!r}; valid: {', '.join(KINDS)}")
        sev = min(1.0, max(0.0, float(severity)))
        return cls((Degradation(kind, sev, variant, dict(params)),))

    @classmethod
    def merge(cls, labels: Iterable[Label]) -> Label:
        """Concatenate labels, sorted into `KINDS` order (stable for repeated kinds)."""
        items = [d for lab in labels for d in lab.items]
        return cls(tuple(sorted(items, key=lambda d: KIND_INDEX[d.kind])))

    def __add__(self, other: Label) -> Label:
        return Label.merge((self, other))

    @property
    def kinds(self) -> tuple[str, ...]:
        """The kinds present, in application order."""
        return tuple(d.kind for d in self.items)

    @property
    def is_clean(self) -> bool:
        """True when no degradation was applied."""
        return not self.items

    def noun_text(self) -> str:
        """The kinds' nouns alone, 'rain streaks and gaussian noise' ('no degradation' when clean):
        what the automatic mode tells the network for one kind (`conditioning_text`) and what a
        user types."""
        return _join([d.noun() for d in self.items]) if self.items else CLEAN_TEXT

    def text(self, rng: np.random.Generator | None = None) -> str:
        """Canonical phrase ('heavy rain streaks and moderate gaussian noise') or, given rng, one of
        several phrasings of the same content (for training-time text diversity)."""
        if rng is None:
            return _join([d.text() for d in self.items]) if self.items else CLEAN_TEXT
        if not self.items:
            return CLEAN_PHRASES[rng.integers(len(CLEAN_PHRASES))]
        order = list(self.items)
        if len(order) > 1 and rng.random() < 0.3:
            order = [order[i] for i in rng.permutation(len(order))]
        body = _join([d.text(rng) for d in order])
        return TEMPLATES[rng.integers(len(TEMPLATES))].format(body)

    def vector(self) -> np.ndarray:
        """float32 (len(KINDS),) severities, 0 where a kind is absent (max over repeats)."""
        v = np.zeros(len(KINDS), np.float32)
        for d in self.items:
            i = KIND_INDEX[d.kind]
            v[i] = max(v[i], np.float32(d.severity))
        return v

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: canonical text, severity vector by kind, and every item's parameters."""
        return {
            "text": self.text(),
            "severities": {
                k: round(float(s), 4) for k, s in zip(KINDS, self.vector(), strict=True) if s > 0
            },
            "items": [d.to_dict() for d in self.items],
        }


# Canonical description of each kind for CLIP zero-shot degradation classification.
DESCRIPTIONS: dict[str, str] = {
    "clean": "a clean photo with no degradation",
    "rain": "a photo with rain streaks",
    "snow": "a photo with falling snow",
    "haze": "a hazy photo with low contrast",
    "lowlight": "a dark photo taken in low light",
    "blur": "a blurry photo",
    "downsample": "a low-resolution photo",
    "noise": "a noisy photo",
    "jpeg": "a photo with jpeg compression artifacts",
}


def vocabulary() -> list[tuple[str, str]]:
    """[("clean", ...), (kind, description) for kind in KINDS]: the CLIP zero-shot prompts."""
    return [("clean", DESCRIPTIONS["clean"])] + [(k, DESCRIPTIONS[k]) for k in KINDS]


def kinds_in_text(text: str, severity: float = 0.5) -> np.ndarray:
    """A severity vector (len(KINDS),) for a fixed description of a paired source ('rain streaks',
    'haze', 'motion blur'): `severity` at every kind one of whose nouns or synonyms appears in the
    text as whole words, 0 elsewhere (all zero for text naming no kind)."""
    words = {k: set() for k in KINDS}
    for (kind, _), noun in NOUNS.items():
        words[kind].update((noun, *NOUN_SYNONYMS.get(noun, ())))
    low = str(text).lower()
    vector = np.zeros(len(KINDS), np.float32)
    for kind, names in words.items():
        if any(re.search(rf"\b{re.escape(n)}\b", low) for n in names):
            vector[KIND_INDEX[kind]] = severity
    return vector


DEFAULT_VARIANTS: dict[str, str] = {"noise": "gaussian", "blur": "gaussian"}


def conditioning_text(kind: str) -> str | None:
    """What the restoration network is told when the automatic mode picks vocabulary entry `kind`:
    the kind's canonical noun ('rain streaks', 'gaussian noise'; 'no degradation' for clean), the
    words a user tells it (`lmdir restore --degradation "rain streaks"`). A controller names the
    kind, not its severity, so no severity word is guessed: the network, which trains with and
    without them (`Label.text`), judges the strength from the image. The zero-shot descriptions of
    `vocabulary()` ('a photo with rain streaks') are what CLIP classifies against; the network never
    trained on them. None for a kind this module does not know (a custom vocabulary keeps its own
    text)."""
    if kind == "clean":
        return CLEAN_TEXT
    if kind not in KIND_INDEX:
        return None
    return Degradation(kind, 0.5, DEFAULT_VARIANTS.get(kind)).noun()
