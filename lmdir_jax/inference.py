"""Restoring whole images of any size: tiling with overlap and smooth blending, and prior assembly.

A large photo is cut into `tile` x `tile` windows that overlap by at least `overlap` pixels. The last
window of a row or column is shifted inwards so it stays inside the image, so every window has the
same shape and one jitted forward (one compilation per tile size and batch size) processes all of
them, `batch_size` windows at a time. Each restored window is weighted by a raised-cosine ramp that
falls towards its borders, and the output is the weighted average, so seams do not show. An image
smaller than a tile is restored whole (exactly as the network sees it, no padding).

Memory is bounded by the tile batch: only two full-size accumulators (the weighted sum and the
weights, float32) live beside the input.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lmdir_jax.degradations.label import KIND_INDEX, KINDS, kinds_in_text
from lmdir_jax.errors import UsageError
from lmdir_jax.metrics import psnr
from lmdir_jax.models.priors import Priors, kind_weights
from lmdir_jax.priors.clip import load_clip
from lmdir_jax.progress import progress_bar
from lmdir_jax.train.checkpoints import load_for_inference
from lmdir_jax.train.controller import attach_from_config
from lmdir_jax.workdir import CONFIG, config_file


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of windows of size `tile` covering [0, length) with at least `overlap` overlap.

    The last window is shifted back to end exactly at `length` (requires length >= tile).
    """
    if tile <= overlap:
        raise ValueError(f"tile ({tile}) must be larger than the overlap ({overlap})")
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def blend_ramp(tile: int, overlap: int) -> np.ndarray:
    """(tile,) float32 weights: a raised-cosine rise over `overlap` pixels at both ends, 1 inside.

    All weights are strictly positive so an image border covered by a single window keeps its value.
    """
    w = np.ones(tile, np.float32)
    n = min(overlap, tile // 2)
    if n > 0:
        i = np.arange(n, dtype=np.float32)
        rise = 0.5 - 0.5 * np.cos(np.pi * (i + 0.5) / n)
        w[:n] = rise
        w[tile - n :] = rise[::-1]
    return w


def _pad_to_at_least(image: np.ndarray, tile: int) -> np.ndarray:
    h, w = image.shape[:2]
    ph, pw = max(0, tile - h), max(0, tile - w)
    if ph == 0 and pw == 0:
        return image
    return np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="symmetric")


def _apply(model, x, priors: Priors):
    """One batch through the network with the (batch-1) priors broadcast to the batch."""
    b = x.shape[0]
    p = jax.tree.map(lambda a: jnp.broadcast_to(a[:1], (b, *a.shape[1:])), priors)
    return jnp.clip(model(x, p).astype(jnp.float32), 0.0, 1.0)


_JITTED: dict[str, Callable] = {}


def _forward() -> Callable:
    """The jitted `_apply` (compiled once per model structure, input shape and prior shapes)."""
    if "apply" not in _JITTED:
        _JITTED["apply"] = jax.jit(_apply)
    return _JITTED["apply"]


