"""Checks on output paths, run before any work so a mistake costs nothing and loses nothing.

`check_output_folder` refuses an output folder that is, or contains, an input (with or without
`--force`); `check_output_file` refuses a file path that cannot be written (a folder, or a path under
a file), and `check_text_output` (a report, JSON or CSV) also an existing image; `check_workdir`
refuses a run folder (new or resumed) that is, or lies under, a file. All raise `UsageError` with
one line naming the flag. `atomic_write_bytes` writes a file whole or not at all (a killed run
leaves no half-written image or report). JAX-free.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from lmdir_jax.errors import UsageError


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
    from lmdir_jax.data.io import is_image_file

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
