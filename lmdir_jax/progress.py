"""Progress bars that read well in a terminal, in a notebook and in a log file.

Every long command (evaluate, restore, degrade, the prior cache, classify, controller training)
shows its progress through `progress_bar`. On a terminal it is tqdm's bar, redrawn in place; in a
Jupyter kernel tqdm's notebook widget. Anywhere else (output piped to a file, `nohup`, CI) tqdm's
carriage-return redraws would pile up into one unreadable line, so the same bar is written as one
whole line every `LOG_INTERVAL_S` seconds and once at the end.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from tqdm import tqdm
from tqdm.auto import tqdm as notebook_tqdm

LOG_INTERVAL_S = 30.0


def is_terminal(stream: Any) -> bool:
    """Whether `stream` is an interactive terminal (False for files, pipes and closed streams)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _WholeLines:
    """A write-only stream that turns tqdm's '\\r' redraws into newline-terminated lines."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, s: str) -> int:
        line = s.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")
        return len(s)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False


def _in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    ip = getattr(shell, "get_ipython", lambda: None)() if shell else None
    return type(ip).__name__ == "ZMQInteractiveShell"


def progress_bar(iterable: Any = None, *, desc: str, unit: str = "it", total: int | None = None,
                 disable: bool = False, file: TextIO | None = None, **kwargs: Any):
    """A tqdm bar over `iterable` (or a manual one with `total`, advanced by `.update(n)`) that
    writes to `file` (stderr) as a terminal, a notebook or a log file each reads best (module doc).
    Other keyword arguments go to tqdm (`initial`, `leave`, ...)."""
    stream = file if file is not None else sys.stderr
    bar = tqdm
    if file is None and _in_notebook():
        bar = notebook_tqdm
    elif not is_terminal(stream):
        stream = _WholeLines(stream)
        kwargs["mininterval"] = max(float(kwargs.get("mininterval", 0.0)), LOG_INTERVAL_S)
        kwargs["maxinterval"] = kwargs["mininterval"]  # tqdm's monitor thread would redraw every 10 s
        kwargs.pop("dynamic_ncols", None)
        kwargs.setdefault("ascii", True)
    return bar(iterable, desc=desc, unit=unit, total=total, disable=disable, file=stream, **kwargs)


def write_line(message: str, file: TextIO | None = None) -> None:
    """Print a line without breaking an open progress bar (tqdm.write)."""
    tqdm.write(message, file=file if file is not None else sys.stdout)
