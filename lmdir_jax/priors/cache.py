"""The prior cache: per clean training image, its scene caption's CLIP text states and a reference.

Built once per training set by `build_cache` (`lmdir priors build`), read by the data pipeline through
`PriorCache(path).get(key)`. Layout of a cache folder:

    manifest.json        build settings (checked on resume) and, when finished, the summary
    index.jsonl          one line per finished item: {"key", "file", "caption", "caption_source", ...}
    items/<h>.npz        scene_states (n, D) f32 (only the n real tokens), scene_mask (T,),
                         has_reference, entry (the index line, for re-indexing)
    references/<h>.png   the Stable Diffusion reference at ref_size (written before the .npz)

The manifest is written first; every item file is written to a temporary name and `os.replace`d
into place, then its index line is appended; a build that is interrupted (exception, Ctrl-C,
kill -9 at any moment) continues where it stopped, and a half-written item is never read:
temporary files are ignored (and removed on resume), a truncated last index line is dropped, and
an item file without its index line is re-indexed on resume. Items are processed in fixed batches
of the source order (the last one padded) and item files carry no timestamps, so a resumed build
writes the same bytes as an uninterrupted one (index, items, references; the manifest's summary
differs only in `resumed_items` and `seconds`).
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lmdir_jax.data.io import read_image, write_image
from lmdir_jax.data.sources import load_source
from lmdir_jax.errors import UsageError
from lmdir_jax.outputs import (
    atomic_write_bytes,
    drop_partial_line,
    read_journal,
    remove_stale_temporaries,
)
from lmdir_jax.priors.clip import load_clip
from lmdir_jax.priors.diffusion import load_sd
from lmdir_jax.progress import progress_bar

MANIFEST = "manifest.json"
INDEX = "index.jsonl"
ITEMS = "items"
REFERENCES = "references"
VERSION = 1
_NPZ_LOCK = threading.Lock()  # see PriorCache.get
# Settings that must match when a build resumes into an existing cache.
_RESUME_KEYS = (
    "version", "clip", "sd", "captions_sha1", "max_text_len", "text_dim", "ref_size", "seed",
    "steps", "guidance", "sd_size", "top_k", "negative_prompt", "dtype",
)
# What a manifest without the key was built with.
_RESUME_DEFAULTS = {"dtype": "float32"}


def item_file(key: str) -> str:
    """File name (under items/) of a key: a hash, so any key (paths, slashes, unicode) is safe."""
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[:20] + ".npz"


def reference_file(key: str) -> str:
    """File name (under references/) of a key's reference PNG."""
    return item_file(key)[:-4] + ".png"


def reference_seed(seed: int, key: str) -> int:
    """Per-image Stable Diffusion seed from the build seed and the image key (order independent)."""
    return (int(seed) * 1_000_003 + zlib.crc32(key.encode("utf-8"))) % (2**32)


def _read_index(path: Path) -> dict[str, dict]:
    """Entries of index.jsonl by key; a truncated or corrupt line (interrupted append) is skipped."""
    return {e["key"]: e for e in read_journal(path) if "key" in e and "file" in e}


