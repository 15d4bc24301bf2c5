"""`lmdir evaluate`: PSNR/SSIM tables of a checkpoint on clean folders + specs and paired folders.

Each `--data PATH` starts an evaluation set; a `--spec SPEC` right after it degrades that clean
folder with SPEC (at `--seed`); without a spec the folder is a paired set used as is.
`--protocol three-task|five-task --root DIR` instead runs a published protocol's test sets (see
lmdir_jax/protocols.py) and prints them beside the published rows.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmdir_jax.commands import seed_type
from lmdir_jax.errors import UsageError, warn
from lmdir_jax.outputs import atomic_write_bytes, check_text_output


class _DataAction(argparse.Action):
    """`--data PATH`: start a new evaluation set."""

    def __call__(self, parser, namespace, values, option_string=None):
        sets = list(getattr(namespace, "sets", None) or [])
        sets.append({"path": values, "spec": None})
        namespace.sets = sets


class _SpecAction(argparse.Action):
    """`--spec SPEC`: the degradation of the most recent `--data` set."""

    def __call__(self, parser, namespace, values, option_string=None):
        sets = list(getattr(namespace, "sets", None) or [])
        if not sets:
            raise UsageError("--spec must follow the --data PATH it applies to")
        if sets[-1]["spec"] is not None:
            raise UsageError(f"--data {sets[-1]['path']} has two --spec: give --data again for each spec")
        sets[-1] = {**sets[-1], "spec": values}
        namespace.sets = sets


def register(sub) -> None:
    """Add `lmdir evaluate`."""
    p = sub.add_parser(
        "evaluate",
        help="PSNR/SSIM (RGB and Y) of a checkpoint on evaluation sets",
        description="Score a checkpoint: each --data PATH is a paired folder (degraded/ + clean/), "
        "or a clean folder degraded by the --spec that follows it (e.g. --data CBSD68 --spec noise:25).",
    )
    p.add_argument("--checkpoint", required=True, metavar="WORKDIR", help="training workdir")
    p.add_argument("--data", action=_DataAction, metavar="PATH", dest="sets_data",
                   help="evaluation folder, `skimage` or tfds:NAME:SPLIT (repeatable)")
    p.add_argument("--spec", action=_SpecAction, metavar="SPEC", dest="sets_spec",
                   help="degradation spec for the preceding --data (e.g. noise:25, rain, haze+jpeg:40)")
    p.add_argument("--seed", type=seed_type, default=0, help="seed of the synthetic degradations (default 0)")
    p.add_argument("--crop-multiple", type=int, default=0, metavar="N",
                   help="centre-crop images to a multiple of N first (16 = AirNet/PromptIR protocol)")
    p.add_argument("--max-images", type=int, default=None, metavar="N", help="at most N images per set")
    guide = p.add_mutually_exclusive_group()
    guide.add_argument("--degradation", metavar="TEXT", help="one degradation text for every image")
    guide.add_argument("--oracle", action="store_true",
                       help="use each image's true degradation label text (needs --spec)")
    guide.add_argument("--blind", action="store_true",
                       help="mask the degradation prior: blind restoration, no guidance")
    p.add_argument("--tile", type=int, default=0, metavar="N",
                   help="tile side for very large images (default 0 = whole image, as in the literature)")
    p.add_argument("--tile-overlap", type=int, default=32, metavar="N")
    p.add_argument("--clip", metavar="DIR", help="CLIP folder (overrides the checkpoint's priors.clip)")
    p.add_argument("--protocol", metavar="NAME",
                   help="run a published protocol instead of --data: three-task or five-task")
    p.add_argument("--root", metavar="DIR", help="data root holding the protocol's test sets")
    p.add_argument("--ssim", choices=("gaussian", "uniform"), default="gaussian",
                   help="SSIM window: gaussian = BasicSR 11x11 (default); uniform = scikit-image's "
                   "7x7 with sample covariance, as PromptIR's test script")
    p.add_argument("--format", choices=("text", "markdown"), default="text",
                   help="protocol table format on stdout (default text)")
    p.add_argument("--controller", metavar="WD",
                   help="trained DA-CLIP controller for the automatic mode (overrides priors.controller)")
    guide.add_argument("--iterative", action="store_true",
                       help="AutoDIR's loop: assess, restore the dominant degradation, repeat")
    p.add_argument("--max-steps", type=int, default=3, metavar="N", help="iterative: at most N steps (3)")
    p.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    p.add_argument("--csv", metavar="FILE", help="write per-image results as CSV")
    p.set_defaults(func=run)


def run_protocol(args) -> int:
    """`lmdir evaluate --protocol NAME --root DIR --checkpoint WD`: the protocol table."""
    import json
    import sys

    from lmdir_jax.evaluate import evaluate_protocol
    from lmdir_jax.inference import load_restorer
    from lmdir_jax.protocols import find_sets, format_protocol_table, protocol_sets

    if args.sets:
        raise UsageError("give either --protocol (with --root) or --data sets, not both")
    if args.csv:
        raise UsageError("--csv is for --data sets; with --protocol use --json")
    protocol_sets(args.protocol)  # unknown name -> UsageError
    if not args.root:
        raise UsageError("--protocol needs --root DIR (the folder holding the test sets)")
    if not Path(args.root).is_dir():
        raise UsageError(f"--root folder not found: {args.root}")
    found, missing = find_sets(args.protocol, args.root)
    if not found:
        sys.stderr.write(
            f"lmdir: error: no {args.protocol} test set under {args.root} "
            f"(expected e.g. {', '.join(ps.candidates[0] for ps in missing)}; see docs/datasets.md)\n"
        )
        return 1
    for ps in missing:
        warn(f"{ps.label} not found under {args.root}: skipped")
    restorer = load_restorer(args.checkpoint, args.clip, args.controller)
    if (args.degradation is not None or args.oracle) and restorer.clip is None:
        raise UsageError("--degradation/--oracle need CLIP: the checkpoint has no priors.clip; pass --clip DIR")
    table, report = evaluate_protocol(
        restorer, args.protocol, args.root, ssim_window=args.ssim, max_images=args.max_images,
        degradation=args.degradation, oracle=args.oracle, blind=args.blind,
        tile=args.tile or None, overlap=args.tile_overlap,
    )
    report.settings["checkpoint"] = str(args.checkpoint)
    print(format_protocol_table(table, markdown=args.format == "markdown"))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"table": table, **report.to_json()}
        atomic_write_bytes(path, json.dumps(payload, indent=2, allow_nan=True).encode())
        print(f"report: {path}")
    return 0


def run(args) -> int:
    """Handler of `lmdir evaluate`."""
    from lmdir_jax.data.sources import is_named_source
    from lmdir_jax.degradations.spec import parse_spec
    from lmdir_jax.evaluate import EvalSet, evaluate, format_table, write_csv, write_json
    from lmdir_jax.inference import load_restorer

    if args.max_images is not None and args.max_images < 1:
        raise UsageError("--max-images must be >= 1")
    if args.crop_multiple < 0 or args.tile < 0:
        raise UsageError("--crop-multiple and --tile must be >= 0")
    if args.degradation is not None and not args.degradation.strip():
        raise UsageError("--degradation needs a text (e.g. 'heavy rain'); use --blind for none")
    if args.json and args.csv and Path(args.json).resolve() == Path(args.csv).resolve():
        raise UsageError("--json and --csv name the same file")
    run_files = [*Path(args.checkpoint).glob("*"), *(Path(args.controller).glob("*") if args.controller else ())]
    for flag, path in (("--json", args.json), ("--csv", args.csv)):
        if path:  # checked before the evaluation, so a bad path loses no results (nor an input)
            check_text_output(path, run_files, flag=flag)
    args.sets = getattr(args, "sets", None) or []
    if args.protocol:
        return run_protocol(args)
    if args.root:
        raise UsageError("--root goes with --protocol")
    if not args.sets:
        raise UsageError("give --data PATH (repeatable) or --protocol NAME --root DIR")
    sets = [EvalSet(path=s["path"], spec=s["spec"]) for s in args.sets]
    for s in sets:
        if not (is_named_source(s.path) or Path(s.path).is_dir()):
            raise UsageError(f"evaluation folder not found: {s.path}")
        if s.spec is not None:
            parse_spec(s.spec)  # a bad spec is one line before the checkpoint loads
    if args.max_steps < 1:
        raise UsageError("--max-steps must be >= 1")
    restorer = load_restorer(args.checkpoint, args.clip, args.controller)
    if (args.degradation is not None or args.oracle or args.iterative) and restorer.clip is None:
        raise UsageError("--degradation/--oracle/--iterative need CLIP: the checkpoint has no priors.clip; "
                         "pass --clip DIR")
    report = evaluate(
        restorer, sets, seed=args.seed, crop_multiple=args.crop_multiple,
        max_images=args.max_images, degradation=args.degradation, oracle=args.oracle,
        blind=args.blind, iterative=args.max_steps if args.iterative else 0,
        tile=args.tile or None, overlap=args.tile_overlap, ssim_window=args.ssim,
    )
    report.settings["checkpoint"] = str(args.checkpoint)
    print(format_table(report))
    print(f"(SSIM window: {args.ssim})")
    if args.csv:
        print(f"per-image results: {write_csv(report, args.csv)}")
    if args.json:
        print(f"report: {write_json(report, args.json)}")
    return 0
