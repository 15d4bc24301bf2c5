"""CLI sub-commands: one module each, with `register(subparsers)`; argparse types they share."""

from __future__ import annotations

import argparse


def seed_type(text: str) -> int:
    """argparse type of `--seed`: an integer >= 0 (numpy's generators take no negative seed)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value
