"""Random-access sources of clean images (or degraded/clean pairs) that grain's MapDataset can read.

`load_source(spec)` understands:
- `skimage`: the colour sample photographs shipped inside scikit-image (no download), less the
  `skimage-heldout` ones (coffee, chelsea) kept for the quick start's sample and evaluation;
- a folder of clean images (searched recursively);
- a paired folder holding `degraded/` and `clean/` (or `input/` + `target/`, `rainy/` + `gt/`,
  `synthetic/` + `original/`, `blur/` + `sharp/`, `low/` + `high/`, ...), matched by `match_pairs`:
  identical name, degraded name = clean name + '_...' (SOTS: `0001_0.8_0.2.jpg` <-> `0001.png`), or
  the same name after a leading word (PromptIR: `rainy/rain-12.png` <-> `gt/norain-12.png`);
- `tfds:NAME:SPLIT` (a `tfds.data_source`; needs tensorflow-datasets and the prepared data).

Every item is a dict with `key` (stable: the path relative to the source root, or the skimage
name) and `clean` (float32 HxWx3 in [0, 1]); paired sources add `degraded`. Unreadable files are
skipped, counted and reported once; a source without any usable image raises UsageError.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import skimage.data
from PIL import Image

from lmdir_jax.data.io import is_image_file, load_image, read_image
from lmdir_jax.errors import UsageError, permission_error

log = logging.getLogger("lmdir_jax.data")

# Colour photographs stored inside the scikit-image package (loaded without any download).
# `skimage` (training) and `skimage-heldout` (the quick start's sample and its fallback evaluation
# set) never share a photo.
SKIMAGE_NAMES: tuple[str, ...] = (
    "astronaut",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "stereo_motorcycle",
)
SKIMAGE_HELDOUT_NAMES: tuple[str, ...] = ("coffee", "chelsea")
NAMED_SOURCES = {"skimage": SKIMAGE_NAMES, "skimage-heldout": SKIMAGE_HELDOUT_NAMES}
DEGRADED_DIRS = ("degraded", "input", "lq", "hazy", "rainy", "low", "synthetic", "blur")
CLEAN_DIRS = ("clean", "target", "gt", "clear", "norain", "high", "original", "sharp")
FULL_CHECK_LIMIT = 4000  # folders up to this many files are fully decoded once when loaded


def _report_bad(where: str, bad: list[str]) -> None:
    if bad:
        names = ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else "")
        log.warning("%s: skipped %d unreadable file(s): %s", where, len(bad), names)


def _is_readable(path: Path, full: bool) -> bool:
    """A cheap header check (PIL open), or a full decode when `full`."""
    if full:
        return load_image(path) is not None
    try:
        if path.stat().st_size == 0:
            return False
        with Image.open(path) as im:
            im.size  # noqa: B018 - opening parses the header and runs PIL's bomb guard
        return True
    except Exception:  # noqa: BLE001 - any failure means "not an image"
        return False


def _check_files(paths: list[Path], root: Path, check: str) -> tuple[list[Path], list[str]]:
    full = check == "full" or (check == "auto" and len(paths) <= FULL_CHECK_LIMIT)
    if check == "none":
        return paths, []
    workers = min(8, (os.cpu_count() or 1) + 1)
    with ThreadPoolExecutor(workers) as pool:
        ok = list(pool.map(lambda p: _is_readable(p, full), paths))
    good = [p for p, o in zip(paths, ok, strict=True) if o]
    bad = [p.relative_to(root).as_posix() for p, o in zip(paths, ok, strict=True) if not o]
    return good, bad


def list_images(root: str | Path) -> list[Path]:
    """Image files under `root` (recursive, sorted, hidden files and folders skipped); a folder that
    may not be listed is a DataError naming it (never silently left out)."""
    def refused(err: OSError) -> None:
        if isinstance(err, PermissionError):
            raise permission_error(err.filename, "list the folder") from None

    root = Path(root)
    out = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=refused):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [Path(dirpath) / f for f in filenames if not f.startswith(".") and is_image_file(f)]
    return sorted(out)


class _LRU:
    """A tiny per-process LRU of decoded images (not pickled to worker processes)."""

    def __init__(self, size: int):
        self.size = size
        self.data: OrderedDict[Any, Any] = OrderedDict()

    def get(self, key, make):
        if self.size <= 0:
            return make()
        if key in self.data:
            self.data.move_to_end(key)
            return self.data[key]
        value = make()
        self.data[key] = value
        if len(self.data) > self.size:
            self.data.popitem(last=False)
        return value


class ImageSource:
    """Base of all sources: len/getitem returning {'key', 'clean'[, 'degraded']} dicts."""

    paired: bool = False
    name: str = "source"

    def __init__(self, cache_size: int = 0):
        self.cache_size = cache_size
        self._cache = _LRU(cache_size)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._cache = _LRU(self.cache_size)

    def keys(self) -> list[str]:
        """The stable key of every item, in index order."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.keys())

    def _load(self, index: int) -> dict[str, Any]:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self._cache.get(index, lambda: self._load(index))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {len(self)} items)"


