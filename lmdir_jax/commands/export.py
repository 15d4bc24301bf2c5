"""`lmdir export torch|onnx`: a trained checkpoint as a PyTorch model (safetensors + config) or an
ONNX file (dynamic batch, height, width), self-checked.

After writing the export, the JAX network and the PyTorch mirror (or ONNX Runtime) run on the same
random input with priors, and the largest absolute difference is printed (exit 1 when it exceeds
--tolerance). The output may not be, contain or lie inside the checkpoint workdir.
"""

from __future__ import annotations

from pathlib import Path

from lmdir_jax.errors import UsageError
from lmdir_jax.outputs import check_output_file, check_output_folder


def register(sub) -> None:
    """Add `lmdir export` and its `torch` target."""
    p = sub.add_parser("export", help="export a trained model to another framework")
    esub = p.add_subparsers(dest="target", metavar="TARGET", parser_class=type(p))
    esub.required = True
    t = esub.add_parser(
        "torch",
        help="PyTorch nn.Module weights (model.safetensors + config.json)",
        description="Write the trained network as a PyTorch state dict for "
        "lmdir_jax.export.torch_model.LMDIRTorch, then check both frameworks agree.",
    )
    t.add_argument("--checkpoint", required=True, metavar="WORKDIR", help="training workdir")
    t.add_argument("--output", required=True, metavar="DIR", help="export folder")
    t.add_argument("--force", action="store_true", help="replace a previous export in the folder (never other files)")
    t.add_argument("--no-ema", action="store_true",
                   help="export the raw parameters instead of the EMA parameters")
    t.add_argument("--no-check", action="store_true",
                   help="skip the JAX-vs-PyTorch self-check (then torch is not needed)")
    t.add_argument("--tolerance", type=float, default=1e-4, metavar="T",
                   help="largest accepted max |JAX - PyTorch| in the self-check (default 1e-4)")
    t.set_defaults(func=run_torch)

    o = esub.add_parser(
        "onnx",
        help="an ONNX file with dynamic batch, height and width",
        description="Write the trained network as ONNX (torch.onnx dynamo exporter) with named "
        "inputs, then check ONNX Runtime against JAX.",
    )
    o.add_argument("--checkpoint", required=True, metavar="WORKDIR", help="training workdir")
    o.add_argument("--output", required=True, metavar="FILE.onnx", help="the ONNX file to write")
    o.add_argument("--priors", choices=("none", "text", "all"), default="all",
                   help="inputs of the graph: lq only; + CLIP text states and masks; + reference "
                   "(default all)")
    o.add_argument("--force", action="store_true", help="replace an existing .onnx file")
    o.add_argument("--no-ema", action="store_true",
                   help="export the raw parameters instead of the EMA parameters")
    o.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime self-check")
    o.add_argument("--tolerance", type=float, default=1e-4, metavar="T",
                   help="largest accepted max |JAX - ONNX Runtime| (default 1e-4)")
    o.set_defaults(func=run_onnx)


def run_torch(args) -> int:
    """Handler of `lmdir export torch`."""
    workdir, output = Path(args.checkpoint), Path(args.output)
    if not workdir.is_dir():
        raise UsageError(f"checkpoint folder not found: {workdir}")
    from lmdir_jax.export.convert import check_export_folder, refuse_overlap

    refuse_overlap(workdir, output)
    check_output_folder(output)
    check_export_folder(output, args.force)
    if not args.no_check:
        try:
            import torch  # noqa: F401
        except ImportError:
            raise UsageError("the self-check needs torch: pip install 'lmdir-jax[export]' "
                             "(or pass --no-check)") from None

    from lmdir_jax.export.convert import export_torch, self_check
    from lmdir_jax.train.checkpoints import load_for_inference

    use_ema = not args.no_ema
    model, config = load_for_inference(workdir, use_ema=use_ema)
    source = f"training workdir {workdir.resolve()}" + (" (EMA parameters)" if use_ema else "")
    export_torch(model, output, config=config, force=args.force, source=source)
    print(f"exported {config.get('name', 'model')} to {output}/ (model.safetensors, config.json, "
          "README.md)")
    if args.no_check:
        return 0
    diff = self_check(model, config, output)
    ok = diff <= args.tolerance
    print(f"self-check: max |jax - torch| = {diff:.3g} on a random 2x37x45 input with priors "
          f"({'ok' if ok else 'MISMATCH'}, tolerance {args.tolerance:g})")
    return 0 if ok else 1


def run_onnx(args) -> int:
    """Handler of `lmdir export onnx`."""
    workdir, output = Path(args.checkpoint), Path(args.output)
    if not workdir.is_dir():
        raise UsageError(f"checkpoint folder not found: {workdir}")
    from lmdir_jax.export.convert import refuse_overlap

    refuse_overlap(workdir, output)
    if output.is_dir():
        raise UsageError(f"output {output} is a folder; give the path of the .onnx file")
    check_output_file(output)
    if output.exists() and not args.force:
        raise UsageError(f"output {output} exists (use --force to overwrite)")
    if output.exists() and output.suffix.lower() != ".onnx":
        raise UsageError(f"output {output} exists and is not an .onnx file: --force only replaces one")
    needed = ["torch", "onnx", "onnxscript"] + ([] if args.no_check else ["onnxruntime"])
    import importlib.util

    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"export onnx needs {', '.join(missing)}: pip install 'lmdir-jax[export]'")

    from lmdir_jax.export import graph
    from lmdir_jax.export.convert import onnx_self_check, torch_mirror
    from lmdir_jax.train.checkpoints import load_for_inference

    model, config = load_for_inference(workdir, use_ema=not args.no_ema)
    output.parent.mkdir(parents=True, exist_ok=True)
    mirror = torch_mirror(model, config.model)
    graph.export_onnx(mirror, output, args.priors, int(config.priors.ref_size))
    names = ", ".join(graph.input_names(mirror, args.priors))
    print(f"exported {config.get('name', 'model')} to {output} (inputs: {names}; output: restored; "
          "dynamic batch, height, width)")
    if args.no_check:
        return 0
    diff = onnx_self_check(model, config, output, args.priors)
    ok = diff <= args.tolerance
    print(f"self-check: max |jax - onnxruntime| = {diff:.3g} on a random 2x37x45 input "
          f"({'ok' if ok else 'MISMATCH'}, tolerance {args.tolerance:g})")
    return 0 if ok else 1
