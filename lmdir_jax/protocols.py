"""All-in-one evaluation protocols: their test sets under a data root and the published rows.

`three-task` (AirNet / PromptIR): CBSD68 with Gaussian noise sigma 15, 25 and 50 (fixed seed),
Rain100L, SOTS outdoor. `five-task` (IDR / InstructIR): SOTS outdoor, Rain100L, CBSD68 sigma 25,
GoPro (motion blur) and LOL (low light). Images are centre-cropped to a multiple of 16 and scored
with PSNR/SSIM on RGB. Each test set is looked for at several relative paths (PromptIR's `test/`
layout first, with AdaIR's `test/deblur/gopro` and `test/enhance/lol`, then the layout of
../shared/data and common dataset folder names); see
docs/datasets.md. JAX-free.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from lmdir_jax.data.check import FolderReport, check_folder
from lmdir_jax.data.sources import is_paired_folder, list_images
from lmdir_jax.errors import UsageError

CROP_MULTIPLE = 16
NOISE_SEED = 0

_CBSD68 = ("test/denoise/bsd68", "test/denoise/cbsd68", "test/denoise/CBSD68", "test/CBSD68",
           "CBSD68", "BSD68")
_RAIN = ("test/derain/Rain100L", "test/Rain100L", "Rain100L")
_SOTS = ("test/dehaze", "test/SOTS-outdoor", "test/SOTS/outdoor", "test/SOTS-outdoor-sample",
         "SOTS/outdoor", "SOTS")
_GOPRO = ("test/deblur/gopro", "test/deblur/GoPro", "test/deblur", "test/GoPro", "GoPro/test", "GoPro")
_LOL = ("test/enhance/lol", "test/enhance/LOL", "test/enhance", "test/lowlight/lol", "test/lowlight/LOL",
        "test/lowlight", "test/LOL", "LOL/eval15", "LOL/test")


@dataclass(frozen=True)
class ProtocolSet:
    """One column of a protocol table: a test set (a clean folder + spec, or a paired folder)."""

    key: str
    label: str
    candidates: tuple[str, ...]
    spec: str | None = None
    text: str = ""  # the degradation text of a paired set (for --oracle)


PROTOCOLS: dict[str, tuple[ProtocolSet, ...]] = {
    "three-task": (
        ProtocolSet("cbsd68-15", "CBSD68 σ15", _CBSD68, "noise:15"),
        ProtocolSet("cbsd68-25", "CBSD68 σ25", _CBSD68, "noise:25"),
        ProtocolSet("cbsd68-50", "CBSD68 σ50", _CBSD68, "noise:50"),
        ProtocolSet("rain100l", "Rain100L", _RAIN, text="rain streaks"),
        ProtocolSet("sots", "SOTS", _SOTS, text="haze"),
    ),
    "five-task": (
        ProtocolSet("sots", "SOTS", _SOTS, text="haze"),
        ProtocolSet("rain100l", "Rain100L", _RAIN, text="rain streaks"),
        ProtocolSet("cbsd68-25", "CBSD68 σ25", _CBSD68, "noise:25"),
        ProtocolSet("gopro", "GoPro", _GOPRO, text="motion blur"),
        ProtocolSet("lol", "LOL", _LOL, text="underexposure"),
    ),
}


def protocol_sets(name: str) -> tuple[ProtocolSet, ...]:
    """The test sets of protocol `name`; an unknown name is a UsageError listing the known ones."""
    if name not in PROTOCOLS:
        raise UsageError(f"unknown protocol '{name}': use one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def _usable(path: Path, paired: bool) -> bool:
    if not path.is_dir():
        return False
    return is_paired_folder(path) if paired else not is_paired_folder(path) and bool(list_images(path))


def find_set(ps: ProtocolSet, root: str | Path) -> Path | None:
    """The first candidate folder of `ps` under `root` that holds that kind of set (or None)."""
    for rel in ps.candidates:
        path = Path(root).expanduser() / rel
        if _usable(path, paired=ps.spec is None):
            return path
    return None


def find_sets(name: str, root: str | Path) -> tuple[list[tuple[ProtocolSet, Path]], list[ProtocolSet]]:
    """(found (set, folder) pairs, missing sets) of protocol `name` under `root`."""
    found, missing = [], []
    for ps in protocol_sets(name):
        path = find_set(ps, root)
        if path is None:
            missing.append(ps)
        else:
            found.append((ps, path))
    return found, missing


def check_sets(protocol: str, root: str, *, decode: str = "auto") -> list[FolderReport]:
    """`lmdir data check`'s reports for the test sets of `protocol` under `root` (a missing set is
    a report with one problem line); `decode` as in `data.check.check_folder`."""
    reports = []
    seen: dict[str, FolderReport] = {}
    for ps in protocol_sets(protocol):
        path = find_set(ps, root) if root else None
        if path is None:
            rep = FolderReport(role=f"test:{ps.key}", folder="")
            rep.problems.append(
                f"test:{ps.key}: no {ps.label} test set under {root or '(data.root not set)'} "
                f"(looked for {', '.join(ps.candidates[:3])}, ...)"
            )
            reports.append(rep)
        elif str(path) not in seen:  # CBSD68 serves three columns: walk it once
            role = f"test:{ps.key.split('-')[0]}"
            seen[str(path)] = check_folder(role, str(path), paired=ps.spec is None, decode=decode)
            reports.append(seen[str(path)])
    return reports


def published(name: str) -> list[dict]:
    """Published rows of protocol `name`: {'method', 'source', 'results': {key: [psnr, ssim]},
    'average': [psnr, ssim] as printed}."""
    protocol_sets(name)
    text = resources.files("lmdir_jax").joinpath("published_results.json").read_text(encoding="utf-8")
    return json.loads(text)[name]["rows"]


def row_average(results: dict[str, list[float]], keys: list[str]) -> list[float] | None:
    """Mean [psnr, ssim] over `keys`, or None when the row misses one of them."""
    if not all(k in results for k in keys):
        return None
    return [sum(results[k][i] for k in keys) / len(keys) for i in (0, 1)]


def format_protocol_table(table: dict, markdown: bool = False) -> str:
    """The protocol table (see `evaluate.evaluate_protocol`) as aligned text or a Markdown table."""
    cols = table["columns"]
    keys = [c["key"] for c in cols]
    head = ["method"] + [c["label"] for c in cols] + ["average"]
    body = []
    for row in table["rows"]:
        res = row["results"]
        cells = [row["method"]]
        cells += [f"{res[k][0]:.2f}/{res[k][1]:.4f}" if k in res else "-" for k in keys]
        avg = row_average(res, keys)
        if avg is not None and row.get("average"):
            avg = row["average"]  # a published row's average as its paper prints it
        cells.append("-" if avg is None else f"{avg[0]:.2f}/{avg[1]:.4f}")
        body.append(cells)
    ssim = {"gaussian": "SSIM 11x11 Gaussian window (BasicSR)",
            "uniform": "SSIM 7x7 uniform window, sample covariance (scikit-image, PromptIR's script)"}
    title = (f"{table['protocol']}: PSNR/SSIM on RGB, images cropped to a multiple of "
             f"{CROP_MULTIPLE}; {ssim[table['ssim']]}; prior: {table['prior']}")
    notes = [f"missing under {table['root']}: {', '.join(table['missing'])} (skipped)"] if table["missing"] else []
    notes.append("average only over complete rows; published rows and their averages as printed "
                 "in their papers (their SSIM windows may differ)")
    if markdown:
        lines = [f"**{title}**", "", "| " + " | ".join(head) + " |",
                 "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines + [""] + [f"_{n}_" for n in notes])
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    fmt = lambda r: "  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True))  # noqa: E731
    lines = [title, fmt(head), "-" * len(fmt(head))] + [fmt(r) for r in body]
    return "\n".join(lines + notes)
