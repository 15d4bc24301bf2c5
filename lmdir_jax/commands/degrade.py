"""`lmdir degrade IN... --spec SPEC --output DIR`: synthesize degraded copies of images."""

from __future__ import annotations

import glob
import json
from pathlib import Path

from lmdir_jax.commands import seed_type


def collect_inputs(inputs: list[str]) -> list[tuple[Path, str]]:
    """(file, output-relative name) for files, folders (recursive) and glob patterns; UsageError
    when an input matches nothing or no image at all is found."""
    from lmdir_jax.data.io import is_image_file
    from lmdir_jax.data.sources import list_images
    from lmdir_jax.errors import UsageError

    out: list[tuple[Path, str]] = []
    for spec in inputs:
        p = Path(spec)
        if p.is_dir():
            files = [(f, f.relative_to(p).as_posix()) for f in list_images(p)]
        elif p.is_file():
            files = [(p, p.name)]
        elif glob.has_magic(spec):
            matches = sorted(Path(m) for m in glob.glob(spec, recursive=True))
            files = [(m, m.name) for m in matches if m.is_file() and is_image_file(m)]
        else:
            raise UsageError(f"input not found: {spec}")
        if not files:
            raise UsageError(f"no image files in {spec}")
        out += files
    seen: dict[str, Path] = {}
    for f, rel in out:
        stem = rel.rsplit(".", 1)[0]
        if stem in seen and seen[stem] != f:
            raise UsageError(f"two inputs would write the same output {stem}.png: {seen[stem]} and {f}")
        seen[stem] = f
    return out


JOURNAL = "labels.partial.jsonl"  # the records of the images written so far by an unfinished run


def _input_stamp(path: Path) -> list[int]:
    """(size, mtime_ns) of an input: a resumed run redoes an image whose input has changed."""
    from lmdir_jax.errors import permission_error

    try:
        st = path.stat()
    except PermissionError:
        raise permission_error(path) from None
    return [st.st_size, st.st_mtime_ns]


def run(args) -> int:
    """Degrade every input image with the spec at seed (seed, index); write PNGs + labels.jsonl.

    Each image is written atomically and then recorded in OUTPUT/labels.partial.jsonl; labels.jsonl
    is written (atomically) at the end and the journal removed. A rerun of a killed run with the same
    inputs, spec and seed skips the images the journal records, so it ends with the same files an
    uninterrupted run writes."""
    import numpy as np

    from lmdir_jax.data.io import load_image, write_image
    from lmdir_jax.degradations import apply_spec, format_spec, parse_spec
    from lmdir_jax.errors import UsageError, warn
    from lmdir_jax.outputs import (
        atomic_write_bytes,
        check_output_folder,
        drop_partial_line,
        read_journal,
        remove_stale_temporaries,
    )
    from lmdir_jax.progress import progress_bar

    items = parse_spec(args.spec)
    files = collect_inputs(args.inputs)
    out_dir = Path(args.output)
    protect = [f for f, _ in files]
    check_output_folder(out_dir, protect + [p for p in args.inputs if Path(p).exists()])
    targets = [out_dir / (rel.rsplit(".", 1)[0] + ".png") for _, rel in files]
    for t in targets:  # check everything before writing anything
        if any(t.resolve() == f.resolve() for f in protect):
            raise UsageError(f"refusing to overwrite the input image {t}")
    out_dir.mkdir(parents=True, exist_ok=True)
    canonical = format_spec(items)
    by_folder: dict[Path, set[str]] = {out_dir: {"labels.jsonl", JOURNAL}}
    for t in targets:
        by_folder.setdefault(t.parent, set()).add(t.name)
    for folder, names in by_folder.items():
        remove_stale_temporaries(folder, names)
    journal = out_dir / JOURNAL
    drop_partial_line(journal)
    done_before = {j["record"]["name"]: j for j in read_journal(journal) if "record" in j}
    (out_dir / "labels.jsonl").unlink(missing_ok=True)  # until this run's labels are complete
    records: list[dict] = []
    skipped = []
    with open(journal, "a", encoding="utf-8") as journal_f:
        for i, ((src, _), target) in enumerate(progress_bar(list(zip(files, targets, strict=True)),
                                                    desc="degrade", unit="img")):
            name = target.relative_to(out_dir).as_posix()
            prior = done_before.get(name)
            stamp = _input_stamp(src)
            if (prior is not None and target.is_file() and prior.get("stamp") == stamp
                    and prior["record"].get("input") == str(src)
                    and prior["record"].get("spec") == canonical
                    and prior["record"].get("seed") == [args.seed, i]):
                records.append(prior["record"])
                continue
            loaded = load_image(src)
            if loaded is None:
                skipped.append(str(src))
                continue
            degraded, label = apply_spec(loaded.rgb, items, np.random.default_rng([args.seed, i]))
            write_image(target, degraded, bit_depth=loaded.bit_depth, alpha=loaded.alpha,
                        protect=protect, grayscale=loaded.grayscale)
            record = {
                "name": name,
                "input": str(src),
                "spec": canonical,
                "seed": [args.seed, i],
                "text": label.text(),
                "label": label.to_dict(),
            }
            journal_f.write(json.dumps({"record": record, "stamp": stamp}) + "\n")
            journal_f.flush()
            records.append(record)
    atomic_write_bytes(out_dir / "labels.jsonl", "".join(json.dumps(r) + "\n" for r in records).encode())
    journal.unlink()
    done = len(records)
    if done:
        print(f"wrote {done} degraded image(s) and labels.jsonl to {out_dir}")
    if skipped:
        warn(f"skipped {len(skipped)} unreadable file(s): {', '.join(skipped)}")
    if done == 0:
        import sys

        sys.stderr.write(f"lmdir: error: no input image could be read; {out_dir} holds no image\n")
        return 1
    return 0


def register(sub) -> None:
    """Add `lmdir degrade`."""
    p = sub.add_parser(
        "degrade",
        help="write degraded copies of images (and their labels) for a degradation spec",
        description="Degrade images by a spec such as noise:25, rain+haze:1.0 or jpeg:30+noise:15. "
        "Writes OUTPUT/<name>.png and OUTPUT/labels.jsonl; never overwrites an input. "
        "A rerun of an interrupted run with the same arguments resumes it.",
    )
    p.add_argument("inputs", nargs="+", metavar="IN", help="image files, folders or glob patterns")
    p.add_argument("--spec", required=True, help="degradation spec, kind[:value] joined by '+'")
    p.add_argument("--output", "-o", required=True, help="output folder")
    p.add_argument("--seed", type=seed_type, default=0, help="image i uses the random seed (SEED, i)")
    p.set_defaults(func=run)
