"""CLIP's byte-level BPE tokenizer, as transformers' `CLIPTokenizer` reads it.

Hugging Face folders carry vocab.json + merges.txt (or tokenizer.json). OpenCLIP and DA-CLIP ship
the same BPE as `bpe_simple_vocab_16e6.txt.gz` (the merges only: the vocabulary is derived from them,
as OpenCLIP's `SimpleTokenizer` derives it); `write_from_openclip_bpe` turns it into vocab.json +
merges.txt so one tokenizer class serves all three.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from transformers import CLIPTokenizer, CLIPTokenizerFast

from lmdir_jax.errors import UsageError

START, END = "<|startoftext|>", "<|endoftext|>"
OPENCLIP_BPE = "bpe_simple_vocab_16e6.txt.gz"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible map of the 256 byte values to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def load_tokenizer(folder: Path):
    """The CLIP tokenizer of a folder (tokenizer.json, or vocab.json + merges.txt)."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        return CLIPTokenizerFast.from_pretrained(str(folder))
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return CLIPTokenizer.from_pretrained(str(folder))
    raise UsageError(f"{folder} has no CLIP tokenizer (vocab.json + merges.txt or tokenizer.json)")


def openclip_bpe_path() -> Path | None:
    """OpenCLIP's installed BPE merges file, or None when open_clip is not installed."""
    try:
        import open_clip
    except ImportError:
        return None
    path = Path(open_clip.__file__).parent / OPENCLIP_BPE
    return path if path.is_file() else None


def write_from_openclip_bpe(bpe_file: Path, folder: Path, model_max_length: int = 77) -> Path:
    """Write vocab.json + merges.txt (and transformers' tokenizer configs) for OpenCLIP's BPE merges
    file: the vocabulary is OpenCLIP's (bytes, bytes + '</w>', the 48894 merges, the two specials)."""
    try:
        lines = gzip.open(bpe_file).read().decode("utf-8").split("\n")
    except OSError as e:
        raise UsageError(f"cannot read {bpe_file}: {e}") from None
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [START, END]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False),
                                       encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                       encoding="utf-8")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=model_max_length)
    tok.save_pretrained(str(folder))
    return folder
