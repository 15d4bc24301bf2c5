"""`lmdir model summary`: parameter counts per component and GFLOPs of the LMDIR network;
`lmdir model convert`: a training run's checkpoint in the scanned or unscanned block layout."""

from __future__ import annotations

from lmdir_jax.commands import seed_type


def register(sub) -> None:
    """Add `lmdir model` and its `summary` action."""
    p = sub.add_parser("model", help="inspect the LMDIR network")
    msub = p.add_subparsers(dest="model_action", metavar="ACTION", parser_class=type(p))
    msub.required = True
    s = msub.add_parser("summary", help="parameter counts per component and GFLOPs")
    s.add_argument("--config", required=True, help="config name (configs/NAME.py) or path")
    s.add_argument("--size", type=int, default=256, help="square input side for the FLOP count")
    s.add_argument("--seed", type=seed_type, default=0)
    s.set_defaults(func=summary)
    c = msub.add_parser("convert", help="a run's latest checkpoint in the other block layout "
                        "(model.scan_blocks), written as a new workdir")
    c.add_argument("--checkpoint", required=True, help="training workdir to read")
    c.add_argument("--output", required=True, help="new workdir to write (absent or empty)")
    c.add_argument("--scan-blocks", required=True, choices=("true", "false"),
                   help="layout of the output: true = stacked blocks (nnx.scan), false = one by one")
    c.set_defaults(func=convert)


def convert(args) -> int:
    """Write the converted workdir and say what was written."""
    from lmdir_jax.outputs import check_output_folder
    from lmdir_jax.train.relayout import convert_workdir

    check_output_folder(args.output)
    step = convert_workdir(args.checkpoint, args.output, args.scan_blocks == "true")
    print(f"wrote step {step} of {args.checkpoint} with model.scan_blocks={args.scan_blocks} "
          f"to {args.output}")
    return 0


def summary(args) -> int:
    """Build the model of the config and print its parameter counts and forward GFLOPs."""
    from lmdir_jax.config import load_config
    from lmdir_jax.errors import UsageError

    if args.size < 8:
        raise UsageError("--size must be at least 8")
    config = load_config(args.config, args.config_overrides)

    from lmdir_jax.models.lmdir import build_model
    from lmdir_jax.models.summary import count_params, example_priors, forward_flops

    try:
        model = build_model(config.model, args.seed)
    except ValueError as e:
        raise UsageError(f"bad model config: {e}") from None
    counts = count_params(model)
    print(f"LMDIR model of config '{config.name}' (width {config.model.width}, "
          f"blocks {tuple(config.model.blocks)}, dtype {config.model.dtype}, "
          f"prompt module {config.model.get('prompt_module', 'lmdir')})")
    for name, n in counts.items():
        print(f"  {name:<22s} {n:>12,d}")
    priors = example_priors(config.model, batch=1)
    flops = forward_flops(model, priors, args.size)
    print(f"  forward GFLOPs at 1x{args.size}x{args.size}: {flops / 1e9:.2f}")
    return 0