def restore_image(
    model: Any,
    image: np.ndarray,
    priors: Priors,
    *,
    tile: int | None = None,
    overlap: int = 32,
    batch_size: int = 1,
    progress: bool = False,
) -> np.ndarray:
    """Restore one HxWx3 float image in [0, 1] with `model(lq, priors)`; returns HxWx3 float32.

    `priors` has batch 1 (the guidance for this image; broadcast to every tile). `tile=None`, or an
    image that fits in one tile, runs the whole image at once; otherwise windows of `tile` pixels
    overlapping by `overlap` are restored `batch_size` at a time and blended with raised-cosine
    weights. `progress` shows a tqdm bar over tile batches.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {image.shape}")
    image = np.asarray(image, np.float32)
    h, w = image.shape[:2]
    fwd = _forward()
    if tile is None or (h <= tile and w <= tile):
        return np.asarray(fwd(model, jnp.asarray(image[None]), priors)[0])
    if tile <= 2 * overlap:
        raise ValueError(f"tile ({tile}) must be more than twice the overlap ({overlap})")

    padded = _pad_to_at_least(image, tile)
    ph, pw = padded.shape[:2]
    windows = [(y, x) for y in tile_starts(ph, tile, overlap) for x in tile_starts(pw, tile, overlap)]
    ramp = blend_ramp(tile, overlap)
    weight = np.outer(ramp, ramp)[..., None]
    acc = np.zeros((ph, pw, 3), np.float32)
    wsum = np.zeros((ph, pw, 1), np.float32)

    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    if progress:
        batches = progress_bar(batches, desc="tiles", unit="batch", leave=False)
    for group in batches:
        x = np.stack([padded[y : y + tile, x0 : x0 + tile] for y, x0 in group])
        if len(group) < batch_size:  # keep one compiled shape: pad the last batch with copies
            x = np.concatenate([x, np.repeat(x[-1:], batch_size - len(group), axis=0)])
        out = np.asarray(fwd(model, jnp.asarray(x), priors))
        for k, (y, x0) in enumerate(group):
            acc[y : y + tile, x0 : x0 + tile] += out[k] * weight
            wsum[y : y + tile, x0 : x0 + tile] += weight
    return (acc / wsum)[:h, :w]


# --------------------------------------------------------------------------- priors for restoring


@dataclass
class PriorChoice:
    """What guided the restoration of one image (printed by the CLI, stored by `evaluate`)."""

    degradation: str = ""  # the text used ("" = masked)
    probability: float | None = None  # zero-shot probability of the chosen description (auto mode)
    mode: str = "none"  # "auto", "text", or "none"
    caption: str = ""
    reference: bool = False
    extra: dict = field(default_factory=dict)

    def describe(self) -> str:
        """One human line: `degradation 'heavy rain' (auto, p=0.83); caption '...'; reference`."""
        parts = []
        if self.mode == "auto":
            parts.append(f"degradation '{self.degradation}' (auto, p={self.probability:.2f})")
        elif self.mode == "text":
            parts.append(f"degradation '{self.degradation}' (given)")
        else:
            parts.append("degradation prior masked")
        parts.append(f"caption '{self.caption}'" if self.caption else "no caption")
        parts.append("reference image" if self.reference else "no reference")
        return "; ".join(parts)


def clip_view(image: np.ndarray, size: int) -> np.ndarray:
    """The centre square of `image` resized to `size` x `size`: what CLIP's processor looks at.

    Done here with OpenCV (area interpolation) so a 4K photo never enters the JAX resize, and every
    image reaches CLIP with one shape (one compilation for a whole folder).
    """
    import cv2

    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    square = np.ascontiguousarray(image[top : top + s, left : left + s, :3], np.float32)
    interp = cv2.INTER_AREA if s > size else cv2.INTER_CUBIC
    return np.clip(cv2.resize(square, (size, size), interpolation=interp), 0.0, 1.0)


def _fit_text(states: np.ndarray, mask: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad or cut (1, T, D) text states and their mask to `length` tokens."""
    t = states.shape[1]
    if t >= length:
        return states[:, :length], mask[:, :length]
    pad = length - t
    return (
        np.pad(states, ((0, 0), (0, pad), (0, 0))),
        np.pad(mask, ((0, 0), (0, pad)), constant_values=False),
    )