_SKIMAGE_LOCK = threading.Lock()


def _skimage_photo(name: str) -> np.ndarray:
    """One scikit-image sample photo as uint8 HxWx3.

    Under one lock: skimage.data parses .npy/.npz headers with ast.literal_eval, and CPython 3.11
    can fail with "SystemError: AST constructor recursion depth mismatch" when two threads parse
    at once (the same race priors/cache.py guards against).
    """
    with _SKIMAGE_LOCK:
        a = getattr(skimage.data, name)()
    if isinstance(a, tuple):  # stereo_motorcycle -> (left, right, disparity)
        a = a[0]
    a = np.asarray(a)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    return np.ascontiguousarray(a[..., :3])


class SkimageSource(ImageSource):
    """The colour sample photographs of scikit-image, decoded once, in the creating process.

    The uint8 photos travel with the source to data workers, so no thread or worker parses
    scikit-image's files again.
    """

    def __init__(self, names: tuple[str, ...] = SKIMAGE_NAMES, name: str = "skimage"):
        super().__init__(cache_size=0)
        self.name = name
        self.names = tuple(names)
        self.photos = [_skimage_photo(n) for n in self.names]

    def keys(self) -> list[str]:
        return list(self.names)

    def _load(self, index: int) -> dict[str, Any]:
        return {"key": self.names[index], "clean": self.photos[index].astype(np.float32) / 255.0}


class FolderSource(ImageSource):
    """A folder of clean images (recursive); decoded per element with a small LRU cache."""

    def __init__(self, root: str | Path, check: str = "auto", cache_size: int = 16):
        super().__init__(cache_size=cache_size)
        self.root = Path(root)
        self.name = str(root)
        files = list_images(self.root)
        self.paths, bad = _check_files(files, self.root, check)
        self.num_unreadable = len(bad)
        self.unreadable = bad
        _report_bad(str(root), bad)
        if not self.paths:
            what = "only unreadable image files" if files else "no image files"
            raise UsageError(f"no usable image in {root}: it has {what}")
        self._keys = [p.relative_to(self.root).as_posix() for p in self.paths]

    def keys(self) -> list[str]:
        return self._keys

    def _read(self, index: int) -> np.ndarray:
        """Decode item `index`; a file that went bad after loading falls back to the next one."""
        for k in range(len(self.paths)):
            i = (index + k) % len(self.paths)
            img = read_image(self.paths[i])
            if img is not None:
                if k:
                    log.warning("%s: %s became unreadable; using %s instead",
                                self.name, self._keys[index], self._keys[i])
                return img
        raise UsageError(f"no image in {self.root} is readable any more")

    def _load(self, index: int) -> dict[str, Any]:
        return {"key": self._keys[index], "clean": self._read(index)}


def find_subdir(root: Path, names: tuple[str, ...]) -> Path | None:
    for n in names:
        if (root / n).is_dir():
            return root / n
    return None


def is_paired_folder(root: str | Path) -> bool:
    """True when `root` holds a degraded folder and a clean folder (e.g. degraded/ + clean/)."""
    root = Path(root)
    return find_subdir(root, DEGRADED_DIRS) is not None and find_subdir(root, CLEAN_DIRS) is not None


def _stem(rel: str) -> str:
    return rel.rsplit(".", 1)[0] if "." in rel.rsplit("/", 1)[-1] else rel


def _unique(keys: dict[str, str | None], key: str, value: str) -> None:
    keys[key] = value if key not in keys else None  # None marks an ambiguous key


