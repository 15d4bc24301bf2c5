"""Errors that the CLI turns into one clear line: UsageError (exit 2), DataError (exit 1)."""


class UsageError(Exception):
    """Bad input from the user (missing file, bad spec, empty folder...): exit 2, one line, no traceback."""


class DataError(Exception):
    """Data on disk that cannot be used as it is (e.g. a checkpoint of an unknown format): exit 1,
    one line, no traceback, nothing moved or deleted."""