class PriorCache:
    """Read-only view of a built prior cache; picklable (grain worker processes get a copy).

    `get(key)` -> dict(scene_states (T, D) f32, scene_mask (T,) bool, reference (R, R, 3) f32,
    has_reference bool, caption str) or None when the key is not cached (counted in `.missing`).
    Padded token positions of `scene_states` are zeros (the network masks them).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / MANIFEST).is_file():
            raise UsageError(f"not a prior cache (no {MANIFEST}): {self.path}")
        self.manifest = json.loads((self.path / MANIFEST).read_text(encoding="utf-8"))
        self.max_text_len = int(self.manifest["max_text_len"])
        self.text_dim = int(self.manifest["text_dim"])
        self.ref_size = int(self.manifest["ref_size"])
        self.missing = 0
        self._index: dict[str, dict] | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_index"] = None  # re-read lazily in the worker
        return state

    @property
    def index(self) -> dict[str, dict]:
        """key -> index entry (caption, caption_source, has_reference, file)."""
        if self._index is None:
            self._index = _read_index(self.path / INDEX)
        return self._index

    def keys(self) -> list[str]:
        """Keys of all cached items."""
        return list(self.index)

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def get(self, key: str) -> dict[str, Any] | None:
        """The priors of one image, or None (and `.missing += 1`) when it is not in the cache."""
        entry = self.index.get(key)
        if entry is None:
            self.missing += 1
            return None
        # One reader at a time: np.load parses .npy headers with ast.literal_eval, and CPython 3.11
        # can fail with "SystemError: AST constructor recursion depth mismatch" when two loader
        # threads parse at once (seen in a quick-start run).
        with _NPZ_LOCK, np.load(self.path / ITEMS / entry["file"]) as z:
            n_states = z["scene_states"].astype(np.float32)
            mask = z["scene_mask"].astype(bool)
            has_ref = bool(z["has_reference"])
        ref = None
        if has_ref:
            ref = read_image(self.path / REFERENCES / reference_file(key))
            if ref is None:
                raise UsageError(f"prior cache reference unreadable for {key!r} in {self.path}")
        states = np.zeros((self.max_text_len, self.text_dim), np.float32)
        states[: n_states.shape[0]] = n_states
        if ref is None:
            reference = np.zeros((self.ref_size, self.ref_size, 3), np.float32)
        else:
            reference = ref.astype(np.float32)
        return {
            "scene_states": states,
            "scene_mask": mask,
            "reference": reference,
            "has_reference": has_ref,
            "caption": entry.get("caption", ""),
        }


def read_captions(path: str | Path) -> dict[str, str]:
    """A JSONL captions file ({"key" or "file": ..., "caption": ...} per line) as a lookup table.

    Each caption is registered under its key/file as given, its file name and its stem, so `file`
    may be a bare name, a relative or an absolute path.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"captions file not found: {path}")
    table: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                e = json.loads(line)
                name = str(e.get("key", e.get("file")))
                caption = str(e["caption"])
            except (ValueError, KeyError, AttributeError):
                raise UsageError(
                    f'{path}:{n}: expected {{"key" or "file": ..., "caption": ...}}'
                ) from None
            if name == "None":
                raise UsageError(f'{path}:{n}: a line needs "key" or "file"')
            p = Path(name)
            for alias in (name, p.as_posix(), p.name, p.stem):
                table.setdefault(alias, caption)
    return table


def _lookup_caption(table: dict[str, str], key: str) -> str | None:
    p = Path(key)
    for alias in (key, p.name, p.stem):
        if alias in table:
            return table[alias]
    return None


def clip_input(image: np.ndarray, size: int) -> np.ndarray:
    """Host-side resize (short side -> size, area/cubic) + centre crop, so images batch together."""
    import cv2

    h, w = image.shape[:2]
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC
    x = cv2.resize(image, (nw, nh), interpolation=interp)
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.clip(x[top : top + size, left : left + size], 0.0, 1.0).astype(np.float32)


def _write_reference(path: Path, image: np.ndarray, size: int) -> None:
    """Resize a reference to size x size and write it as an 8-bit PNG atomically."""
    import cv2

    if image.shape[0] != size or image.shape[1] != size:
        interp = cv2.INTER_AREA if image.shape[0] > size else cv2.INTER_CUBIC
        image = cv2.resize(image, (size, size), interpolation=interp)
    write_image(path, np.clip(image, 0.0, 1.0))  # whole or not at all (outputs.atomic_write_bytes)


