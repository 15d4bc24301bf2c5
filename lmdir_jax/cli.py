"""The `lmdir` command: a thin argparse front over the library.

Each sub-command lives in `lmdir_jax/commands/<name>.py` with a `register(subparsers)` function
that adds its parser and sets `func` (a callable taking the parsed args and returning an exit code).
Heavy imports (jax, flax, transformers) happen inside the handlers so `lmdir --help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from lmdir_jax.errors import DataError, UsageError

COMMAND_MODULES = (
    "degrade",
    "data",
    "model",
    "priors",
    "train",
    "restore",
    "evaluate",
    "export",
    "importer",
    "bench",
    "report",
)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports misuse as one line on stderr and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def split_config_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate `--config.key=value` (or `--config.key value`) tokens from the other arguments.

    Only the tokens are split off (argparse does not know the config's keys); their values are
    parsed and typed by `ml_collections.config_flags` in `lmdir_jax.config.load_config`.
    """
    rest: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok.startswith("--config."):
            if "=" in tok:
                overrides.append(tok[len("--") :])
            else:
                if i + 1 >= len(argv):
                    raise UsageError(f"{tok} needs a value (use {tok}=VALUE)")
                overrides.append(f"{tok[len('--'):]}={argv[i + 1]}")
                i += 1
        else:
            rest.append(tok)
        i += 1
    return rest, overrides


def build_parser() -> ArgumentParser:
    """The full `lmdir` parser with every available sub-command registered."""
    parser = ArgumentParser(
        prog="lmdir",
        description="LMDIR all-in-one image restoration in JAX/Flax.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(f"lmdir_jax.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lmdir` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv, overrides = split_config_overrides(argv)
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help (0) or misuse (2, already reported on one line)
            return int(e.code or 0)
        args.config_overrides = overrides
        if overrides and not hasattr(args, "config"):
            raise UsageError(f"'lmdir {args.command}' takes no --config overrides")
        code = args.func(args)
    except UsageError as e:
        sys.stderr.write(f"lmdir: error: {e}\n")
        return 2
    except DataError as e:
        sys.stderr.write(f"lmdir: error: {e}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("lmdir: interrupted\n")
        return 130
    return int(code or 0)


class _WarningLines(logging.Formatter):
    """Formats `lmdir_jax` log records as `lmdir: warning: ...`, like the CLI's error lines."""

    def format(self, record: logging.LogRecord) -> str:
        return f"lmdir: {record.levelname.lower()}: {record.getMessage()}"


def log_to_stderr() -> None:
    """Send the package's warnings (skipped files, unmatched pairs) to stderr as `lmdir: warning:`
    lines, whatever format a library gave the root logger. Called by the console script only, so
    tests that call `main` keep pytest's log capture."""
    log = logging.getLogger("lmdir_jax")
    if not any(getattr(h, "lmdir", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_WarningLines())
        handler.lmdir = True
        log.addHandler(handler)
        log.propagate = False


def console() -> None:
    """The `lmdir` console script: `main` in a process with a faster malloc and XLA's persistent
    compilation cache (`runtime`)."""
    from lmdir_jax.runtime import enable_compile_cache, reexec_with_fast_malloc

    reexec_with_fast_malloc(["-m", "lmdir_jax.cli", *sys.argv[1:]])
    log_to_stderr()
    enable_compile_cache()
    sys.exit(main())


if __name__ == "__main__":
    console()