def build_priors(
    image: np.ndarray,
    config: Any,
    clip: Any = None,
    *,
    degradation: str | None = None,
    caption: str | None = None,
    reference: np.ndarray | None = None,
    auto: bool = True,
    auto_caption: bool = True,
) -> tuple[Priors, PriorChoice]:
    """The batch-1 `Priors` for restoring `image`, and a record of what was chosen.

    - degradation: `degradation` text (user-guided) when given; otherwise, with CLIP and `auto`,
      the zero-shot CLIP degradation prior (`ClipPrior.auto_degradation`: the vocabulary's text
      states weighted by their probabilities) of a small centre view; otherwise masked.
    - scene: `caption` when given; otherwise the zero-shot CLIP caption when CLIP is present and
      `auto_caption`; otherwise masked.
    - reference: `reference` (a clean image of the scene, resized to `config.priors.ref_size`), or
      masked.
    - PIP's kind weights (`model.prompt_module = "pip"` only): the kinds the told `degradation`
      names (one-hot, averaged for a mixture; CLIP is then optional), or the automatic mode's
      probabilities of the vocabulary's kinds; otherwise unknown (zero).
    `config` is the full run config (sections `model` and `priors`).
    """
    import cv2

    text_dim = int(config.model.text_dim)
    text_len = int(config.priors.max_text_len)
    ref_size = int(config.priors.ref_size)
    empty = Priors.empty(1, text_dim, text_len=text_len, ref_size=ref_size)
    choice = PriorChoice()
    small = None
    deg_states, deg_mask = empty.deg_states, empty.deg_mask
    scene_states, scene_mask = empty.scene_states, empty.scene_mask

    pip = str(config.model.get("prompt_module", "lmdir")) == "pip"
    deg_weights = None
    if degradation is not None or caption is not None:
        if clip is None and not (pip and caption is None):
            raise ValueError("text guidance needs CLIP: the checkpoint's config has no CLIP folder")
    if degradation is not None:
        if clip is not None:
            s, m = clip.encode_text([degradation])
            deg_states, deg_mask = _fit_text(np.asarray(s), np.asarray(m), text_len)
        choice.mode, choice.degradation = "text", degradation
        if pip:
            deg_weights = kind_weights(jnp.asarray(kinds_in_text(degradation)[None]))
    elif clip is not None and auto:
        vocab = clip.degradation_vocab
        if getattr(clip, "controller", None) is not None:  # trained controller: native crops
            weights, states, masks = clip.auto_degradation(image[None, ..., :3])
        else:
            small = clip_view(image, clip.image_size)
            weights, states, masks = clip.auto_degradation(small[None])
        weights = np.asarray(weights)[0]
        best = int(np.argmax(weights))
        # The network is told the most likely kind's text, as a user would tell it (`most_likely_states`).
        deg_states, deg_mask = _fit_text(np.asarray(states), np.asarray(masks), text_len)
        choice.mode = "auto"
        choice.degradation = clip.conditioning_texts()[best]  # what the network is told
        choice.probability = float(weights[best])
        choice.extra["kind"] = vocab[best][0]
        if pip:  # the vocabulary's probabilities of the kinds (the mass on 'clean' is dropped)
            w = np.zeros((1, len(KINDS)), np.float32)
            for j, (name, _) in enumerate(vocab):
                if name in KIND_INDEX:
                    w[0, KIND_INDEX[name]] = weights[j]
            deg_weights = jnp.asarray(w)

    if caption is not None:
        choice.caption = caption
    elif clip is not None and auto_caption and hasattr(clip, "caption"):
        small = clip_view(image, clip.image_size) if small is None else small
        choice.caption = str(clip.caption(small[None])[0])
    if choice.caption:
        s, m = clip.encode_text([choice.caption])
        scene_states, scene_mask = _fit_text(np.asarray(s), np.asarray(m), text_len)

    ref, has_ref = empty.reference, empty.has_reference
    if reference is not None:
        r = cv2.resize(
            np.asarray(reference[..., :3], np.float32), (ref_size, ref_size),
            interpolation=cv2.INTER_AREA,
        )
        ref, has_ref = jnp.asarray(r[None]), jnp.ones((1,), bool)
        choice.reference = True

    priors = Priors(
        deg_states=jnp.asarray(deg_states, jnp.float32),
        deg_mask=jnp.asarray(deg_mask, bool),
        scene_states=jnp.asarray(scene_states, jnp.float32),
        scene_mask=jnp.asarray(scene_mask, bool),
        reference=jnp.asarray(ref, jnp.float32),
        has_reference=jnp.asarray(has_ref, bool),
        deg_weights=deg_weights,
    )
    return priors, choice


# --------------------------------------------------------------------------- loading a restorer