def npz_bytes(**arrays: np.ndarray) -> bytes:
    """An uncompressed .npz (what `np.savez` writes) with fixed member timestamps, so the same
    arrays give the same bytes: a resumed build's item files equal an uninterrupted build's."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, value in arrays.items():
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=False)
    return buf.getvalue()


def _sha1_file(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def _write_manifest(out: Path, manifest: dict) -> None:
    atomic_write_bytes(out / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode(), fsync=True)


def build_cache(
    source_spec,
    clip_path: str | Path,
    output: str | Path,
    sd_path: str | Path | None = None,
    captions_file: str | Path | None = None,
    ref_size: int = 64,
    seed: int = 0,
    batch_size: int = 8,
    *,
    steps: int = 25,
    guidance: float = 7.5,
    sd_size: int | None = None,
    max_text_len: int = 32,
    top_k: int = 2,
    negative_prompt: str = "",
    max_items: int | None = None,
    clip=None,
    sd=None,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
    dtype: str = "float32",
) -> dict[str, Any]:
    """Build (or resume) the prior cache of every clean image of a source; returns the summary.

    Per image: its caption (captions file, else zero-shot CLIP from the scene vocabulary), the CLIP
    text states of the caption, and with `sd_path` a Stable Diffusion reference (text-to-image from
    the caption, per-image seed from (seed, key), `sd_size` pixels, stored at `ref_size`). Already
    built items are skipped. `clip`/`sd` may be passed pre-loaded; `on_batch(n_done)` is called
    after each written batch (progress hooks, tests). `dtype` 'bfloat16' loads CLIP and SD in bf16
    (half the weight memory; the cache records it and a resume must use the same).
    """
    t0 = time.perf_counter()
    if int(batch_size) < 1:
        raise UsageError(f"batch size must be >= 1, got {batch_size}")
    if int(ref_size) < 8:
        raise UsageError(f"ref size must be >= 8, got {ref_size}")
    source = load_source(source_spec)
    captions = read_captions(captions_file) if captions_file else {}
    if clip is None:
        clip = load_clip(clip_path, max_text_len=max_text_len, dtype=dtype)
    if sd is None and sd_path:
        sd = load_sd(sd_path, dtype=dtype)
    if sd is not None:
        sd_size = int(sd_size or sd.default_size)
    out = Path(output)
    manifest = {
        "version": VERSION,
        "clip": str(Path(clip_path).resolve()) if clip_path else "",
        "sd": str(Path(sd_path).resolve()) if sd_path else "",
        "captions_sha1": _sha1_file(Path(captions_file)) if captions_file else "",
        "max_text_len": clip.max_text_len,
        "text_dim": clip.text_dim,
        "ref_size": int(ref_size),
        "seed": int(seed),
        "steps": int(steps) if sd is not None else 0,
        "guidance": float(guidance) if sd is not None else 0.0,
        "sd_size": sd_size if sd is not None else 0,
        "top_k": int(top_k),
        "negative_prompt": negative_prompt if sd is not None else "",
        "dtype": dtype,
        "source": str(source_spec) if isinstance(source_spec, str | Path) else repr(source_spec),
    }
    if (out / MANIFEST).is_file():
        old = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        diff = [k for k in _RESUME_KEYS if old.get(k, _RESUME_DEFAULTS.get(k)) != manifest[k]]
        if diff:
            raise UsageError(
                f"{out} holds a cache built with other settings ({', '.join(diff)}): "
                "use another --output or delete it"
            )
    elif out.exists() and any(not p.name.startswith(".tmp-") for p in out.iterdir()):
        raise UsageError(f"output folder exists and is not a prior cache: {out}")
    # The manifest first: a build killed at any later point leaves a folder that resumes.
    out.mkdir(parents=True, exist_ok=True)
    _write_manifest(out, manifest)
    for folder in (out, out / ITEMS, out / REFERENCES):
        folder.mkdir(exist_ok=True)
        remove_stale_temporaries(folder)  # left by a killed atomic write

    if hasattr(source, "keys"):
        keys = list(source.keys())
    else:
        keys = [source[i]["key"] for i in range(len(source))]
    if max_items is not None:
        keys = keys[: int(max_items)]
    drop_partial_line(out / INDEX)
    index = _read_index(out / INDEX)
    # Items whose file landed but whose index line did not (killed in between): re-index them.
    orphans = [k for k in keys if k not in index and (out / ITEMS / item_file(k)).is_file()]
    with open(out / INDEX, "a", encoding="utf-8") as index_f:
        for k in orphans:
            try:
                with np.load(out / ITEMS / item_file(k)) as z:
                    entry = json.loads(str(z["entry"]))
            except Exception:  # unreadable: rebuild it
                (out / ITEMS / item_file(k)).unlink()
                continue
            index_f.write(json.dumps(entry) + "\n")
            index[k] = entry
        index_f.flush()

        batches = [
            list(range(i, min(i + batch_size, len(keys)))) for i in range(0, len(keys), batch_size)
        ]
        todo = [b for b in batches if any(keys[i] not in index for i in b)]
        resumed = len(keys) - sum(keys[i] not in index for b in todo for i in b)
        bar = progress_bar(
            total=len(keys), initial=resumed, desc="prior cache", unit="img", disable=not progress
        )
        for b in todo:
            before = len(index)
            _build_batch(
                source, b, keys, batch_size, clip, sd, captions, out, index, index_f,
                ref_size=int(ref_size), seed=int(seed), steps=int(steps), guidance=float(guidance),
                sd_size=sd_size, top_k=int(top_k), negative_prompt=negative_prompt,
            )
            bar.update(len(index) - before)
            if on_batch is not None:
                on_batch(sum(1 for k in keys if k in index))
        bar.close()

    entries = [index[k] for k in keys if k in index]
    summary = {
        "items": len(entries),
        "captions_given": sum(e["caption_source"] == "file" for e in entries),
        "captions_zero_shot": sum(e["caption_source"] == "zero-shot" for e in entries),
        "references": sum(bool(e["has_reference"]) for e in entries),
        "resumed_items": resumed,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    manifest["summary"] = summary
    _write_manifest(out, manifest)
    return summary


def _build_batch(
    source, batch, keys, batch_size, clip, sd, captions, out, index, index_f, *, ref_size, seed,
    steps, guidance, sd_size, top_k, negative_prompt,
) -> None:
    """Compute and write the items of one fixed batch (padded to batch_size for one compilation)."""
    idx = batch + [batch[-1]] * (batch_size - len(batch))
    bkeys = [keys[i] for i in idx]
    given = [_lookup_caption(captions, k) for k in bkeys]
    if any(c is None for c in given):
        images = np.stack([clip_input(source[i]["clean"], clip.image_size) for i in idx])
        zero_shot = clip.caption(images, top_k=top_k)
    else:
        zero_shot = [""] * len(idx)
    texts = [g if g is not None else z for g, z in zip(given, zero_shot, strict=True)]
    states, mask = clip.encode_text(texts)
    refs = None
    if sd is not None:
        seeds = [reference_seed(seed, k) for k in bkeys]
        refs = sd.text_to_image(
            texts, seed=seeds, steps=steps, guidance=guidance, height=sd_size, width=sd_size,
            negative_prompt=negative_prompt or None,
        )
    for j, i in enumerate(batch):
        key = keys[i]
        if key in index:
            continue
        n = int(mask[j].sum())
        entry = {
            "key": key,
            "file": item_file(key),
            "caption": texts[j],
            "caption_source": "file" if given[j] is not None else "zero-shot",
            "has_reference": refs is not None,
            "tokens": n,
        }
        if refs is not None:
            _write_reference(out / REFERENCES / reference_file(key), refs[j], ref_size)
        data = npz_bytes(
            scene_states=states[j, :n].astype(np.float32),
            scene_mask=mask[j],
            has_reference=np.asarray(refs is not None),
            entry=np.asarray(json.dumps(entry)),
        )
        atomic_write_bytes(out / ITEMS / entry["file"], data, fsync=True)
        index_f.write(json.dumps(entry) + "\n")
        index_f.flush()
        index[key] = entry
