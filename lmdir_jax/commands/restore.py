"""`lmdir restore`: restore image files, folders or globs with a trained checkpoint.

Outputs are PNG files named after the inputs (folders keep their sub-folder layout), 16-bit when
the input was 16-bit, with the input's alpha channel passed through unchanged. An output can never
replace an input.
"""

from __future__ import annotations

import glob
import json
import sys
from pathlib import Path

from lmdir_jax.errors import UsageError, warn
from lmdir_jax.outputs import atomic_write_bytes, check_output_folder


def register(sub) -> None:
    """Add `lmdir restore`."""
    p = sub.add_parser(
        "restore",
        help="restore images with a trained checkpoint (tiled, automatic or text-guided)",
        description="Restore image files, folders or globs. By default the degradation prior is "
        "chosen automatically by CLIP from each image; --degradation TEXT guides it instead.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or glob patterns")
    p.add_argument("--checkpoint", required=True, metavar="WORKDIR", help="training workdir")
    p.add_argument("--output", required=True, metavar="DIR", help="folder for the restored images")
    p.add_argument(
        "--tile", type=int, default=512, metavar="N",
        help="tile side in pixels for large images (default 512; 0 = whole image at once)",
    )
    p.add_argument(
        "--tile-overlap", type=int, default=32, metavar="N", help="tile overlap in pixels (default 32)"
    )
    p.add_argument(
        "--tile-batch", type=int, default=1, metavar="N", help="tiles per forward pass (default 1)"
    )
    guide = p.add_mutually_exclusive_group()
    guide.add_argument(
        "--degradation", metavar="TEXT",
        help="describe the degradation yourself (e.g. 'heavy rain'); default: automatic (CLIP)",
    )
    guide.add_argument(
        "--blind", action="store_true",
        help="mask the degradation prior: the network restores without being told what is wrong",
    )
    p.add_argument("--caption", metavar="TEXT", help="scene caption (default: zero-shot CLIP caption)")
    ref = p.add_mutually_exclusive_group()
    ref.add_argument("--reference", metavar="IMG", help="a clean reference image of the scene")
    ref.add_argument(
        "--no-reference", action="store_true", help="use no reference image (the default)"
    )
    p.add_argument("--clip", metavar="DIR", help="CLIP folder (overrides the checkpoint's priors.clip)")
    p.add_argument("--controller", metavar="WD",
                   help="trained DA-CLIP controller for the automatic mode (overrides priors.controller)")
    guide.add_argument(
        "--iterative", action="store_true",
        help="AutoDIR's loop: assess, restore the dominant degradation, assess again; stop when "
        "'clean' wins or after --max-steps (never the same degradation twice); writes NAME.json chains",
    )
    p.add_argument("--max-steps", type=int, default=3, metavar="N", help="iterative: at most N steps (3)")
    p.add_argument("--clean", metavar="IMG|DIR",
                   help="iterative: clean reference image (or folder of same-named images) for PSNR changes")
    p.set_defaults(func=run)


def _is_image_name(path: Path) -> bool:
    from lmdir_jax.data.io import is_image_file

    return is_image_file(path)


def collect_inputs(inputs: list[str]) -> list[tuple[Path, Path, bool]]:
    """Expand files, folders and globs to (file, output-relative path, named explicitly) triples.

    Folders are searched recursively for image extensions and keep their layout; a glob or a file
    gives the bare file name. Raises `UsageError` when an input matches nothing.
    """
    items: list[tuple[Path, Path, bool]] = []
    for text in inputs:
        p = Path(text)
        if p.is_file():
            items.append((p, Path(p.name), True))
        elif p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and _is_image_name(f))
            if not files:
                raise UsageError(f"no images in folder: {text}")
            items.extend((f, f.relative_to(p), False) for f in files)
        elif glob.has_magic(text):
            files = sorted(Path(f) for f in glob.glob(text, recursive=True) if Path(f).is_file())
            files = [f for f in files if _is_image_name(f)]
            if not files:
                raise UsageError(f"no images match: {text}")
            items.extend((f, Path(f.name), False) for f in files)
        else:
            raise UsageError(f"no such file or folder: {text}")
    seen: set[Path] = set()
    unique = []
    for f, rel, explicit in items:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append((f, rel, explicit))
    return unique


def plan_outputs(items: list[tuple[Path, Path, bool]], output: Path) -> list[Path]:
    """The output file of each input (`OUTPUT/rel.png`), refusing to overwrite any input.

    Raises `UsageError` when an output path is an input file, or when two inputs would write the
    same output.
    """
    inputs = {f.resolve() for f, _, _ in items}
    outs: list[Path] = []
    taken: dict[Path, Path] = {}
    for f, rel, _ in items:
        out = output / rel.with_suffix(".png")
        key = out.resolve()
        if key in inputs:
            raise UsageError(
                f"output {out} would overwrite an input: choose another --output folder"
            )
        if key in taken:
            raise UsageError(f"{taken[key]} and {f} would both be written to {out}: restore them separately")
        taken[key] = f
        outs.append(out)
    return outs


