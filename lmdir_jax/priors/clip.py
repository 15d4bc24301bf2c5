"""Frozen CLIP priors: text states, zero-shot degradation weights and zero-shot scene captions.

`load_clip(path)` reads a local Hugging Face CLIP folder (`model.safetensors`, `pytorch_model.bin`
or `flax_model.msgpack`) with its tokenizer into our Flax NNX CLIP (`clip_model.ClipModel`). Everything the train step needs is a
pure function of the frozen parameters (`text_states`, `image_features`, `auto_degradation_fn`),
so it can run inside `jax.jit`; the `encode_text` / `auto_degradation` / `caption` methods are the
eager (host-side, jitted once per shape) versions for the CLI, the cache builder and inference.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmdir_jax.degradations import conditioning_text, vocabulary
from lmdir_jax.errors import UsageError
from lmdir_jax.priors import clip_weights
from lmdir_jax.priors.clip_model import (
    DTYPES,
    OPENCLIP_FILES,
    ClipModel,
    load_clip_model,
    load_openclip_model,
    openclip_checkpoint,
)
from lmdir_jax.priors.tokenizer import (
    OPENCLIP_BPE,
    load_tokenizer,
    openclip_bpe_path,
    write_from_openclip_bpe,
)
from lmdir_jax.priors.vocab import scene_phrases

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _normalize(x: jax.Array) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True).clip(1e-6)


def most_likely_states(
    weights: jax.Array, states: jax.Array, mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The automatic degradation prior of vocabulary weights (B, K): the text states (B, T, D) and
    mask (B, T) of each example's most likely entry, the text the automatic mode tells the network
    (a blend of every entry's states weighted by the probabilities is a prior it never sees told)."""
    best = jnp.argmax(weights, axis=-1)
    return states[best], mask[best]


