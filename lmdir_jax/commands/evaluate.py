"""`lmdir evaluate`: PSNR/SSIM tables of a checkpoint on clean folders + specs and paired folders.

Each `--data PATH` starts an evaluation set; a `--spec SPEC` right after it degrades that clean
folder with SPEC (at `--seed`); without a spec the folder is a paired set used as is.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmdir_jax.errors import UsageError
from lmdir_jax.outputs import check_output_file


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
    p.add_argument("--data", action=_DataAction, required=True, metavar="PATH", dest="sets_data",
                   help="evaluation folder, `skimage` or tfds:NAME:SPLIT (repeatable)")
    p.add_argument("--spec", action=_SpecAction, metavar="SPEC", dest="sets_spec",
                   help="degradation spec for the preceding --data (e.g. noise:25, rain, haze+jpeg:40)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic degradations (default 0)")
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
    p.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    p.add_argument("--csv", metavar="FILE", help="write per-image results as CSV")
    p.set_defaults(func=run)


def run(args) -> int:
    """Handler of `lmdir evaluate`."""
    from lmdir_jax.data.sources import is_named_source
    from lmdir_jax.evaluate import EvalSet, evaluate, format_table, write_csv, write_json
    from lmdir_jax.inference import load_restorer

    if args.max_images is not None and args.max_images < 1:
        raise UsageError("--max-images must be >= 1")
    if args.crop_multiple < 0 or args.tile < 0:
        raise UsageError("--crop-multiple and --tile must be >= 0")
    if args.degradation is not None and not args.degradation.strip():
        raise UsageError("--degradation needs a text (e.g. 'heavy rain'); use --blind for none")
    sets = [EvalSet(path=s["path"], spec=s["spec"]) for s in args.sets]
    for s in sets:
        if not (is_named_source(s.path) or Path(s.path).is_dir()):
            raise UsageError(f"evaluation folder not found: {s.path}")
    if args.json and args.csv and Path(args.json).resolve() == Path(args.csv).resolve():
        raise UsageError("--json and --csv name the same file")
    for flag, path in (("--json", args.json), ("--csv", args.csv)):
        if path:  # checked before the evaluation, so a bad path loses no results
            check_output_file(path, flag=flag)
    restorer = load_restorer(args.checkpoint, args.clip)
    if (args.degradation is not None or args.oracle) and restorer.clip is None:
        raise UsageError("--degradation/--oracle need CLIP: the checkpoint has no priors.clip; pass --clip DIR")
    report = evaluate(
        restorer, sets, seed=args.seed, crop_multiple=args.crop_multiple,
        max_images=args.max_images, degradation=args.degradation, oracle=args.oracle,
        blind=args.blind,
        tile=args.tile or None, overlap=args.tile_overlap,
    )
    report.settings["checkpoint"] = str(args.checkpoint)
    print(format_table(report))
    if args.csv:
        print(f"per-image results: {write_csv(report, args.csv)}")
    if args.json:
        print(f"report: {write_json(report, args.json)}")
    return 0
