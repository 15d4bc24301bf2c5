"""Tiny random CLIP / tokenizer folders in the real Hugging Face on-disk layouts.

Tests, benchmarks and `lmdir priors make-tiny` use them: nothing can be downloaded, so the code path
that loads real weights is exercised with these instead (same files, same loaders, tiny sizes).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

# Words that get whole-word merges (the rest of English is spelled out by characters).
_WORDS = (
    "a an the of in on with and photo image picture clean sharp clear noise noisy gaussian rain "
    "rainy streaks snow snowy haze hazy fog foggy dark low light lowlight blur blurry blurred "
    "motion resolution downsampled jpeg compression artifacts heavy light slight strong city "
    "street cat dog person people tree trees sky sea beach mountain building house car road "
    "flower flowers bird water field forest night remove restore"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    return bytes_to_unicode()


def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Character-level CLIP BPE vocabulary (printable ASCII, with and without `</w>`) + word merges."""
    byte_map = _bytes_to_unicode()
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


def tiny_vocab_size() -> int:
    """Number of tokens of the tiny tokenizer (the `vocab_size` of a tiny CLIP text config)."""
    return len(_vocab_and_merges()[0])


def save_tiny_tokenizer(path: str | Path, model_max_length: int = 77) -> Path:
    """Write a small real CLIPTokenizer (vocab.json, merges.txt, configs) to `path`.

    It spells any lowercase English by characters plus a few whole-word merges, and loads with
    `CLIPTokenizer.from_pretrained(path)` exactly like a downloaded one.
    """
    from transformers import CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab, merges = _vocab_and_merges()
    with tempfile.TemporaryDirectory() as tmp:
        vf, mf = Path(tmp) / "vocab.json", Path(tmp) / "merges.txt"
        vf.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        mf.write_text(
            "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
        )
        tok = CLIPTokenizer(str(vf), str(mf), model_max_length=model_max_length)
        tok.save_pretrained(str(path))
    return path


def tiny_clip_config(text_dim: int = 32, vision_dim: int = 32, image_size: int = 32):
    """A tiny `CLIPConfig` (2 layers per tower, 2 heads) sized for the tiny tokenizer."""
    from transformers import CLIPConfig

    vocab = _vocab_and_merges()[0]
    text = dict(
        vocab_size=len(vocab),
        hidden_size=text_dim,
        intermediate_size=2 * text_dim,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    vision = dict(
        hidden_size=vision_dim,
        intermediate_size=2 * vision_dim,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=8,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=text_dim)


def save_tiny_clip(
    path: str | Path, text_dim: int = 32, seed: int = 0, *, pytorch: bool = False
) -> Path:
    """Write a tiny random CLIP (Flax weights, or PyTorch safetensors with `pytorch=True`) + tokenizer.

    The folder has the layout of a Hugging Face CLIP download (config.json, weights,
    preprocessor_config.json, tokenizer files), so `load_clip` reads it through the real path.
    """
    from transformers import CLIPImageProcessor, FlaxCLIPModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = tiny_clip_config(text_dim=text_dim)
    model = FlaxCLIPModel(config, seed=seed)
    if pytorch:
        _save_as_pytorch(model, config, path)
    else:
        model.save_pretrained(str(path))
    size = config.vision_config.image_size
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}).save_pretrained(
        str(path)
    )
    save_tiny_tokenizer(path)
    return path


def _save_as_pytorch(flax_model, config, path: Path) -> None:
    """Convert Flax weights to a PyTorch CLIPModel and save it as model.safetensors (needs torch)."""
    from transformers import CLIPModel
    from transformers.modeling_flax_pytorch_utils import load_flax_weights_in_pytorch_model

    pt = CLIPModel(config)
    load_flax_weights_in_pytorch_model(pt, flax_model.params)
    pt.save_pretrained(str(path), safe_serialization=True)
