"""`lmdir priors ...`: tiny random prior models, the prior cache, zero-shot degradation accuracy.

    lmdir priors make-tiny OUTDIR                      tiny random CLIP (OUTDIR/clip) and SD (OUTDIR/sd)
    lmdir priors build --data SRC --clip DIR [--sd DIR] [--captions F.jsonl] --output CACHE
    lmdir priors classify --clip DIR --data DIR --spec SPEC [--spec SPEC ...] [--max-images N]
    lmdir priors caption --clip DIR IMAGE...           zero-shot scene captions
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lmdir_jax.errors import UsageError


def register(sub) -> None:
    """Add `lmdir priors` and its sub-commands."""
    p = sub.add_parser("priors", help="frozen CLIP / Stable Diffusion priors and the prior cache")
    psub = p.add_subparsers(dest="priors_command", metavar="ACTION", parser_class=type(p))
    psub.required = True

    t = psub.add_parser("make-tiny", help="write tiny random CLIP and SD folders (tests, demos)")
    t.add_argument("outdir", metavar="OUTDIR", help="writes OUTDIR/clip and OUTDIR/sd")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--text-dim", type=int, default=32, help="CLIP text width (default 32)")
    t.add_argument("--no-sd", action="store_true", help="write the tiny CLIP only")
    t.set_defaults(func=run_make_tiny)

    b = psub.add_parser(
        "build",
        help="build (or resume) the prior cache of a training set",
        description="Per clean image: caption (captions file or zero-shot CLIP), CLIP text states, "
        "and with --sd a Stable Diffusion reference image. Interrupted builds resume.",
    )
    b.add_argument("--data", required=True, metavar="SRC", help="folder, paired folder, skimage, tfds:N:S")
    b.add_argument("--clip", required=True, metavar="DIR", help="local Hugging Face CLIP folder")
    b.add_argument("--sd", metavar="DIR", help="local diffusers Stable Diffusion folder (references)")
    b.add_argument("--captions", metavar="FILE", help='JSONL lines {"key" or "file": ..., "caption": ...}')
    b.add_argument("--output", required=True, metavar="CACHE", help="cache folder (created/resumed)")
    b.add_argument("--steps", type=int, default=25, help="DDIM steps for references (default 25)")
    b.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance (7.5)")
    b.add_argument("--sd-size", type=int, default=0, help="SD image side (default: the model's own)")
    b.add_argument("--ref-size", type=int, default=64, help="stored reference side (default 64)")
    b.add_argument("--max-text-len", type=int, default=32, help="CLIP tokens per caption (32)")
    b.add_argument("--top-k", type=int, default=2, help="scene phrases per zero-shot caption (2)")
    b.add_argument("--batch", type=int, default=8, help="images per batch (default 8)")
    b.add_argument("--max-items", type=int, default=None, help="only the first N images")
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(func=run_build)

    c = psub.add_parser(
        "classify",
        help="zero-shot CLIP degradation accuracy and confusion matrix",
        description="Degrade a clean folder with each --spec and report how often CLIP's zero-shot "
        "choice over the degradation vocabulary names a kind of the spec ('clean' = undegraded).",
    )
    c.add_argument("--clip", required=True, metavar="DIR")
    c.add_argument("--data", required=True, metavar="SRC", help="clean images (folder or skimage)")
    c.add_argument("--spec", required=True, action="append", metavar="SPEC",
                   help="degradation spec, e.g. noise:25 or rain+haze; repeatable; 'clean' allowed")
    c.add_argument("--max-images", type=int, default=None, metavar="N")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--batch", type=int, default=8)
    c.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    c.set_defaults(func=run_classify)

    k = psub.add_parser("caption", help="zero-shot scene captions of images")
    k.add_argument("images", nargs="+", metavar="IMAGE")
    k.add_argument("--clip", required=True, metavar="DIR")
    k.add_argument("--top-k", type=int, default=2)
    k.set_defaults(func=run_caption)


def run_make_tiny(args) -> int:
    """Write OUTDIR/clip (tiny FlaxCLIPModel + tokenizer) and OUTDIR/sd (tiny SD, diffusers layout)."""
    from lmdir_jax.priors.tiny import save_tiny_clip

    out = Path(args.outdir)
    if args.text_dim < 2 or args.text_dim % 2:
        raise UsageError(f"--text-dim must be an even number >= 2, got {args.text_dim}")
    for name in ("clip",) + (() if args.no_sd else ("sd",)):
        if (out / name).exists() and any((out / name).iterdir()):
            raise UsageError(f"{out / name} exists and is not empty")
    save_tiny_clip(out / "clip", text_dim=args.text_dim, seed=args.seed)
    print(f"wrote tiny CLIP to {out / 'clip'} (text width {args.text_dim})")
    if not args.no_sd:
        from lmdir_jax.priors.diffusion import save_tiny_sd

        save_tiny_sd(out / "sd", seed=args.seed)
        print(f"wrote tiny Stable Diffusion to {out / 'sd'}")
    return 0


def run_build(args) -> int:
    """Build or resume a prior cache and print its summary."""
    from lmdir_jax.priors.cache import build_cache

    summary = build_cache(
        args.data,
        args.clip,
        args.output,
        sd_path=args.sd,
        captions_file=args.captions,
        ref_size=args.ref_size,
        seed=args.seed,
        batch_size=args.batch,
        steps=args.steps,
        guidance=args.guidance,
        sd_size=args.sd_size or None,
        max_text_len=args.max_text_len,
        top_k=args.top_k,
        max_items=args.max_items,
    )
    print(
        f"prior cache {args.output}: {summary['items']} items "
        f"({summary['resumed_items']} already there), captions {summary['captions_given']} given / "
        f"{summary['captions_zero_shot']} zero-shot, {summary['references']} references, "
        f"{summary['seconds']:.1f} s"
    )
    return 0


def _spec_kinds(spec: str) -> tuple[str, ...]:
    from lmdir_jax.degradations import parse_spec

    return ("clean",) if spec == "clean" else tuple(item.kind for item in parse_spec(spec))


def classify(clip, data, specs: list[str], *, max_images=None, seed=0, batch=8) -> dict:
    """Zero-shot degradation classification of `data` degraded by each spec -> accuracy + confusion.

    A prediction is correct when the vocabulary entry CLIP prefers is one of the spec's kinds.
    """
    import numpy as np
    from tqdm import tqdm

    from lmdir_jax.data.evaluation import iter_eval_pairs
    from lmdir_jax.data.sources import load_source
    from lmdir_jax.priors.cache import clip_input

    names = [n for n, _ in clip.degradation_vocab]
    kinds = {s: _spec_kinds(s) for s in specs}  # UsageError for a bad spec, before any work
    for s, ks in kinds.items():
        bad = [k for k in ks if k not in names]
        if bad:
            raise UsageError(f"spec {s}: kind {bad[0]} is not in the CLIP degradation vocabulary")
    source = load_source(data)
    if getattr(source, "paired", False):
        raise UsageError(f"{data} is a paired folder: classify needs clean images to degrade")
    confusion = np.zeros((len(specs), len(names)), np.int64)
    n_imgs = len(source) if max_images is None else min(len(source), int(max_images))
    bar = tqdm(total=n_imgs * len(specs), desc="classify", unit="img")
    for r, spec in enumerate(specs):
        if spec == "clean":
            pairs = ((source[i]["clean"],) for i in range(n_imgs))
        else:
            pairs = ((d,) for _, d, _, _ in iter_eval_pairs(source, spec, seed=seed, max_images=n_imgs))
        chunk: list = []
        for (img,) in pairs:
            chunk.append(clip_input(img, clip.image_size))
            if len(chunk) == batch:
                for p in clip.auto_degradation(np.stack(chunk))[0].argmax(-1):
                    confusion[r, p] += 1
                bar.update(len(chunk))
                chunk = []
        if chunk:
            for p in clip.auto_degradation(np.stack(chunk))[0].argmax(-1):
                confusion[r, p] += 1
            bar.update(len(chunk))
    bar.close()
    per_spec = {}
    for r, spec in enumerate(specs):
        hit = sum(confusion[r, names.index(k)] for k in kinds[spec])
        per_spec[spec] = float(hit / max(1, confusion[r].sum()))
    total = int(confusion.sum())
    correct = sum(per_spec[s] * confusion[r].sum() for r, s in enumerate(specs))
    return {
        "classes": names,
        "specs": specs,
        "confusion": confusion.tolist(),
        "accuracy": {s: round(a, 4) for s, a in per_spec.items()},
        "overall_accuracy": round(float(correct / max(1, total)), 4),
        "images": total,
    }


def format_confusion(result: dict) -> str:
    """The classification result as a plain-text table (rows: specs, columns: vocabulary)."""
    names, specs = result["classes"], result["specs"]
    head = "spec \\ predicted"
    w0 = max(len(head), *(len(s) for s in specs))
    widths = [max(len(n), 5) for n in names]
    lines = [
        f"{head:<{w0}}  "
        + "  ".join(f"{n:>{w}}" for n, w in zip(names, widths, strict=True))
        + "  accuracy"
    ]
    for spec, row in zip(specs, result["confusion"], strict=True):
        cells = "  ".join(f"{v:>{w}}" for v, w in zip(row, widths, strict=True))
        lines.append(f"{spec:<{w0}}  {cells}  {result['accuracy'][spec]:8.1%}")
    lines.append(f"overall accuracy {result['overall_accuracy']:.1%} on {result['images']} images")
    return "\n".join(lines)


def run_classify(args) -> int:
    """Print the zero-shot degradation accuracy and confusion matrix (and JSON with --json)."""
    from lmdir_jax.priors.clip import load_clip

    if args.batch < 1:
        raise UsageError(f"--batch must be >= 1, got {args.batch}")
    for spec in args.spec:
        _spec_kinds(spec)
    clip = load_clip(args.clip)
    result = classify(
        clip, args.data, list(args.spec), max_images=args.max_images, seed=args.seed, batch=args.batch
    )
    print(format_confusion(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


def run_caption(args) -> int:
    """Print `file<TAB>caption` for each image."""
    import numpy as np

    from lmdir_jax.data.io import read_image
    from lmdir_jax.priors.cache import clip_input
    from lmdir_jax.priors.clip import load_clip

    clip = load_clip(args.clip)
    for name in args.images:
        img = read_image(name)
        if img is None:
            raise UsageError(f"not a readable image: {name}")
        cap = clip.caption(np.stack([clip_input(img, clip.image_size)]), top_k=args.top_k)[0]
        sys.stdout.write(f"{name}\t{cap}\n")
    return 0