@dataclass
class Restorer:
    """A trained network with its run config and (optionally) the frozen CLIP prior."""

    model: Any
    config: Any
    clip: Any = None

    def priors_for(self, image: np.ndarray, **options: Any) -> tuple[Priors, PriorChoice]:
        """`build_priors` for this network and CLIP (options as in `build_priors`)."""
        return build_priors(image, self.config, self.clip, **options)

    def restore(self, image: np.ndarray, priors: Priors, **tiling: Any) -> np.ndarray:
        """`restore_image` with this network (tiling options as in `restore_image`)."""
        return restore_image(self.model, image, priors, **tiling)

    def assess(self, image: np.ndarray) -> np.ndarray:
        """(K,) probabilities of the CLIP degradation vocabulary for one image (the controller's
        when one is attached, else zero-shot CLIP on the downscaled view)."""
        if self.clip is None:
            raise ValueError("assessing an image needs CLIP: the checkpoint's config has no CLIP folder")
        if getattr(self.clip, "controller", None) is not None:
            return np.asarray(self.clip.auto_degradation(image[None, ..., :3])[0])[0]
        return np.asarray(self.clip.auto_degradation(clip_view(image, self.clip.image_size)[None])[0])[0]

    def restore_iterative(
        self, image: np.ndarray, *, max_steps: int = 3, clean: np.ndarray | None = None,
        caption: str | None = None, reference: np.ndarray | None = None, **tiling: Any,
    ) -> tuple[np.ndarray, dict]:
        """AutoDIR's loop: assess, restore with the dominant degradation's text, assess again.

        Stops when 'clean' wins the assessment, after `max_steps` restorations, or when the only
        degradations left were already treated (never the same one twice). Returns the image and
        the chain `{'steps': [...], 'stop': reason, 'final': assessment}`; each step records the
        kind, the text the network was told (its training label), its probability and, given the
        `clean` reference, PSNR before/after.
        """
        names = [n for n, _ in self.clip.degradation_vocab]
        texts = dict(zip(names, self.clip.conditioning_texts(), strict=True))
        treated: list[str] = []
        steps: list[dict] = []
        current = np.asarray(image, np.float32)
        stop = "max_steps"
        probs = self.assess(current)
        for _ in range(max(0, int(max_steps))):
            kind, p = next_degradation(probs, names, treated)
            if kind is None:
                left = [n for n in names if n != "clean" and n not in treated]
                stop = "clean" if left else "all_treated"  # clean beats every untreated kind
                break
            priors, _ = self.priors_for(current, degradation=texts[kind], caption=caption, reference=reference)
            restored = self.restore(current, priors, **tiling)
            record = {"degradation": kind, "text": texts[kind], "probability": round(float(p), 4)}
            if clean is not None:
                before, after = psnr(clean, current), psnr(clean, restored)
                record.update(psnr_before=round(before, 3), psnr_after=round(after, 3),
                              psnr_change=round(after - before, 3))
            steps.append(record)
            treated.append(kind)
            current = restored
            probs = self.assess(current)
        else:
            if names[int(np.argmax(probs))] == "clean":
                stop = "clean"
        final = {n: round(float(v), 4) for n, v in zip(names, probs, strict=True)}
        return current, {"steps": steps, "stop": stop, "final": final}


def next_degradation(probs: np.ndarray, names: list[str], treated: list[str]) -> tuple[str | None, float]:
    """AutoDIR's choice: None when 'clean' is the most probable entry; otherwise the most probable
    degradation not yet treated, as long as it is more probable than 'clean' (None when none is)."""
    order = np.argsort(-np.asarray(probs), kind="stable")
    if names[int(order[0])] == "clean":
        return None, float(probs[order[0]])
    for i in order:
        if names[i] == "clean":
            return None, float(probs[i])
        if names[i] not in treated:
            return names[i], float(probs[i])
    return None, 0.0


def load_restorer(checkpoint: str, clip: str | None = None, controller: str | None = None) -> Restorer:
    """Load a training workdir for inference (EMA weights when present) and its CLIP prior.

    `clip` overrides the CLIP folder named in the workdir's config (`priors.clip`); with neither,
    the text priors are masked. `controller` (or the config's `priors.controller`) names a trained
    DA-CLIP controller that the automatic mode then uses. Raises `UsageError` for a missing workdir,
    CLIP or controller folder, or a controller trained for another CLIP.
    """
    wd = Path(checkpoint)
    if not wd.is_dir() or not config_file(wd).is_file():
        raise UsageError(f"no checkpoint at {checkpoint} (expected a training workdir with {CONFIG})")
    try:
        model, config = load_for_inference(str(wd))
    except UsageError:
        raise
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"cannot load a checkpoint from {checkpoint}: {e}") from None
    clip_path = clip if clip else str(config.priors.get("clip", "") or "")
    prior = None
    if clip_path:
        if not Path(clip_path).is_dir():
            where = "--clip" if clip else "the checkpoint's config (priors.clip); pass --clip DIR"
            raise UsageError(f"CLIP folder not found: {clip_path} (from {where})")
        prior = load_clip(clip_path, max_text_len=int(config.priors.max_text_len))
        prior.check_text_dim(int(config.model.text_dim))
    ctrl = controller or str(config.priors.get("controller", "") or "")
    if ctrl:
        if prior is None:
            raise UsageError("a controller needs CLIP: the checkpoint has no priors.clip; pass --clip DIR")
        if not Path(ctrl).exists():  # a workdir, or DA-CLIP's checkpoint file
            where = "--controller" if controller else "the checkpoint's config (priors.controller)"
            raise UsageError(f"controller folder not found: {ctrl} (from {where})")
        attach_from_config(prior, config, ctrl)
    return Restorer(model=model, config=config, clip=prior)
