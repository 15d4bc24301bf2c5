"""`lmdir bench data`: training-pipeline throughput (patches/s) and per-kind synthesis time."""

from __future__ import annotations

import time

from tqdm import tqdm

from lmdir_jax.config import load_config
from lmdir_jax.data.pipeline import make_train_iterator
from lmdir_jax.degradations.timing import time_kinds
from lmdir_jax.errors import UsageError


def run(args) -> int:
    """Time `--batches` batches of the configured pipeline after a warm-up; print patches/s."""
    if args.batches < 1:
        raise UsageError(f"--batches must be at least 1, got {args.batches}")
    if args.workers is not None and args.workers < 0:
        raise UsageError(f"--workers must be at least 0, got {args.workers}")
    config = load_config(args.config, args.config_overrides)
    if args.workers is not None:
        config.data.num_workers = args.workers
    workers = int(config.data.num_workers)
    t0 = time.perf_counter()
    it = make_train_iterator(config, process_index=0, process_count=1)
    try:
        for _ in range(args.warmup):
            next(it)
        t_ready = time.perf_counter() - t0
        n = 0
        t0 = time.perf_counter()
        for _ in tqdm(range(args.batches), desc="batches", unit="batch"):
            n += len(next(it)["key"])
        dt = time.perf_counter() - t0
    finally:
        it.close()  # joins the workers and releases their shared memory
    rate = n / dt
    d = config.data
    print(f"source {d.source}  patch {d.patch_size}  batch {d.batch_size}  workers {workers}")
    print(f"start-up + {args.warmup} warm-up batches: {t_ready:.2f} s")
    print(f"{n} patches in {dt:.2f} s: {rate:.1f} patches/s"
          f" ({rate / max(workers, 1):.1f} per {'worker' if workers else 'process (in-process)'})")
    if args.no_kinds:
        return 0
    ms = time_kinds(size=int(d.patch_size), n=args.kind_samples)
    print(f"synthesis ms per {d.patch_size}x{d.patch_size} patch: "
          + "  ".join(f"{k} {v:.2f}" for k, v in ms.items()))
    return 0


def register(bsub) -> None:
    """Add `lmdir bench data`."""
    p = bsub.add_parser("data", help="data pipeline throughput in patches/s")
    p.add_argument("--config", required=True, help="config name or path")
    p.add_argument("--batches", type=int, default=50, help="timed batches")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    p.add_argument("--workers", type=int, default=None, help="override data.num_workers")
    p.add_argument("--kind-samples", type=int, default=100, help="calls per kind for the ms table")
    p.add_argument("--no-kinds", action="store_true", help="skip the per-kind synthesis timing")
    p.set_defaults(func=run)
