"""Checks on output paths, run before any work so a mistake costs nothing and loses nothing.

`check_output_folder` refuses an output folder that is, or contains, an input (with or without
`--force`); `check_output_file` refuses a file path that cannot be written (a folder, or a path under
a file), and `check_text_output` (a report, JSON or CSV) also an existing image; `check_workdir`
refuses a run folder (new or resumed) that is, or lies under, a file. All raise `UsageError` with
one line naming the flag. `atomic_write_bytes` writes a file whole or not at all (a killed run
leaves no half-written image, report, index or label file); `read_journal`, `drop_partial_line` and
`remove_stale_temporaries` let a rerun of a killed command resume without counting a partial file
as done. `is_image_file` tells an image by its extension (IMAGE_EXTENSIONS). JAX-free.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from lmdir_jax.errors import UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")


def is_image_file(path: str | Path) -> bool:
    """True when the file name has one of IMAGE_EXTENSIONS (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def _writable_parent(path: Path, flag: str) -> None:
    """The nearest existing ancestor of `path` must be a writable folder."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{flag} {path}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise UsageError(f"{flag} {path}: cannot write into {parent}")
            return


def _is_within(child: Path, folder: Path) -> bool:
    return child == folder or folder in child.parents


def check_output_folder(
    output: str | Path, inputs: Iterable[str | Path] = (), *, flag: str = "--output"
) -> Path:
    """Refuse `output` when it is a file, lies under a file, cannot be created, or is (or contains)
    any of `inputs` (files or folders: the images read, a checkpoint workdir). Returns the path."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise UsageError(f"{flag} must be a folder, not a file: {output}")
    _writable_parent(output, flag)
    out = _resolved(output)
    for item in inputs:
        if _is_within(_resolved(item), out):
            raise UsageError(
                f"{flag} {output} is, or contains, the input {item}: choose a folder outside the inputs"
            )
    return output


def check_output_file(
    path: str | Path, inputs: Iterable[str | Path] = (), *, flag: str = "--output"
) -> Path:
    """Refuse a file path that is a folder, lies under a file, cannot be created, or is one of the
    `inputs` files. Returns the path."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder: give a file name")
    _writable_parent(path, flag)
    target = _resolved(path)
    for item in inputs:
        if target == _resolved(item):
            raise UsageError(f"{flag} {path} would overwrite the input {item}")
    return path


def check_workdir(workdir: str | Path, *, flag: str = "--workdir") -> Path:
    """The absolute run folder (created or resumed later); UsageError when it, or a folder above it,
    is an existing file, or when it cannot be created."""
    path = _resolved(workdir)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {workdir}: {path} is a file, not a folder")
    if not path.exists():
        _writable_parent(path, flag)
    return path


def check_text_output(
    path: str | Path, inputs: Iterable[str | Path] = (), *, flag: str = "--output"
) -> Path:
    """`check_output_file` for a text output (a report, JSON or CSV), which also never replaces an
    existing image file: a path typed into the wrong flag must not turn a photo into a table."""
    path = check_output_file(path, inputs, flag=flag)
    if path.is_file() and is_image_file(path):
        raise UsageError(f"{flag} {path} is an existing image: give the new {flag.lstrip('-')} file a name")
    return path


def atomic_write_bytes(path: str | Path, data: bytes, *, fsync: bool = False) -> Path:
    """Write `data` to a hidden temporary file beside `path`, then rename it over `path`: readers see
    the old file or the new one, never a part (`fsync` also survives a power cut). Returns path."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_journal(path: str | Path) -> list[dict]:
    """The complete JSON-object lines of an append-only journal (a run's record of finished work);
    a partial last line (a run killed mid-append) and an undecodable line are left out."""
    path = Path(path)
    records: list[dict] = []
    if not path.is_file():
        return records
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def drop_partial_line(path: str | Path) -> None:
    """Cut a journal's interrupted last line (no newline), so that appends start on a fresh line."""
    path = Path(path)
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def remove_stale_temporaries(folder: str | Path, names: Iterable[str] | None = None) -> None:
    """Delete the temporary files a killed `atomic_write_bytes` left in `folder` (all of them, or
    only those of the files `names`)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    wanted = None if names is None else set(names)
    for tmp in folder.glob(".tmp-*"):
        pid, _, name = tmp.name[len(".tmp-"):].partition("-")
        if pid.isdigit() and (wanted is None or name in wanted) and tmp.is_file():
            tmp.unlink(missing_ok=True)
