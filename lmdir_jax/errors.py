"""Errors that the CLI turns into one clear line and exit status 2."""


class UsageError(Exception):
    """Bad input from the user (missing file, bad spec, empty folder...): exit 2, one line, no traceback."""
