"""`lmdir report`: a Markdown page summarising a training run (curve, sample, evaluation)."""

from __future__ import annotations

from pathlib import Path

from lmdir_jax.workdir import plots_dir


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
    p.add_argument("--eval", action="append", default=[], metavar="NAME=FILE",
                   help="an `lmdir evaluate --json` report, in a PSNR column NAME (repeatable; "
                   "reports of one NAME share the column), e.g. blind=b.json automatic=a.json")
    p.set_defaults(func=run)


def run(args) -> int:
    from lmdir_jax.errors import UsageError
    from lmdir_jax.outputs import check_output_file, check_text_output
    from lmdir_jax.report import compare_evaluations, write_report

    compare = None
    if args.compare:
        if len(args.compare) not in (2, 3):
            raise UsageError("--compare takes DEGRADED RESTORED [CLEAN]")
        compare = (args.compare[0], args.compare[1], args.compare[2] if len(args.compare) == 3 else None)
    evaluations = []
    for item in args.eval:
        name, sep, file = item.partition("=")
        if not (sep and name and file):
            raise UsageError(f"--eval takes NAME=FILE (e.g. blind=eval-blind.json), got {item!r}")
        evaluations.append((name, file))
    workdir = Path(args.workdir)
    reads = [*(args.compare or ()), *(f for _, f in evaluations), *([args.eval_text] if args.eval_text else []),
             *workdir.glob("*"), *plots_dir(workdir).glob("*")]
    check_text_output(args.output, reads)  # before any work: never over an input
    if compare:  # the sample figure is written beside the report
        check_output_file(Path(args.output).parent / "sample.png", compare, flag="--compare's figure")
    if evaluations:
        print(compare_evaluations(evaluations))
    path = write_report(args.output, args.workdir, compare=compare, eval_text=args.eval_text,
                        evaluations=evaluations)
    print(f"report: {path}")
    return 0
