"""Errors that the CLI turns into one clear line: `UsageError` (exit 2) and `DataError` (exit 1);
and `warn`, the one path of the package's warnings (`lmdir: warning: ...` on stderr, cli.py)."""

import logging


class UsageError(Exception):
    """Bad input from the user (missing file, bad spec, empty folder...): exit 2, one line, no traceback."""


class DataError(Exception):
    """A data problem that stops a command (an input it may not read, a checkpoint of an unknown
    format): exit 1, one line naming the file or folder, no traceback, nothing moved or deleted."""


def permission_error(path, action: str = "read") -> DataError:
    """The DataError of a refused permission on `path`, worded the same everywhere."""
    return DataError(f"permission denied: cannot {action} {path}")


def warn(message: str, logger: str = "lmdir_jax") -> None:
    """Report something the user should know that does not stop the command (a skipped file): one
    line through the package's logger, which the console script prints as `lmdir: warning: ...`."""
    logging.getLogger(logger).warning("%s", message)
