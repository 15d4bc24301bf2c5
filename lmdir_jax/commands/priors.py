"""`lmdir priors ...`: tiny random prior models, the prior cache, zero-shot degradation accuracy.

    lmdir priors make-tiny OUTDIR                      tiny random CLIP (OUTDIR/clip) and SD (OUTDIR/sd)
    lmdir priors build --data SRC --clip DIR [--sd DIR] [--captions F.jsonl] --output CACHE
    lmdir priors classify --clip DIR [--controller WD] --data DIR --spec SPEC [--spec SPEC ...]
    lmdir priors caption --clip DIR IMAGE...           zero-shot scene captions
    lmdir priors train-controller --clip DIR [--config CFG] --workdir WD   DA-CLIP controller
    lmdir priors verify PATH [--model NAME|CONFIG.json] --image PHOTO   ours vs the PyTorch reference
    lmdir priors embed PATH [--model ...] --text T [--text T2 ...] --output OUT.npz IMAGES...
    lmdir priors export-daclip --clip CLIP --controller WD --output OUT.pt   DA-CLIP's layout
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lmdir_jax.commands import seed_type
from lmdir_jax.errors import UsageError
from lmdir_jax.outputs import check_output_file, check_output_folder, check_text_output
from lmdir_jax.priors.config import CONTROLLER_GRID
from lmdir_jax.runtime import schedule_cpu_for_memory


def register(sub) -> None:
    """Add `lmdir priors` and its sub-commands."""
    p = sub.add_parser("priors", help="frozen CLIP / Stable Diffusion priors and the prior cache")
    psub = p.add_subparsers(dest="priors_command", metavar="ACTION", parser_class=type(p))
    psub.required = True

    t = psub.add_parser("make-tiny", help="write tiny random CLIP and SD folders (tests, demos)")
    t.add_argument("outdir", metavar="OUTDIR", help="writes OUTDIR/clip and OUTDIR/sd")
    t.add_argument("--seed", type=seed_type, default=0)
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
    b.add_argument("--seed", type=seed_type, default=0)
    b.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="weights and compute of CLIP and SD (bfloat16: half the memory)")
    b.add_argument("--controller", metavar="WD",
                   help="trained controller workdir or DA-CLIP checkpoint: zero-shot captions from the controlled "
                   "image tower")
    b.set_defaults(func=run_build)

    c = psub.add_parser(
        "classify",
        help="degradation accuracy and confusion matrix: zero-shot CLIP and a trained controller",
        description="Degrade a clean folder with each --spec (or take a paired folder's real degraded "
        "photos, one --spec naming their kind) and report how often the top-1 vocabulary entry names "
        "a kind of the spec ('clean' = undegraded), for the downscaled view and native crops, "
        "zero-shot and with --controller.",
    )
    c.add_argument("--clip", required=True, metavar="DIR")
    c.add_argument("--data", required=True, metavar="SRC", help="clean images (folder or skimage)")
    c.add_argument("--spec", required=True, action="append", metavar="SPEC",
                   help="degradation spec, e.g. noise:25 or rain+haze; repeatable; 'clean' allowed")
    c.add_argument("--max-images", type=int, default=None, metavar="N")
    c.add_argument("--seed", type=seed_type, default=0)
    c.add_argument("--controller", metavar="WD",
                   help="also classify with this trained controller (workdir or DA-CLIP checkpoint)")
    c.add_argument("--grid", type=int, default=CONTROLLER_GRID,
                   help=f"native crops per side (grid x grid, default {CONTROLLER_GRID})")
    c.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    c.set_defaults(func=run_classify)

    tc = psub.add_parser(
        "train-controller",
        help="train (or resume) a DA-CLIP degradation controller for a CLIP",
        description="A trainable copy of CLIP's image tower learns the degradation (vocabulary incl. "
        "'clean') of native-resolution crops; zero-initialised links steer the frozen tower. "
        "Rerun the same command to resume.",
    )
    tc.add_argument("--clip", required=True, metavar="DIR", help="local Hugging Face CLIP folder")
    tc.add_argument("--config", default="controller", metavar="CFG", help="config (default controller)")
    tc.add_argument("--workdir", required=True, metavar="WD", help="controller workdir (created/resumed)")
    tc.set_defaults(func=run_train_controller)

    model_help = ("OpenCLIP model name (ViT-B-32, ViT-L-14, daclip_ViT-B-32, ...) or model-config JSON "
                  "of a checkpoint file (default: the name in the file's name)")
    v = psub.add_parser(
        "verify",
        help="compare our CLIP / Stable Diffusion with the PyTorch reference on a photo",
        description="Load PATH (a Hugging Face CLIP folder, a diffusers Stable Diffusion folder, or an "
        "OpenCLIP / DA-CLIP checkpoint) into our model and the reference implementation (transformers, "
        "open_clip, diffusers: pip install 'lmdir-jax[verify]'), run both on --image and a prompt, and "
        "print max |ours - reference| per output. Exit 1 when one exceeds 1e-4 (float32).",
    )
    v.add_argument("path", metavar="PATH")
    v.add_argument("--model", metavar="NAME|CONFIG.json", help=model_help)
    v.add_argument("--image", metavar="PHOTO", help="the photo to compare on (required)")
    v.add_argument("--prompt", default=None, help="the text to compare on")
    v.add_argument("--tokenizer", metavar="DIR", help="CLIP tokenizer folder for an OpenCLIP checkpoint "
                   "(default: beside it, or open_clip's)")
    v.set_defaults(func=run_verify)

    e = psub.add_parser(
        "embed",
        help="write CLIP image and text embeddings (projected, unnormalised) to an .npz",
        description="Arrays 'image' (one row per image, file-name order) and 'text' (one row per --text), "
        "float32, with CLIP's own preprocessing; for a DA-CLIP checkpoint also 'degradation', and "
        "'image' from DA-CLIP's controlled image tower.",
    )
    e.add_argument("path", metavar="PATH", help="Hugging Face CLIP folder or OpenCLIP / DA-CLIP checkpoint")
    e.add_argument("images", nargs="+", metavar="IMAGES", help="image files or folders")
    e.add_argument("--model", metavar="NAME|CONFIG.json", help=model_help)
    e.add_argument("--text", action="append", default=[], metavar="T", help="a text to embed; repeatable")
    e.add_argument("--output", required=True, metavar="OUT.npz")
    e.add_argument("--tokenizer", metavar="DIR", help="CLIP tokenizer folder for an OpenCLIP checkpoint")
    e.set_defaults(func=run_embed)

    x = psub.add_parser(
        "export-daclip",
        help="write a trained controller with its CLIP in DA-CLIP's checkpoint layout",
        description="A state dict as DA-CLIP's code loads it ({'state_dict': clip.*, visual.*, "
        "visual_control.* with its zero modules, logit_scale}): a .pt file (needs torch) or .safetensors.",
    )
    x.add_argument("--clip", required=True, metavar="CLIP", help="the CLIP the controller was trained for")
    x.add_argument("--controller", required=True, metavar="WD", help="trained controller workdir")
    x.add_argument("--output", required=True, metavar="OUT.pt")
    x.set_defaults(func=run_export_daclip)

    k = psub.add_parser("caption", help="zero-shot scene captions of images")
    k.add_argument("images", nargs="+", metavar="IMAGE")
    k.add_argument("--clip", required=True, metavar="DIR")
    k.add_argument("--top-k", type=int, default=2)
    k.set_defaults(func=run_caption)


def run_verify(args) -> int:
    """Print max |ours - reference| per output; 1 when one exceeds the float32 tolerance."""
    from lmdir_jax.priors.verify import DEFAULT_PROMPT, TOLERANCE, verify

    diffs = verify(args.path, model=args.model, image=args.image, prompt=args.prompt or DEFAULT_PROMPT,
                   tokenizer=args.tokenizer)
    width = max(len(k) for k in diffs)
    bad = [k for k, d in diffs.items() if not d <= TOLERANCE]
    for k, d in diffs.items():
        print(f"{k:<{width}}  max |ours - reference| {d:.3g}{'  > 1e-4' if k in bad else ''}")
    print(f"{'FAIL' if bad else 'ok'}: {len(diffs) - len(bad)} of {len(diffs)} outputs within {TOLERANCE:g}")
    return 1 if bad else 0


def run_embed(args) -> int:
    """Write the embeddings .npz."""
    schedule_cpu_for_memory()  # before jax starts: frozen bf16 weights converted one at a time
    from lmdir_jax.priors.verify import embed, list_images, write_npz

    images = list_images(args.images)
    out = check_output_file(args.output, [args.path, *images])
    if out.suffix != ".npz":
        raise UsageError(f"--output must end in .npz, got {out}")
    arrays = embed(args.path, args.text, images, model=args.model, tokenizer=args.tokenizer)
    write_npz(arrays, out)
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in arrays.items())
    print(f"wrote {out}: {shapes}")
    return 0


def run_export_daclip(args) -> int:
    """Write a trained controller and its CLIP in DA-CLIP's layout."""
    from lmdir_jax.priors.clip import load_clip
    from lmdir_jax.priors.controller import save_daclip
    from lmdir_jax.train.controller import load_controller

    out = check_output_file(args.output, [args.clip, args.controller])
    if out.exists():
        raise UsageError(f"--output {out} exists: choose a new file name")
    clip = load_clip(args.clip)
    assessor = load_controller(args.controller, clip)
    save_daclip(assessor.controller, clip, out)
    print(f"wrote {out} (DA-CLIP layout)")
    return 0


