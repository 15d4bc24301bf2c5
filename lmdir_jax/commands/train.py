"""`lmdir train --config CFG --workdir DIR [--config.key=value ...]`: train (or resume) a model."""

from __future__ import annotations

import sys


def register(sub) -> None:
    """Add `lmdir train`."""
    p = sub.add_parser(
        "train",
        help="train LMDIR (rerun the same command to resume)",
        description="Train LMDIR on the config's data; checkpoints, logs and plots go to WORKDIR. "
        "Running the same command again resumes from the newest usable checkpoint; it never starts "
        "again at step 0 in a workdir that holds checkpoints unless --restart is given. "
        "Started on several hosts (JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID, "
        "Slurm, Open MPI, a TPU pod), it trains as one multi-process job.",
    )
    p.add_argument("--config", required=True, help="config file or name in configs/ (tiny, quickstart, ...)")
    p.add_argument("--workdir", required=True, help="run folder (checkpoints, metrics, plots)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or progress lines")
    p.add_argument("--restart", action="store_true",
                   help="start at step 0 even though WORKDIR holds checkpoints (they are moved to "
                   "WORKDIR/previous_run/, never deleted)")
    p.set_defaults(func=run)


def data_problems(config) -> list[str]:
    """`lmdir data check` on the training sources: print each problem line (stderr) and return them.

    `lmdir train` then exits 2, as it always did for a missing or empty data source.
    """
    from lmdir_jax.data.check import check_config, problems

    lines = problems(check_config(config, decode="header"))  # the loader decodes next
    for line in lines:
        sys.stderr.write(f"lmdir: error: {line}\n")
    if lines:
        sys.stderr.write("lmdir: training not started (see `lmdir data check --config ...`)\n")
    return lines


def run(args) -> int:
    """Check the data, train, print a one-line summary; data problem -> exit 2 (one line each),
    NaN loss or an unusable checkpoint -> exit 1, SIGINT/SIGTERM -> 130."""
    from lmdir_jax.config import load_config
    from lmdir_jax.train.loop import TrainingDiverged, check_workdir, print_summary, train

    check_workdir(args.workdir)
    config = load_config(args.config, args.config_overrides)
    if data_problems(config):
        return 2
    try:
        summary = train(config, args.workdir, progress=not args.no_progress, restart=args.restart)
    except TrainingDiverged as e:
        sys.stderr.write(f"lmdir: error: {e}\n")
        return 1
    print_summary(summary)
    if summary.get("interrupted"):
        sys.stderr.write(
            f"lmdir: interrupted at step {summary['step']}; checkpoint saved, "
            "rerun the same command to resume\n"
        )
        return 130
    return 0