def _read(path: Path):
    """The decoded `LoadedImage` (rgb, alpha, bit depth), or None when it is not a readable image."""
    from lmdir_jax.data.io import load_image

    return load_image(path)


def _clean_for(clean: str | None, f: Path, shape) -> object:
    """The clean reference of input `f` (a file, or the same-named file in a folder), or None."""
    if not clean:
        return None
    c = Path(clean)
    if c.is_dir():
        found = [p for p in c.iterdir() if p.stem == f.stem and _is_image_name(p)]
        if not found:
            return None
        c = found[0]
    got = _read(c)
    if got is None:
        raise UsageError(f"--clean is not a readable image: {c}")
    if got.rgb.shape != tuple(shape):
        raise UsageError(f"--clean {c} has size {got.rgb.shape[:2]}, the input {f} {tuple(shape[:2])}")
    return got.rgb


def run(args) -> int:
    """Handler of `lmdir restore`."""
    if args.tile < 0 or args.tile_overlap < 0 or args.tile_batch < 1:
        raise UsageError("--tile and --tile-overlap must be >= 0 and --tile-batch >= 1")
    tile = args.tile or None
    if tile is not None and tile <= 2 * args.tile_overlap:
        raise UsageError(f"--tile ({tile}) must be more than twice --tile-overlap ({args.tile_overlap})")
    if args.degradation is not None and not args.degradation.strip():
        raise UsageError("--degradation needs a text (e.g. 'heavy rain'); use --blind for none")
    items = collect_inputs(args.inputs)
    output = Path(args.output)
    protected = [f for f, _, _ in items] + list(args.inputs) + [args.checkpoint]
    if args.reference:
        protected.append(args.reference)
    check_output_folder(output, [p for p in protected if Path(p).exists()])
    outs = plan_outputs(items, output)
    for f, _, explicit in items:
        if explicit and not _is_image_name(f):
            raise UsageError(f"not an image: {f}")

    reference = None
    if args.reference:
        got = _read(Path(args.reference))
        if got is None:
            raise UsageError(f"--reference is not a readable image: {args.reference}")
        reference = got.composited()

    from lmdir_jax.data.io import write_image
    from lmdir_jax.inference import load_restorer
    from lmdir_jax.progress import progress_bar, write_line

    if args.max_steps < 1:
        raise UsageError(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.clean and not args.iterative:
        raise UsageError("--clean is used by --iterative only")
    if args.clean and not Path(args.clean).exists():
        raise UsageError(f"--clean not found: {args.clean}")
    restorer = load_restorer(args.checkpoint, args.clip, args.controller)
    if args.iterative and restorer.clip is None:
        raise UsageError("--iterative needs CLIP: the checkpoint has no priors.clip; pass --clip DIR")
    if args.degradation is not None and restorer.clip is None:
        raise UsageError("--degradation needs CLIP: the checkpoint has no priors.clip; pass --clip DIR")
    if args.caption is not None and restorer.clip is None:
        raise UsageError("--caption needs CLIP: the checkpoint has no priors.clip; pass --clip DIR")

    inputs = [f for f, _, _ in items]
    skipped: list[str] = []
    done = 0
    bar = progress_bar(list(zip(items, outs, strict=True)), desc="restore", unit="img", disable=len(items) < 2)
    for (f, _, explicit), out in bar:
        got = _read(f)
        if got is None:
            if explicit:
                raise UsageError(f"not an image: {f}")
            skipped.append(str(f))
            continue
        rgb = got.rgb
        if args.iterative:
            restored, chain = restorer.restore_iterative(
                rgb, max_steps=args.max_steps, clean=_clean_for(args.clean, f, rgb.shape),
                caption=args.caption, reference=reference,
                tile=tile, overlap=args.tile_overlap, batch_size=args.tile_batch,
            )
            write_image(out, restored, bit_depth=got.bit_depth, alpha=got.alpha, protect=inputs)
            sidecar = out.with_suffix(".json")
            record = {"input": str(f), "output": str(out), **chain}
            atomic_write_bytes(sidecar, (json.dumps(record, indent=2) + "\n").encode())
            kinds = " -> ".join(st["degradation"] for st in chain["steps"]) or "nothing"
            write_line(f"{f}: restored {kinds} (stop: {chain['stop']}) -> {out}")
            done += 1
            continue
        priors, choice = restorer.priors_for(
            rgb, degradation=args.degradation, caption=args.caption, reference=reference,
            auto=not args.blind,
        )
        restored = restorer.restore(
            rgb, priors, tile=tile, overlap=args.tile_overlap, batch_size=args.tile_batch,
            progress=len(items) < 2,
        )
        write_image(out, restored, bit_depth=got.bit_depth, alpha=got.alpha, protect=inputs,
                    grayscale=got.grayscale)
        write_line(f"{f}: {choice.describe()} -> {out}")
        done += 1
    if skipped:
        warn(f"skipped {len(skipped)} unreadable file(s): {', '.join(skipped)}")
    if done == 0:
        sys.stderr.write(f"lmdir: error: no image could be restored (every input was unreadable); "
                         f"nothing written to {output}\n")
        return 1
    print(f"restored {done} image(s) into {output}")
    return 0