def match_pairs(degraded: list[str], clean: list[str]) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """Match degraded and clean relative paths; returns (pairs, unmatched degraded, unmatched clean).

    Rules, tried in order for each degraded file (suffixes are ignored):
    1. the same stem (`a/001.png` <-> `a/001.jpg`);
    2. degraded stem = clean stem + '_...' (SOTS/OTS: `0025_0.8_0.04.jpg` <-> `0025.png`; the
       longest clean stem wins);
    3. rules 1-2 on the file name alone, when the folders differ (PromptIR's
       `synthetic/part1/0025_0.8_0.04.jpg` <-> `original/0025.jpg`), if that name is unique;
    4. the same stem after a leading word (PromptIR: `rain-12.png` <-> `norain-12.png`), if unique.
    """
    by_stem = {_stem(c): c for c in clean}
    by_name: dict[str, str | None] = {}
    by_tail: dict[str, str | None] = {}
    for c in clean:
        s = _stem(c).rsplit("/", 1)[-1]
        _unique(by_name, s, c)
        tail = re.sub(r"^[A-Za-z]+[-_]?", "", s)
        if tail and tail != s:
            _unique(by_tail, tail, c)

    def prefix_match(s: str, table: dict) -> str | None:
        found = table.get(s)
        if found is None:
            parts = s.split("_")
            for n in range(len(parts) - 1, 0, -1):
                found = table.get("_".join(parts[:n]))
                if found is not None:
                    break
        return found

    pairs, lone = [], []
    for d in degraded:
        s = _stem(d)
        name = s.rsplit("/", 1)[-1]
        match = prefix_match(s, by_stem) or prefix_match(name, by_name)
        if match is None:
            tail = re.sub(r"^[A-Za-z]+[-_]?", "", name)
            if tail and tail != name:
                match = by_tail.get(tail)
        if match is None:
            lone.append(d)
        else:
            pairs.append((d, match))
    used = {c for _, c in pairs}
    return pairs, lone, [c for c in clean if c not in used]


class PairedSource(ImageSource):
    """A paired folder: degraded and clean sub-folders matched by name (see `match_pairs`).

    `degraded_dir`/`clean_dir` name the sub-folders (default: the first of DEGRADED_DIRS /
    CLEAN_DIRS that exists).
    """

    paired = True

    def __init__(
        self,
        root: str | Path,
        check: str = "auto",
        cache_size: int = 16,
        degraded_dir: str = "",
        clean_dir: str = "",
    ):
        super().__init__(cache_size=cache_size)
        self.root = Path(root)
        self.name = str(root)
        ddir = self.root / degraded_dir if degraded_dir else find_subdir(self.root, DEGRADED_DIRS)
        cdir = self.root / clean_dir if clean_dir else find_subdir(self.root, CLEAN_DIRS)
        for given, found in ((degraded_dir, ddir), (clean_dir, cdir)):
            if given and not found.is_dir():
                raise UsageError(f"paired folder {root} has no sub-folder {given}/")
        if ddir is None or cdir is None:
            raise UsageError(f"{root} is not a paired folder (it needs degraded/ and clean/)")
        self.degraded_dir, self.clean_dir = ddir, cdir
        dall, call = list_images(ddir), list_images(cdir)
        dfiles, bad_d = _check_files(dall, self.root, check)
        cfiles, bad_c = _check_files(call, self.root, check)
        _report_bad(str(root), bad_d + bad_c)
        self.num_files = len(dall) + len(call)
        self.num_unreadable = len(bad_d) + len(bad_c)
        self.unreadable = bad_d + bad_c
        drel = [p.relative_to(ddir).as_posix() for p in dfiles]
        crel = [p.relative_to(cdir).as_posix() for p in cfiles]
        pairs, lone_d, lone_c = match_pairs(drel, crel)
        self.unmatched = [f"{ddir.name}/{d}" for d in lone_d] + [f"{cdir.name}/{c}" for c in lone_c]
        if self.unmatched:
            names = ", ".join(self.unmatched[:10]) + (", ..." if len(self.unmatched) > 10 else "")
            log.warning("%s: %d unmatched file(s): %s", root, len(self.unmatched), names)
        if not pairs:
            raise UsageError(
                f"no matching {ddir.name}/{cdir.name} pair in {root} "
                f"({len(drel)} {ddir.name} and {len(crel)} {cdir.name} image(s))"
            )
        self.pairs = [(ddir / d, cdir / c) for d, c in pairs]
        self._keys = [f"{ddir.name}/{d}" for d, _ in pairs]
        self.clean_keys = [f"{cdir.name}/{c}" for _, c in pairs]

    def keys(self) -> list[str]:
        return self._keys

    def _load(self, index: int) -> dict[str, Any]:
        d, c = self.pairs[index]
        lq, gt = read_image(d), read_image(c)
        if lq is None or gt is None:
            raise UsageError(f"{d if lq is None else c} became unreadable")
        if lq.shape != gt.shape:
            h, w = min(lq.shape[0], gt.shape[0]), min(lq.shape[1], gt.shape[1])
            lq, gt = lq[:h, :w], gt[:h, :w]
        return {"key": self._keys[index], "clean": gt, "degraded": lq}


