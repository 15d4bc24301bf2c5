"""`lmdir import restormer CKPT.pth --config CFG --output WD`: a released Restormer checkpoint as a
training workdir (backbone = Restormer, priors' influence zero), for evaluate / restore / train."""

from __future__ import annotations

from pathlib import Path

from lmdir_jax.errors import UsageError
from lmdir_jax.outputs import check_output_folder


def register(sub) -> None:
    """Add `lmdir import` and its `restormer` source."""
    p = sub.add_parser("import", help="import weights from another project")
    isub = p.add_subparsers(dest="source", metavar="SOURCE", parser_class=type(p))
    isub.required = True
    r = isub.add_parser(
        "restormer",
        help="a Restormer .pth (swz30/Restormer) as an LMDIR workdir",
        description="Read a Restormer checkpoint with torch.load(weights_only=True) and write a "
        "workdir whose backbone holds its weights and whose DATB/CATB/RTB start at zero.",
    )
    r.add_argument("checkpoint", metavar="CKPT.pth", help="Restormer checkpoint (key 'params')")
    r.add_argument("--config", default="restormer",
                   help="config name or path with model.layout=restormer (default restormer)")
    r.add_argument("--output", required=True, metavar="WORKDIR", help="new workdir (empty)")
    r.set_defaults(func=run_restormer)


def run_restormer(args) -> int:
    """Handler of `lmdir import restormer`."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise UsageError("reading a .pth needs torch: pip install 'lmdir-jax[export]'") from None
    from lmdir_jax.config import load_config
    from lmdir_jax.export.restormer import import_restormer

    check_output_folder(args.output)
    config = load_config(args.config, args.config_overrides)
    out = import_restormer(Path(args.checkpoint), config, Path(args.output))
    print(f"imported {args.checkpoint} into {out}/ (config {config.get('name', '')}, step 0; "
          "DATB/CATB/RTB at zero)")
    return 0