def drawn_states(
    weights: jax.Array, states: jax.Array, mask: jax.Array, key: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The text states (B, T, D) and mask (B, T) of one vocabulary entry per example, drawn with
    the probabilities `weights` (B, K): an entry the automatic mode names for an image in a share
    of such images, its mistakes included (training's `priors.auto_sample`)."""
    pick = jax.random.categorical(key, jnp.log(jnp.clip(weights, 1e-9)), axis=-1)
    return states[pick], mask[pick]


class ClipPrior:
    """A frozen CLIP model with its tokenizer and preprocessing, as the restoration priors use it.

    Attributes: `model` (the `ClipModel`), `params` (its frozen parameters as a pure dict), `text_dim` (width of the text states; the
    network's `config.model.text_dim` must equal it), `max_text_len` (tokens per text, T),
    `image_size`, `logit_scale`, `degradation_vocab` ((name, text) pairs), `scene_vocab`.
    """

    def __init__(
        self,
        model: ClipModel,
        tokenizer,
        *,
        params: Any = None,
        max_text_len: int = 32,
        mean=CLIP_MEAN,
        std=CLIP_STD,
        resize_to: int | None = None,
        degradation_vocab: list[tuple[str, str]] | None = None,
        scene_vocab: list[str] | None = None,
    ):
        cfg = model.config
        limit = cfg.text.max_positions
        if not 2 <= max_text_len <= limit:
            raise UsageError(f"max_text_len must be in [2, {limit}] for this CLIP, got {max_text_len}")
        self.model = model
        self.graphdef, state = nnx.split(model)
        self.params = nnx.to_pure_dict(state) if params is None else params
        self.tokenizer = tokenizer
        self.max_text_len = int(max_text_len)
        self.text_dim = int(cfg.text.hidden_size)
        self.projection_dim = int(cfg.projection_dim)
        self.image_size = int(cfg.vision.image_size)
        self.resize_to = int(resize_to or self.image_size)
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self.logit_scale = float(np.exp(np.asarray(self.params["logit_scale"])))
        self._degradation_vocab = degradation_vocab
        self.scene_vocab = list(scene_vocab) if scene_vocab is not None else None
        self._banks: dict[str, tuple] = {}
        self.controller = None  # a DegradationAssessor (priors/controller.py) once attached
        self._jit_states = jax.jit(self.text_states)
        self._jit_text_feats = jax.jit(self.text_features)
        self._jit_image_feats = jax.jit(self.image_features)
        self._jit_auto = jax.jit(self.auto_degradation_fn)

    # ---- vocabularies -------------------------------------------------------------------------

    @property
    def degradation_vocab(self) -> list[tuple[str, str]]:
        """(kind or 'clean', description) pairs: `lmdir_jax.degradations.vocabulary()` by default."""
        if self._degradation_vocab is None:
            self._degradation_vocab = list(vocabulary())
        return self._degradation_vocab

    def _scene_vocab(self) -> list[str]:
        if self.scene_vocab is None:
            self.scene_vocab = scene_phrases()
        return self.scene_vocab

    # ---- pure functions (jittable, params explicit) ---------------------------------------------

    def tokenize(self, texts: list[str], max_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (B, T) int32 and mask (B, T) bool, padded/truncated to `max_len` (default
        `max_text_len`)."""
        if isinstance(texts, str):
            texts = [texts]
        enc = self.tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=int(max_len or self.max_text_len),
            return_tensors="np",
        )
        return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(bool)

    def bind(self, params) -> ClipModel:
        """The `ClipModel` holding `params` (a pure dict, possibly of tracers)."""
        return nnx.merge(self.graphdef, params)

    def text_states(self, params, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """Last hidden states (B, T, D) float32 of the text tower (what Stable Diffusion also uses)."""
        return self.bind(params).text_states(ids, mask).astype(jnp.float32)

    def text_embeds(self, params, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """Projected, unnormalised text embeddings (B, P) float32."""
        return self.bind(params).text_embeds(ids, mask).astype(jnp.float32)

    def text_features(self, params, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """L2-normalised projected text embeddings (B, P) float32 (for zero-shot similarity)."""
        return _normalize(self.text_embeds(params, ids, mask))

    def preprocess(self, images: jax.Array) -> jax.Array:
        """CLIP preprocessing in JAX for NHWC images in [0, 1]: resize the short side to the
        processor's size (bicubic, antialiased), centre-crop to the tower's size, mean/std."""
        images = jnp.asarray(images, jnp.float32)
        b, h, w, c = images.shape
        if c != 3:
            raise UsageError(f"CLIP needs RGB images, got {c} channels")
        scale = self.resize_to / min(h, w)
        nh = max(self.image_size, round(h * scale))
        nw = max(self.image_size, round(w * scale))
        x = jax.image.resize(images, (b, nh, nw, 3), method="bicubic", antialias=True)
        top, left = (nh - self.image_size) // 2, (nw - self.image_size) // 2
        x = x[:, top : top + self.image_size, left : left + self.image_size]
        return (x.clip(0.0, 1.0) - self.mean) / self.std

    def image_embeds(self, params, images: jax.Array) -> jax.Array:
        """Projected, unnormalised image embeddings (B, P) float32 of NHWC images in [0, 1]."""
        return self.bind(params).image_embeds(self.preprocess(images)).astype(jnp.float32)

    def image_features(self, params, images: jax.Array) -> jax.Array:
        """L2-normalised projected image embeddings (B, P) float32 of NHWC images in [0, 1]."""
        return _normalize(self.image_embeds(params, images))

    def conditioning_texts(self) -> list[str]:
        """Per vocabulary entry, the text the restoration network is told when the automatic mode
        picks it: the kind's noun (`degradations.conditioning_text`, e.g. 'rain streaks'), or the
        entry's own description for a kind it does not know."""
        return [conditioning_text(name) or text for name, text in self.degradation_vocab]

    def degradation_bank(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Text features (K, P) of the vocabulary's descriptions (what images are classified
        against), and the states (K, T, D) and mask (K, T) of its conditioning texts (what the
        network is told: `conditioning_texts`, the phrasings it trained on).

        Always computed eagerly (concrete arrays, even when first asked for inside a jit trace),
        so the cached bank never holds a tracer of one trace that a later trace would reuse.
        """
        if "deg" not in self._banks:
            ids, mask = self.tokenize([text for _, text in self.degradation_vocab])
            cond_ids, cond_mask = self.tokenize(self.conditioning_texts())
            with jax.ensure_compile_time_eval():
                self._banks["deg"] = (
                    self._jit_text_feats(self.params, ids, mask),
                    self._jit_states(self.params, cond_ids, cond_mask),
                    jnp.asarray(cond_mask),
                )
        return self._banks["deg"]

    def degradation_features(self, max_len: int | None = None) -> jax.Array:
        """Text features (K, P) of the degradation vocabulary tokenised to `max_len` tokens (default
        `max_text_len`: `degradation_bank()[0]`). A controller classifies against the features it
        was trained with, whatever length the restoration network's text states use."""
        if max_len is None or int(max_len) == self.max_text_len:
            return self.degradation_bank()[0]
        key = f"deg_features_{int(max_len)}"
        if key not in self._banks:
            ids, mask = self.tokenize([text for _, text in self.degradation_vocab], int(max_len))
            with jax.ensure_compile_time_eval():
                self._banks[key] = (self._jit_text_feats(self.params, ids, mask),)
        return self._banks[key][0]

    def scene_bank(self) -> jax.Array:
        """Text features (S, P) of the scene vocabulary (for zero-shot captions), eager like
        `degradation_bank`."""
        if "scene" not in self._banks:
            ids, mask = self.tokenize(self._scene_vocab())
            with jax.ensure_compile_time_eval():
                self._banks["scene"] = (self._jit_text_feats(self.params, ids, mask),)
        return self._banks["scene"][0]

    def auto_degradation_fn(self, params, images: jax.Array, bank=None):
        """Pure automatic degradation prior (AutoDIR-style) for use inside a jitted step.

        Zero-shot softmax weights (B, K) of the images against the degradation vocabulary (logit
        scale from the model; a trained controller's when one is attached), and the text states
        (B, T, D) and mask (B, T) of each image's most likely entry: what the automatic mode tells
        the network (`most_likely_states`). `bank` is `degradation_bank()` (computed eagerly when
        omitted).
        """
        feats, states, mask = self.degradation_bank() if bank is None else bank
        if self.controller is not None:  # the trained controller (native-resolution tiles)
            return (w := self.controller.weights_fn(images), *most_likely_states(w, states, mask))
        img = self.image_features(params, images)
        scale = jnp.exp(params["logit_scale"].astype(jnp.float32))
        weights = jax.nn.softmax(scale * img @ feats.T, axis=-1)
        return (weights, *most_likely_states(weights, states, mask))

    def attach_controller(self, assessor) -> None:
        """Use a trained DA-CLIP controller (`train.controller.load_controller`) from now on: the
        automatic degradation prior comes from it (native-resolution crops) and the image
        embeddings (captions) from the frozen tower under its control."""
        self.controller = assessor

    # ---- eager API ------------------------------------------------------------------------------

    def encode_text(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Text states (B, T, D) float32 and mask (B, T) bool of `texts` (user-guided prior, captions)."""
        ids, mask = self.tokenize(texts)
        return np.asarray(self._jit_states(self.params, ids, mask)), mask

    def encode_images(self, images) -> np.ndarray:
        """Normalised image embeddings (B, P) of NHWC images in [0, 1] (under the controller's
        control when one is attached)."""
        if self.controller is not None:
            images = np.asarray(self.preprocess(jnp.asarray(images, jnp.float32)) * self.std + self.mean)
            return self.controller.content_features(images)
        return np.asarray(self._jit_image_feats(self.params, jnp.asarray(images, jnp.float32)))

    def auto_degradation(self, images) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Automatic degradation prior of NHWC images in [0, 1]: (weights (B, K), states, mask), the
        states and mask those of each image's most likely entry (`most_likely_states`).

        With a controller attached the weights are its probabilities averaged over native crops of
        each image (give the images at full resolution); otherwise zero-shot CLIP.
        """
        if self.controller is not None:
            _, states, mask = self.degradation_bank()
            w = np.stack([self.controller.probabilities(img) for img in np.asarray(images, np.float32)])
            s, m = most_likely_states(jnp.asarray(w), states, mask)
            return w, np.asarray(s), np.asarray(m)
        bank = self.degradation_bank()  # eager, outside the trace; passed as an argument
        w, s, m = self._jit_auto(self.params, jnp.asarray(images, jnp.float32), bank)
        return np.asarray(w), np.asarray(s), np.asarray(m)

    def classify_degradation(self, images) -> list[str]:
        """Name (kind or 'clean') of the most likely vocabulary entry for each image."""
        w = self.auto_degradation(images)[0]
        names = [name for name, _ in self.degradation_vocab]
        return [names[i] for i in w.argmax(axis=-1)]

    def caption(self, images, top_k: int = 2) -> list[str]:
        """Zero-shot captions: the `top_k` best-matching scene phrases per image, joined by ', '."""
        phrases = self._scene_vocab()
        top_k = max(1, min(int(top_k), len(phrases)))
        sims = self.encode_images(images) @ np.asarray(self.scene_bank()).T
        order = np.argsort(-sims, axis=-1, kind="stable")[:, :top_k]
        return [", ".join(phrases[j] for j in row) for row in order]

    def check_text_dim(self, expected: int) -> None:
        """Raise a UsageError when the network's `model.text_dim` differs from this CLIP's width."""
        if int(expected) != self.text_dim:
            raise UsageError(
                f"config model.text_dim={expected} but this CLIP's text width is {self.text_dim}: "
                f"set --config.model.text_dim={self.text_dim}"
            )


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {path}: {e}") from None


def read_preprocessing(folder: Path) -> tuple[tuple, tuple, int | None]:
    """(mean, std, shorter-side size) of a Hugging Face preprocessor_config.json (CLIP's defaults
    when the folder has none)."""
    mean, std, resize_to = CLIP_MEAN, CLIP_STD, None
    proc = folder / "preprocessor_config.json"
    if proc.is_file():
        pc = _read_json(proc)
        mean = tuple(pc.get("image_mean", mean))
        std = tuple(pc.get("image_std", std))
        size = pc.get("size")
        resize_to = size.get("shortest_edge") if isinstance(size, dict) else size
    return mean, std, resize_to


def openclip_tokenizer(checkpoint: Path, tokenizer: str | Path | None = None):
    """The tokenizer of an OpenCLIP checkpoint: `tokenizer` (a folder), the tokenizer files beside
    the checkpoint, or OpenCLIP's BPE vocabulary (beside it, or open_clip's when installed)."""
    if tokenizer is not None:
        if not Path(tokenizer).is_dir():
            raise UsageError(f"tokenizer folder not found: {tokenizer}")
        return load_tokenizer(Path(tokenizer))
    here = checkpoint.parent
    if (here / "tokenizer.json").is_file() or ((here / "vocab.json").is_file() and (here / "merges.txt").is_file()):
        return load_tokenizer(here)
    bpe = here / OPENCLIP_BPE if (here / OPENCLIP_BPE).is_file() else openclip_bpe_path()
    if bpe is None:
        raise UsageError(f"{checkpoint}: no tokenizer beside it and open_clip is not installed: give a CLIP "
                         f"tokenizer folder (vocab.json + merges.txt), or put {OPENCLIP_BPE} beside it")
    with tempfile.TemporaryDirectory() as tmp:
        return load_tokenizer(write_from_openclip_bpe(bpe, Path(tmp)))


def load_clip(
    path: str | Path,
    dtype: str = "float32",
    *,
    max_text_len: int = 32,
    degradation_vocab: list[tuple[str, str]] | None = None,
    scene_vocab: list[str] | None = None,
    model: str | None = None,
    tokenizer: str | Path | None = None,
) -> ClipPrior:
    """Load a CLIP as a ClipPrior on our NNX CLIP: a Hugging Face CLIP folder (model.safetensors,
    pytorch_model.bin with torch, or flax_model.msgpack; its own tokenizer), or an OpenCLIP
    checkpoint (a state-dict file, a hub folder with open_clip_config.json, or DA-CLIP's checkpoint,
    whose frozen CLIP it reads) with `model` (OpenCLIP model name or model-config JSON; default: the
    folder's config or a model name in the file's name) and OpenCLIP's tokenizer (`tokenizer`
    folder to override).

    `dtype` is the weights' and compute dtype ('float32' or 'bfloat16'); outputs are float32. A missing path, a
    folder that is neither, or one without weights is a UsageError.
    """
    folder = Path(path)
    if not folder.exists():
        raise UsageError(f"CLIP folder not found: {folder}")
    if dtype not in DTYPES:
        raise UsageError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    if folder.is_file() or any((folder / f).is_file() for f in OPENCLIP_FILES):
        clip_model, cfg, ocfg = load_openclip_model(folder, model, dtype)
        file, _ = openclip_checkpoint(folder)
        pre = ocfg.get("preprocess_cfg") or {}
        return ClipPrior(
            clip_model,
            openclip_tokenizer(file, tokenizer),
            max_text_len=max_text_len,
            mean=tuple(pre.get("mean", CLIP_MEAN)),
            std=tuple(pre.get("std", CLIP_STD)),
            degradation_vocab=degradation_vocab,
            scene_vocab=scene_vocab,
        )
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise UsageError(f"{folder} is not a Hugging Face model folder (no config.json)")
    model_type = _read_json(cfg_file).get("model_type")
    if model_type != "clip":
        raise UsageError(f"{folder} is not a CLIP model (model_type={model_type!r}, need 'clip')")
    if not (clip_weights.has_torch_weights(folder) or clip_weights.has_flax_weights(folder)):
        raise UsageError(f"{folder} has no CLIP weights (model.safetensors, pytorch_model.bin or "
                         "flax_model.msgpack)")
    clip_model, _ = load_clip_model(folder, dtype)
    mean, std, resize_to = read_preprocessing(folder)
    return ClipPrior(
        clip_model,
        load_tokenizer(folder) if tokenizer is None else load_tokenizer(Path(tokenizer)),
        max_text_len=max_text_len,
        mean=mean,
        std=std,
        resize_to=resize_to,
        degradation_vocab=degradation_vocab,
        scene_vocab=scene_vocab,
    )
