"""`lmdir data preview` (a grid of training examples with their label text) and `lmdir data check`
(every training source and test set of a config, before anything compiles)."""

from __future__ import annotations

import textwrap
from pathlib import Path


def _caption(width: int, text: str, key: str):
    import cv2
    import numpy as np

    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.42
    chars = max(10, int(width / 7.6))
    lines = textwrap.wrap(text, chars)[:3] + [textwrap.shorten(key, chars, placeholder="...")]
    strip = np.full((16 * len(lines) + 6, width, 3), 255, np.uint8)
    for i, line in enumerate(lines):
        color = (0, 0, 0) if i < len(lines) - 1 else (110, 110, 110)
        cv2.putText(strip, line, (4, 15 + 16 * i), font, scale, color, 1, cv2.LINE_AA)
    return strip


def preview_grid(batch: dict, rows: int, cols: int, cell: int = 192):
    """uint8 RGB grid of rows x cols examples, each (degraded | clean) with its text below."""
    import cv2
    import numpy as np

    tiles = []
    n = rows * cols
    for i in range(n):
        pair = [
            cv2.resize((np.clip(batch[k][i], 0, 1) * 255).round().astype(np.uint8), (cell, cell),
                       interpolation=cv2.INTER_NEAREST)
            for k in ("lq", "gt")
        ]
        gap = np.full((cell, 4, 3), 255, np.uint8)
        top = np.concatenate([pair[0], gap, pair[1]], axis=1)
        cap = _caption(top.shape[1], str(batch["deg_text"][i]), str(batch["key"][i]))
        tiles.append(np.concatenate([top, cap], axis=0))
    h = max(t.shape[0] for t in tiles)
    tiles = [np.pad(t, ((0, h - t.shape[0]), (0, 0), (0, 0)), constant_values=255) for t in tiles]
    pad = 10
    grid_rows = []
    for r in range(rows):
        row = []
        for t in tiles[r * cols : (r + 1) * cols]:
            row += [t, np.full((h, pad, 3), 255, np.uint8)]
        line = np.concatenate(row[:-1], axis=1)
        grid_rows += [line, np.full((pad, line.shape[1], 3), 255, np.uint8)]
    return np.concatenate(grid_rows[:-1], axis=0)


def run_preview(args) -> int:
    """Draw rows x cols training examples from the configured pipeline and save the grid."""
    import numpy as np

    from lmdir_jax.config import load_config
    from lmdir_jax.data.io import check_image_name, write_image
    from lmdir_jax.data.pipeline import make_train_iterator
    from lmdir_jax.errors import UsageError
    from lmdir_jax.outputs import check_output_file

    if args.rows < 1 or args.cols < 1:
        raise UsageError("--rows and --cols must be at least 1")
    check_image_name(check_output_file(args.output))  # before the pipeline runs
    config = load_config(args.config, args.config_overrides)
    config.data.num_workers = 0
    it = make_train_iterator(config, process_index=0, process_count=1)
    need = args.rows * args.cols
    batches = []
    while sum(len(b["key"]) for b in batches) < need:
        batches.append(next(it))
    it.close()
    batch = {k: np.concatenate([b[k] for b in batches])[:need] for k in ("lq", "gt", "deg_text", "key")}
    grid = preview_grid(batch, args.rows, args.cols, cell=max(args.cell, config.data.patch_size))
    out = write_image(Path(args.output), grid.astype(np.float32) / 255.0)
    print(f"wrote {out} ({args.rows}x{args.cols} examples: degraded | clean, label text below)")
    return 0


def run_check(args) -> int:
    """Print the data table of a config; exit 1 with one line per problem."""
    import sys

    from lmdir_jax.config import load_config
    from lmdir_jax.data.check import check_config, format_check, problems
    from lmdir_jax.protocols import check_sets

    config = load_config(args.config, args.config_overrides)
    decode = "full" if args.full else "auto"
    reports = check_config(config, decode=decode)
    if str(config.data.get("protocol", "")):
        reports += check_sets(str(config.data.protocol), str(config.data.get("root", "")),
                              decode=decode)
    print(format_check(reports, int(config.data.patch_size)))
    lines = problems(reports)
    for line in lines:
        sys.stderr.write(f"lmdir: data problem: {line}\n")
    if lines:
        return 1
    print("data check: no problem")
    return 0


def register(sub) -> None:
    """Add `lmdir data` and its `preview` and `check` sub-commands."""
    p = sub.add_parser("data", help="inspect the training data pipeline")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", parser_class=type(p))
    dsub.required = True
    pv = dsub.add_parser("preview", help="save a grid of (degraded, clean) training pairs with their text")
    pv.add_argument("--config", required=True, help="config name or path (configs/*.py)")
    pv.add_argument("--output", "-o", required=True, help="image file to write (png/jpg)")
    pv.add_argument("--rows", type=int, default=4, help="rows of the grid")
    pv.add_argument("--cols", type=int, default=2, help="(degraded, clean) pairs per row")
    pv.add_argument("--cell", type=int, default=192, help="side in pixels of each shown patch")
    pv.set_defaults(func=run_preview)
    ck = dsub.add_parser(
        "check", help="walk every training source and test set of a config; exit 1 on a problem",
        description="One table row per folder: image count, pairs matched, unpaired and unreadable "
        "files, smallest image against the patch size. Problems (missing folder, no pairs, pair "
        "sizes that differ) are printed one per line and exit 1. `lmdir train` runs the same "
        "check on the training sources first.",
    )
    ck.add_argument("--config", required=True, help="config name or path (configs/*.py)")
    ck.add_argument("--full", action="store_true",
                    help="decode every file (default: every file of folders of up to 4000 images, "
                    "as training does; headers only in bigger ones)")
    ck.set_defaults(func=run_check)
