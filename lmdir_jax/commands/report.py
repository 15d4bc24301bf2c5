"""`lmdir report`: a Markdown page summarising a training run (curve, sample, evaluation)."""

from __future__ import annotations


def register(sub) -> None:
    """Add `lmdir report`."""
    p = sub.add_parser("report", help="write a Markdown report of a training run")
    p.add_argument("--workdir", required=True, help="training workdir")
    p.add_argument("--output", required=True, help="report file (.md)")
    p.add_argument(
        "--compare",
        nargs="+",
        metavar="IMG",
        help="DEGRADED RESTORED [CLEAN]: a sample shown side by side with PSNR",
    )
    p.add_argument("--eval-text", metavar="FILE", help="the printed output of `lmdir evaluate`")
    p.set_defaults(func=run)


def run(args) -> int:
    from lmdir_jax.errors import UsageError
    from lmdir_jax.report import write_report

    compare = None
    if args.compare:
        if len(args.compare) not in (2, 3):
            raise UsageError("--compare takes DEGRADED RESTORED [CLEAN]")
        compare = (args.compare[0], args.compare[1], args.compare[2] if len(args.compare) == 3 else None)
    path = write_report(args.output, args.workdir, compare=compare, eval_text=args.eval_text)
    print(f"report: {path}")
    return 0
