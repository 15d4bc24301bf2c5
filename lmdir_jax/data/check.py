"""`lmdir data check`: walk every training source of a config before anything compiles (its test
sets: `protocols.check_sets`, with the same reports).

One row per folder: image count, pairs matched, unpaired files, unreadable files, the smallest image
against the patch size. Problems (a missing folder, a paired folder with no pairs, a pair whose
sizes differ, a source without any usable image, a bad weight) are one line each.

`decode` says how a file counts as readable: 'auto' decodes every file of a folder of up to
`sources.FULL_CHECK_LIMIT` images (as the training loader does, so a truncated JPEG the loader would
skip is counted here too) and parses only headers beyond that; 'full' decodes every file; 'header'
only parses headers (what `lmdir train` uses: its loader decodes the files next anyway).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from lmdir_jax.data.io import load_image
from lmdir_jax.data.sources import (
    CLEAN_DIRS,
    DEGRADED_DIRS,
    FULL_CHECK_LIMIT,
    NAMED_SOURCES,
    find_subdir,
    is_paired_folder,
    list_images,
    match_pairs,
    source_specs,
)
from lmdir_jax.errors import UsageError
from lmdir_jax.progress import progress_bar

MAX_SIZE_LINES = 10  # at most this many "sizes differ" lines per folder, then a count
PROGRESS_MIN_FILES = 500  # decoding a folder this big shows a progress line


@dataclass
class FolderReport:
    """What `check_folder` found in one source or test set."""

    role: str
    folder: str
    images: int = 0
    pairs: int | None = None
    unpaired: int = 0
    unreadable: int = 0
    unreadable_files: list[str] = field(default_factory=list)  # relative to the folder
    smallest: tuple[int, int] | None = None
    problems: list[str] = field(default_factory=list)


def _size(path: Path, full: bool = False) -> tuple[int, int] | None:
    """(height, width) from the file header (or a full decode), or None when it is not readable."""
    if full:
        loaded = load_image(path)
        return None if loaded is None else tuple(loaded.rgb.shape[:2])
    try:
        with Image.open(path) as im:
            w, h = im.size
        return h, w
    except Exception:  # noqa: BLE001 - any failure means "not an image"
        return None


def _sizes(paths: list[Path], decode: str = "header", desc: str = "") -> list[tuple[int, int] | None]:
    full = decode == "full" or (decode == "auto" and len(paths) <= FULL_CHECK_LIMIT)
    with ThreadPoolExecutor(min(8, (os.cpu_count() or 1) + 1)) as pool:
        sizes = pool.map(lambda p: _size(p, full), paths)
        # decoding thousands of photos takes a while: a progress line (none for small folders)
        bar = progress_bar(sizes, desc=f"check {desc}", unit="img", total=len(paths),
                           disable=not full or len(paths) < PROGRESS_MIN_FILES)
        return list(bar)


def _smallest(sizes) -> tuple[int, int] | None:
    ok = [s for s in sizes if s is not None]
    return min(ok, key=lambda s: (min(s), s)) if ok else None


def check_folder(role: str, path: str, *, degraded_dir: str = "", clean_dir: str = "",
                 paired: bool | None = None, decode: str = "auto") -> FolderReport:
    """Check one source: 'skimage', 'tfds:...', a clean folder or a paired folder.

    `paired` forces the kind (True for a paired test set, False for a clean one); None = detect.
    `decode`: 'auto', 'full' or 'header' (module docstring).
    """
    rep = FolderReport(role=role, folder=str(path))
    if str(path) in NAMED_SOURCES:  # skimage, skimage-heldout: photos inside scikit-image
        rep.images = len(NAMED_SOURCES[str(path)])
        return rep
    if str(path).startswith("tfds:"):
        return rep  # read through tfds at training time; nothing to walk here
    root = Path(path).expanduser()
    if not root.is_dir():
        rep.problems.append(f"{role}: folder not found: {path}")
        return rep
    is_paired = bool(degraded_dir or clean_dir) or is_paired_folder(root)
    if paired is True and not is_paired:
        rep.problems.append(f"{role}: {path} is not a paired folder (it needs e.g. input/ + target/)")
        return rep
    if not is_paired:
        files = list_images(root)
        sizes = _sizes(files, decode, str(path))
        rep.images = len(files)
        rep.unreadable = sum(s is None for s in sizes)
        rep.unreadable_files = [p.relative_to(root).as_posix() for p, s in zip(files, sizes, strict=True)
                                if s is None]
        rep.smallest = _smallest(sizes)
        if rep.images == rep.unreadable:
            what = "only unreadable image files" if files else "no image files"
            rep.problems.append(f"{role}: no usable image in {path}: it has {what}")
        return rep
    ddir = root / degraded_dir if degraded_dir else find_subdir(root, DEGRADED_DIRS)
    cdir = root / clean_dir if clean_dir else find_subdir(root, CLEAN_DIRS)
    for sub in (ddir, cdir):
        if sub is None or not sub.is_dir():
            rep.problems.append(f"{role}: {path} has no sub-folder {sub.name if sub else '?'}/")
            return rep
    dfiles, cfiles = list_images(ddir), list_images(cdir)
    dsizes, csizes = _sizes(dfiles, decode, str(ddir)), _sizes(cfiles, decode, str(cdir))
    rep.images = len(dfiles) + len(cfiles)
    rep.unreadable = sum(s is None for s in dsizes + csizes)
    rep.unreadable_files = [p.relative_to(root).as_posix()
                            for p, s in zip(dfiles + cfiles, dsizes + csizes, strict=True) if s is None]
    rep.smallest = _smallest(dsizes + csizes)
    dsize = {p.relative_to(ddir).as_posix(): s for p, s in zip(dfiles, dsizes, strict=True) if s}
    csize = {p.relative_to(cdir).as_posix(): s for p, s in zip(cfiles, csizes, strict=True) if s}
    pairs, lone_d, lone_c = match_pairs(list(dsize), list(csize))
    rep.pairs, rep.unpaired = len(pairs), len(lone_d) + len(lone_c)
    if not pairs:
        rep.problems.append(
            f"{role}: no {ddir.name}/{cdir.name} pair in {path} "
            f"({len(dsize)} {ddir.name} and {len(csize)} {cdir.name} readable image(s))"
        )
    bad = [(d, c) for d, c in pairs if dsize[d] != csize[c]]
    for d, c in bad[:MAX_SIZE_LINES]:
        (dh, dw), (ch, cw) = dsize[d], csize[c]
        rep.problems.append(
            f"{role}: pair sizes differ: {ddir.name}/{d} {dh}x{dw} vs {cdir.name}/{c} {ch}x{cw}"
        )
    if len(bad) > MAX_SIZE_LINES:
        rep.problems.append(f"{role}: ... and {len(bad) - MAX_SIZE_LINES} more pair(s) whose sizes differ")
    return rep


def check_config(config, *, decode: str = "auto") -> list[FolderReport]:
    """Reports for the config's training data (data.sources, or data.source) and its validation
    folder; `decode` as in `check_folder`. The test sets of data.protocol: `protocols.check_sets`."""
    d = config.data
    reports = []
    try:
        specs = source_specs(d)
    except UsageError as e:
        bad = FolderReport(role="data.sources", folder="")
        bad.problems.append(str(e))
        return [bad]
    if specs:
        for s in specs:
            # a source with a degradation text is a paired source (the text labels its pairs): a
            # folder without its clean half would otherwise be read as clean photos
            reports.append(check_folder(f"train:{s.name}", s.path, degraded_dir=s.degraded_dir,
                                        clean_dir=s.clean_dir, paired=True if s.text else None,
                                        decode=decode))
    else:
        reports.append(check_folder("train", str(d.source), decode=decode))
    if str(d.get("val_source", "")):
        reports.append(check_folder("val", str(d.val_source), decode=decode))
    return reports


def problems(reports: list[FolderReport]) -> list[str]:
    """Every problem line of the reports, in order."""
    return [p for r in reports for p in r.problems]


def format_check(reports: list[FolderReport], patch: int) -> str:
    """The table: role, folder, images, pairs, unpaired, unreadable, smallest vs patch."""
    head = f"{'source':<16} {'images':>7} {'pairs':>7} {'unpaired':>8} {'unreadable':>10}  smallest  folder"
    lines = [head, "-" * len(head)]
    for r in reports:
        small = "-"
        if r.smallest is not None:
            h, w = r.smallest
            small = f"{h}x{w}" + (f" <{patch}" if min(h, w) < patch else "")
        pairs = "-" if r.pairs is None else str(r.pairs)
        lines.append(
            f"{r.role[:16]:<16} {r.images:>7} {pairs:>7} {r.unpaired:>8} {r.unreadable:>10}  "
            f"{small:<8}  {r.folder}"
        )
    lines.append(f"(patch size {patch}; smaller images are reflect-padded)")
    for r in reports:  # skipped, not a problem; but say which, so they can be fixed
        if r.unreadable_files:
            names = ", ".join(r.unreadable_files[:5]) + (", ..." if len(r.unreadable_files) > 5 else "")
            lines.append(f"{r.role}: {r.unreadable} unreadable file(s) will be skipped: {names}")
    return "\n".join(lines)
