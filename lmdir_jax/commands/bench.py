"""`lmdir bench ...`: speed and memory measurements (never timed tests; results go to docs/benchmarks.md).

Each benchmark lives in `lmdir_jax/bench/<name>.py` with `register(subparsers)`.
"""

from __future__ import annotations

import importlib

BENCH_MODULES = ("data", "model", "priors", "train", "compare_torch", "restore")


def register(sub) -> None:
    """Add `lmdir bench` and its benchmarks."""
    p = sub.add_parser("bench", help="measure speed and memory")
    bsub = p.add_subparsers(dest="bench", metavar="BENCH", parser_class=type(p))
    bsub.required = True
    for name in BENCH_MODULES:
        importlib.import_module(f"lmdir_jax.bench.{name}").register(bsub)
