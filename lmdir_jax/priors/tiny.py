"""Tiny random CLIP / tokenizer folders in the real Hugging Face on-disk layouts.

The CLIP is our NNX `ClipModel` holding the very weights transformers' Flax CLIP drew for the
same seed (`init_like_transformers`) and written as transformers writes a
`CLIPModel` (config.json, model.safetensors, preprocessor_config.json, tokenizer files), without torch.

Tests, benchmarks and `lmdir priors make-tiny` use them: nothing can be downloaded, so the code path
that loads real weights is exercised with these instead (same files, same loaders, tiny sizes).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core.scope import LazyRng
from transformers import CLIPTokenizer

from lmdir_jax.priors import clip_weights
from lmdir_jax.priors.clip import CLIP_MEAN, CLIP_STD
from lmdir_jax.priors.clip_model import (
    ClipConfig,
    ClipModel,
    ClipTextConfig,
    ClipVisionConfig,
    abstract,
    build,
    save_clip_model,
)
from lmdir_jax.priors.tokenizer import bytes_to_unicode

# Words that get whole-word merges (the rest of English is spelled out by characters).
_WORDS = (
    "a an the of in on with and photo image picture clean sharp clear noise noisy gaussian rain "
    "rainy streaks snow snowy haze hazy fog foggy dark low light lowlight blur blurry blurred "
    "motion resolution downsampled jpeg compression artifacts heavy light slight strong city "
    "street cat dog person people tree trees sky sea beach mountain building house car road "
    "flower flowers bird water field forest night remove restore"
).split()


def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Character-level CLIP BPE vocabulary (printable ASCII, with and without `</w>`) + word merges."""
    byte_map = bytes_to_unicode()
    chars = [byte_map[b] for b in range(33, 127)]  # printable ASCII maps to itself
    tokens: list[str] = list(chars) + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    seen = set(tokens)
    for word in dict.fromkeys(_WORDS):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        cur = parts[0]
        for nxt in parts[1:]:
            pair = (cur, nxt)
            cur = cur + nxt
            if pair not in merges:
                merges.append(pair)
            if cur not in seen:
                seen.add(cur)
                tokens.append(cur)
    # Special tokens last: the end-of-text id is the largest, as in OpenAI CLIP (the text tower
    # pools at argmax(input_ids)).
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def save_tiny_tokenizer(path: str | Path, model_max_length: int = 77) -> Path:
    """Write a small real CLIPTokenizer (vocab.json, merges.txt, configs) to `path`.

    It spells any lowercase English by characters plus a few whole-word merges, and loads with
    `CLIPTokenizer.from_pretrained(path)` exactly like a downloaded one.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab, merges = _vocab_and_merges()
    vf, mf = path / "vocab.json", path / "merges.txt"
    vf.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    mf.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    # transformers 4.x rewrites the two files as they are; 5.x adds tokenizer.json beside them.
    CLIPTokenizer(str(vf), str(mf), model_max_length=model_max_length).save_pretrained(str(path))
    return path


def tiny_clip_config(text_dim: int = 32, vision_dim: int = 32, image_size: int = 32) -> ClipConfig:
    """A tiny CLIP config (2 layers per tower, 2 heads, 8-pixel patches) sized for the tiny tokenizer."""
    vocab = _vocab_and_merges()[0]
    text = ClipTextConfig(
        vocab_size=len(vocab), hidden_size=text_dim, intermediate_size=2 * text_dim, num_layers=2,
        num_heads=2, max_positions=77, projection_dim=text_dim, bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"],
    )
    vision = ClipVisionConfig(
        hidden_size=vision_dim, intermediate_size=2 * vision_dim, num_layers=2, num_heads=2,
        image_size=image_size, patch_size=8, projection_dim=text_dim,
    )
    return ClipConfig(text, vision, projection_dim=text_dim)


def init_like_transformers(params: dict, config: ClipConfig, seed: int) -> dict:
    """The draw of transformers' Flax CLIP (its model class built with `seed=seed`), value for value:
    normal weights of standard deviation 0.01 (0.02 for the class token and the two projections),
    each from the key Flax derives from the seed and the parameter's module path; unit layer-norm
    scales, zero biases. The tiny CLIP is the one this package has always written, so figures
    measured with it (docs/priors.md, the quick start) stay valid."""
    params_rng, _ = jax.random.split(jax.random.PRNGKey(seed))
    root = LazyRng.create(params_rng)
    out = {}
    for path, spec in clip_weights.flatten(params):
        shape, leaf = tuple(spec.shape), path[-1]
        if leaf == "bias":
            value = np.zeros(shape)
        elif leaf == "scale":
            value = np.ones(shape)
        elif leaf == "logit_scale":
            value = np.full(shape, config.logit_scale_init)
        else:
            scope = root
            for name in path[:-1]:
                scope = LazyRng.create(scope, str(name))
            key = LazyRng.create(scope, 1).as_jax_rng()  # the first parameter drawn in its module
            wide = leaf == "class_embedding" or path[0] in ("text_projection", "visual_projection")
            value = np.asarray(jax.random.normal(key, shape, jnp.float32)) * (0.02 if wide else 0.01)
        out[path] = np.asarray(value, np.float32)
    return clip_weights.unflatten(out)


def tiny_clip_model(text_dim: int = 32, seed: int = 0) -> ClipModel:
    """A tiny random `ClipModel` (transformers' Flax CLIP's draw for `seed`)."""
    config = tiny_clip_config(text_dim=text_dim)
    graphdef, shapes = abstract(lambda: ClipModel(config, rngs=nnx.Rngs(0)))
    return build(graphdef, init_like_transformers(shapes, config, seed))


def write_preprocessor_config(path: Path, image_size: int) -> None:
    """CLIP's image preprocessing as transformers' CLIPImageProcessor writes it (shorter side to
    `image_size`, bicubic, centre crop, CLIP's mean/std)."""
    proc = {
        "crop_size": {"height": image_size, "width": image_size}, "do_center_crop": True,
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": list(CLIP_MEAN), "image_processor_type": "CLIPImageProcessor",
        "image_std": list(CLIP_STD), "resample": 3, "rescale_factor": 1 / 255,
        "size": {"shortest_edge": image_size},
    }
    (path / "preprocessor_config.json").write_text(json.dumps(proc, indent=2) + "\n", encoding="utf-8")


def save_tiny_clip(path: str | Path, text_dim: int = 32, seed: int = 0) -> Path:
    """Write a tiny random CLIP + tokenizer in the layout of a Hugging Face CLIP download
    (config.json, model.safetensors, preprocessor_config.json, tokenizer files), so `load_clip` and
    transformers' `CLIPModel.from_pretrained` read it through the real path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = tiny_clip_model(text_dim=text_dim, seed=seed)
    save_clip_model(model, path)
    write_preprocessor_config(path, model.config.vision.image_size)
    save_tiny_tokenizer(path)
    return path