class TfdsSource(ImageSource):
    """A TFDS dataset split read through `tfds.data_source` (random access, array_record)."""

    def __init__(self, name: str, split: str, image_key: str = "image", cache_size: int = 0):
        super().__init__(cache_size=cache_size)
        try:
            import tensorflow_datasets as tfds
        except ImportError:
            raise UsageError("tfds sources need tensorflow-datasets (pip install 'lmdir-jax[tfds]')") from None
        self.name = f"tfds:{name}:{split}"
        try:
            self.ds = tfds.data_source(name, split=split)
        except Exception as e:  # noqa: BLE001 - unknown name, missing data, bad split
            raise UsageError(f"cannot open {self.name}: {str(e).splitlines()[0]}") from None
        self.image_key = image_key
        self.prefix = f"{name}/{split}"
        self.length = len(self.ds)
        if self.length == 0:
            raise UsageError(f"{self.name} is empty")

    def keys(self) -> list[str]:
        return [f"{self.prefix}/{i}" for i in range(self.length)]

    def __len__(self) -> int:
        return self.length

    def _load(self, index: int) -> dict[str, Any]:
        ex = self.ds[index]
        a = np.asarray(ex[self.image_key])
        if a.ndim == 2:
            a = a[..., None]
        if a.shape[-1] == 1:
            a = np.repeat(a, 3, axis=-1)
        a = a[..., :3]
        img = a.astype(np.float32) / (65535.0 if a.dtype == np.uint16 else 255.0)
        return {"key": f"{self.prefix}/{index}", "clean": img}


def is_named_source(text: str) -> bool:
    """True for the sources that are names, not paths: 'skimage', 'skimage-heldout' and
    'tfds:NAME:SPLIT'."""
    return text in NAMED_SOURCES or text.startswith("tfds:")


def load_source(spec: str | Path | ImageSource, check: str = "auto") -> ImageSource:
    """A random-access source from 'skimage' (training photos), 'skimage-heldout' (photos kept out of
    'skimage'), a folder, a paired folder or 'tfds:NAME:SPLIT'.

    `check`: 'auto' (decode every file once for folders up to FULL_CHECK_LIMIT files, otherwise
    only parse headers), 'full', 'header' or 'none'. Raises UsageError for a missing path or a
    source with no usable image.
    """
    if isinstance(spec, ImageSource):
        return spec
    text = str(spec)
    if not text:
        raise UsageError("no data source given (set --config.data.source)")
    if text in NAMED_SOURCES:
        return SkimageSource(NAMED_SOURCES[text], name=text)
    if text.startswith("tfds:"):
        parts = text.split(":")
        if len(parts) != 3 or not all(parts[1:]):
            raise UsageError(f"bad tfds source '{text}': use tfds:NAME:SPLIT, e.g. tfds:div2k:train")
        return TfdsSource(parts[1], parts[2])
    path = Path(text).expanduser()
    if not path.exists():
        raise UsageError(f"data source not found: {text}")
    if not path.is_dir():
        raise UsageError(f"data source must be a folder, 'skimage' or tfds:NAME:SPLIT, got the file {text}")
    if is_paired_folder(path):
        return PairedSource(path, check=check)
    return FolderSource(path, check=check)


@dataclass(frozen=True)
class SourceSpec:
    """One resolved entry of `data.sources` (see `lmdir_jax.data.config.source_config`)."""

    name: str
    path: str
    weight: float
    specs: tuple[str, ...] = ()
    tasks: tuple[tuple[str, float], ...] = ()
    text: str = ""
    degraded_dir: str = ""
    clean_dir: str = ""


def resolve_path(path: str, root: str = "") -> str:
    """A source path read under `root` when relative ('skimage' and tfds names are left alone)."""
    path = str(path)
    if not path or is_named_source(path) or not root:
        return path
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else Path(root).expanduser() / p)


def source_specs(data_config) -> list[SourceSpec]:
    """The resolved `data.sources` in name order ([] without a mixture); bad weights -> UsageError."""
    sources = data_config.get("sources") or {}
    root = str(data_config.get("root", ""))
    out = []
    for name in sorted(sources.keys()):
        sc = sources[name]
        weight = float(sc.get("weight", 1.0))
        if not weight > 0 or not np.isfinite(weight):
            raise UsageError(f"data.sources.{name}.weight must be > 0, got {weight:g}")
        path = str(sc.get("path", ""))
        if not path:
            raise UsageError(f"data.sources.{name}.path is empty")
        tasks = tuple((k, float(v)) for k, v in dict(sc.get("tasks") or {}).items())
        out.append(SourceSpec(
            name=name, path=resolve_path(path, root), weight=weight,
            specs=tuple(str(x) for x in (sc.get("specs") or ())), tasks=tasks,
            text=str(sc.get("text", "")), degraded_dir=str(sc.get("degraded_dir", "")),
            clean_dir=str(sc.get("clean_dir", "")),
        ))
    return out