def run_make_tiny(args) -> int:
    """Write OUTDIR/clip (tiny CLIP + tokenizer, transformers' layout) and OUTDIR/sd (tiny SD,
    diffusers layout)."""
    from lmdir_jax.priors.tiny import save_tiny_clip

    out = check_output_folder(args.outdir, flag="OUTDIR")
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
    schedule_cpu_for_memory()  # before jax starts: frozen bf16 weights converted one at a time
    from lmdir_jax.priors.cache import build_cache

    check_output_folder(args.output, [args.data] if Path(args.data).exists() else [])
    clip = None
    if args.controller:
        from lmdir_jax.priors.clip import load_clip
        from lmdir_jax.train.controller import load_controller

        if not Path(args.controller).exists():
            raise UsageError(f"controller folder not found: {args.controller}")
        clip = load_clip(args.clip, max_text_len=args.max_text_len, dtype=args.dtype)
        clip.attach_controller(load_controller(args.controller, clip))
    summary = build_cache(
        args.data,
        args.clip,
        args.output,
        clip=clip,
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
        dtype=args.dtype,
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


MIXTURE_THRESHOLD = 0.25  # a mixture's predicted kinds: vocabulary entries with probability >= this


def view_predictors(clip, assessor=None, grid: int = CONTROLLER_GRID) -> dict:
    """{view name: fn(image HxWx3) -> (K,) vocabulary probabilities} for classify.

    'downscaled': the centre square area-resized to CLIP's input (`inference.clip_view`);
    'crops': grid x grid crops at native resolution, probabilities averaged (`native_crops`).
    Zero-shot CLIP always; the controller's two views when `assessor` is given.
    """
    import numpy as np

    from lmdir_jax.inference import clip_view
    from lmdir_jax.priors.controller import native_crops

    size = clip.image_size
    views = {
        "zero-shot downscaled": lambda img: clip.auto_degradation(clip_view(img, size)[None])[0][0],
        "zero-shot crops": lambda img: np.asarray(clip.auto_degradation(native_crops(img, size, grid))[0]).mean(0),
    }
    if assessor is not None:
        views["controller downscaled"] = lambda img: assessor.crop_probabilities(clip_view(img, size)[None])[0]
        views["controller crops"] = assessor.probabilities
    return views


def _iter_images(source, spec: str, n_imgs: int, seed: int):
    from lmdir_jax.data.evaluation import iter_eval_pairs

    if getattr(source, "paired", False):
        return (source[i]["degraded"] for i in range(n_imgs))
    if spec == "clean":
        return (source[i]["clean"] for i in range(n_imgs))
    return (d for _, d, _, _ in iter_eval_pairs(source, spec, seed=seed, max_images=n_imgs))


def classify(clip, data, specs: list[str], *, max_images=None, seed=0, assessor=None,
             grid: int = CONTROLLER_GRID) -> dict:
    """Degradation classification of `data` degraded by each spec, in every view -> accuracy + confusion.

    A top-1 prediction is correct when it is one of the spec's kinds ('clean' = undegraded). For a
    paired folder (real degraded photos, e.g. Rain100L) the single spec names the true kind and the
    degraded images are classified as they are. Mixtures (specs of several kinds) also get precision
    and recall of the predicted kind set (probability >= MIXTURE_THRESHOLD, top-1 when none).
    The top-level confusion/accuracy are those of the main view: 'controller crops' with a
    controller, else 'zero-shot downscaled'.
    """
    import numpy as np

    from lmdir_jax.data.sources import load_source
    from lmdir_jax.progress import progress_bar

    names = [n for n, _ in clip.degradation_vocab]
    kinds = {s: _spec_kinds(s) for s in specs}  # UsageError for a bad spec, before any work
    for s, ks in kinds.items():
        bad = [k for k in ks if k not in names]
        if bad:
            raise UsageError(f"spec {s}: kind {bad[0]} is not in the CLIP degradation vocabulary")
    source = load_source(data)
    if getattr(source, "paired", False) and len(specs) != 1:
        raise UsageError(f"{data} is a paired folder: give exactly one --spec naming its degradation")
    views = view_predictors(clip, assessor, grid)
    conf = {v: np.zeros((len(specs), len(names)), np.int64) for v in views}
    pr = {v: {s: [0.0, 0.0, 0] for s in specs} for v in views}
    n_imgs = len(source) if max_images is None else min(len(source), int(max_images))
    bar = progress_bar(total=n_imgs * len(specs), desc="classify", unit="img", mininterval=2.0)
    for r, spec in enumerate(specs):
        truth = {names.index(k) for k in kinds[spec]}
        for img in _iter_images(source, spec, n_imgs, seed):
            for v, fn in views.items():
                p = np.asarray(fn(img))
                conf[v][r, int(p.argmax())] += 1
                pred = set(np.flatnonzero(p >= MIXTURE_THRESHOLD).tolist()) or {int(p.argmax())}
                acc = pr[v][spec]
                acc[0] += len(pred & truth) / len(pred)
                acc[1] += len(pred & truth) / len(truth)
                acc[2] += 1
            bar.update(1)
    bar.close()
    out_views = {}
    for v in views:
        c = conf[v]
        per_spec = {s: float(sum(c[r, names.index(k)] for k in kinds[s]) / max(1, c[r].sum()))
                    for r, s in enumerate(specs)}
        singles = [r for r, s in enumerate(specs) if len(kinds[s]) == 1 and s != "clean"]
        single_hits = sum(per_spec[specs[r]] * c[r].sum() for r in singles)
        single_n = sum(c[r].sum() for r in singles)
        total = int(c.sum())
        correct = sum(per_spec[s] * c[r].sum() for r, s in enumerate(specs))
        mixtures = {s: {"precision": round(a[0] / max(1, a[2]), 4), "recall": round(a[1] / max(1, a[2]), 4)}
                    for s, a in pr[v].items() if len(kinds[s]) > 1}
        out_views[v] = {
            "confusion": c.tolist(),
            "accuracy": {s: round(a, 4) for s, a in per_spec.items()},
            "overall_accuracy": round(float(correct / max(1, total)), 4),
            "single_accuracy": round(float(single_hits / single_n), 4) if single_n else None,
            "mixtures": mixtures,
        }
    main = "controller crops" if assessor is not None else "zero-shot downscaled"
    return {
        "classes": names,
        "specs": specs,
        "views": out_views,
        "main_view": main,
        **{k: out_views[main][k] for k in ("confusion", "accuracy", "overall_accuracy")},
        "images": int(conf[main].sum()),
    }


def format_confusion(result: dict, view: str | None = None) -> str:
    """A classification view as a plain-text table (rows: specs, columns: vocabulary)."""
    names, specs = result["classes"], result["specs"]
    r = result["views"][view] if view else result
    head = "spec \\ predicted"
    w0 = max(len(head), *(len(s) for s in specs))
    widths = [max(len(n), 5) for n in names]
    lines = [
        f"{head:<{w0}}  "
        + "  ".join(f"{n:>{w}}" for n, w in zip(names, widths, strict=True))
        + "  accuracy"
    ]
    for spec, row in zip(specs, r["confusion"], strict=True):
        cells = "  ".join(f"{v:>{w}}" for v, w in zip(row, widths, strict=True))
        lines.append(f"{spec:<{w0}}  {cells}  {r['accuracy'][spec]:8.1%}")
    lines.append(f"overall accuracy {r['overall_accuracy']:.1%} on {result['images']} images")
    for spec, m in r.get("mixtures", {}).items():
        lines.append(f"mixture {spec}: precision {m['precision']:.1%}, recall {m['recall']:.1%}")
    return "\n".join(lines)


def format_views(result: dict) -> str:
    """Top-1 accuracy per spec for every view side by side (the summary table)."""
    views = list(result["views"])
    w0 = max(4, *(len(s) for s in result["specs"]))
    widths = [max(len(v), 7) for v in views]
    lines = [f"{'spec':<{w0}}  " + "  ".join(f"{v:>{w}}" for v, w in zip(views, widths, strict=True))]
    for s in result["specs"]:
        lines.append(f"{s:<{w0}}  " + "  ".join(
            f"{result['views'][v]['accuracy'][s]:>{w}.1%}" for v, w in zip(views, widths, strict=True)))
    for key, label in (("single_accuracy", "single kinds"), ("overall_accuracy", "all")):
        vals = [result["views"][v][key] for v in views]
        if all(x is not None for x in vals):
            lines.append(f"{label:<{w0}}  " + "  ".join(f"{x:>{w}.1%}" for x, w in zip(vals, widths, strict=True)))
    return "\n".join(lines)


def run_classify(args) -> int:
    """Print the zero-shot degradation accuracy and confusion matrix (and JSON with --json)."""
    schedule_cpu_for_memory()  # before jax starts: frozen bf16 weights converted one at a time
    from lmdir_jax.priors.clip import load_clip

    if args.grid < 1:
        raise UsageError(f"--grid must be >= 1, got {args.grid}")
    if args.json:
        check_text_output(args.json, flag="--json")
    for spec in args.spec:
        _spec_kinds(spec)
    if args.controller and not Path(args.controller).exists():
        raise UsageError(f"controller folder not found: {args.controller}")
    clip = load_clip(args.clip)
    assessor = None
    if args.controller:
        from lmdir_jax.train.controller import load_controller

        assessor = load_controller(args.controller, clip, grid=args.grid)
    result = classify(clip, args.data, list(args.spec), max_images=args.max_images, seed=args.seed,
                      assessor=assessor, grid=args.grid)
    for view in result["views"]:
        print(f"== {view}")
        print(format_confusion(result, view))
    print("== top-1 accuracy by view")
    print(format_views(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


def run_train_controller(args) -> int:
    """Train a controller and print one summary line; NaN loss -> exit 1, SIGINT/SIGTERM -> 130
    (after a checkpoint: rerun to resume)."""
    from lmdir_jax.config import load_config
    from lmdir_jax.train.actions import TrainingDiverged
    from lmdir_jax.train.controller_train import train_controller

    if not Path(args.clip).is_dir():
        raise UsageError(f"CLIP folder not found: {args.clip}")
    config = load_config(args.config, getattr(args, "config_overrides", []))
    try:
        s = train_controller(config, args.clip, args.workdir)
    except TrainingDiverged as e:
        sys.stderr.write(f"lmdir: error: {e}\n")
        return 1
    print(f"controller: step={s['step']} loss={s['loss']:.4g} train_accuracy={s['accuracy']:.3f} "
          f"seconds={s['seconds']:.1f} cpu_seconds={s['cpu_seconds']:.1f} workdir={s['workdir']}")
    if s["interrupted"]:
        sys.stderr.write(f"lmdir: interrupted at step {s['step']}; checkpoint saved, "
                         "rerun the same command to resume\n")
        return 130
    return 0


def run_caption(args) -> int:
    """Print `file<TAB>caption` for each image."""
    schedule_cpu_for_memory()  # before jax starts: frozen bf16 weights converted one at a time
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
