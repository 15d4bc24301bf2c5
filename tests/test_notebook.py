"""The quick-start notebook: a jupytext percent script (notebooks/quickstart.py) paired with the
committed clean notebook, executed top to bottom (TINY = True) in a kernel of this interpreter, with
its summary checked."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
SCRIPT = ROOT / "notebooks" / "quickstart.py"
SUMMARY_PREFIX = "NOTEBOOK_SUMMARY "  # the last code cell prints this + one JSON line


def _parameters_index(nb) -> int:
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell must be tagged 'parameters'"
    return tagged[0]


def _cells(nb) -> list[tuple[str, str, list[str]]]:
    return [(c.cell_type, c.source, list(c.metadata.get("tags", []))) for c in nb.cells]


def test_notebook_and_its_script_are_in_sync():
    """The .ipynb holds exactly the cells (type, source, tags) of the paired jupytext script; after
    editing notebooks/quickstart.py run `jupytext --sync notebooks/quickstart.py`."""
    import jupytext

    nb = nbformat.read(NOTEBOOK, as_version=4)
    script = jupytext.read(SCRIPT, fmt="py:percent")
    assert nb.metadata["jupytext"]["formats"] == "ipynb,py:percent"
    assert _cells(script) == _cells(nb), "run: jupytext --sync notebooks/quickstart.py"
    # the check can fail: a changed line in the script is a difference
    script.cells[-1].source += "\nedited"
    assert _cells(script) != _cells(nb)


def test_committed_notebook_is_clean():
    """No outputs or execution counts are committed."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    assert nb.cells[0].cell_type == "markdown" and "LMDIR" in nb.cells[0].source
    assert nb.cells[-1].cell_type == "markdown"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], "committed notebook has outputs"
            assert cell.execution_count is None, "committed notebook has execution counts"
    params = nb.cells[_parameters_index(nb)].source
    for name in ("TINY = False", "INSTALL = True", "REPO_URL =", "WORKDIR ="):
        assert name in params


def _inject(nb, params: dict) -> None:
    """papermill-style: a cell tagged 'injected-parameters' right after the parameters cell."""
    source = "# Parameters\n" + "\n".join(f"{k} = {v!r}" for k, v in params.items())
    cell = nbformat.v4.new_code_cell(source)
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(_parameters_index(nb) + 1, cell)


def _stream_text(nb) -> str:
    return "".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.output_type == "stream"
    )


@pytest.mark.slow
def test_notebook_executes_tiny(tmp_path):
    """Run every cell on the tiny setting; any failing cell fails; the summary must make sense."""
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    _inject(nb, {"TINY": True, "INSTALL": False, "WORKDIR": str(tmp_path / "work"), "SEED": 0})
    client = NotebookClient(
        nb, kernel_name="python3", timeout=900, resources={"metadata": {"path": str(tmp_path)}}
    )
    # One CPU device in the kernel (conftest emulates 8 for this process): compiling for a single
    # device is several times faster, and sharding is tested elsewhere.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = os.environ.get("LMDIR_TEST_XLA_FLAGS", "")
    env["JAX_PLATFORMS"] = "cpu"
    client.execute(env=env)

    lines = [ln for ln in _stream_text(nb).splitlines() if ln.startswith(SUMMARY_PREFIX)]
    assert len(lines) == 1, "the summary cell must print one summary line"
    summary = json.loads(lines[0][len(SUMMARY_PREFIX):])

    # The "python3" kernel spec starts `python`, which jupyter_client maps to this interpreter.
    assert summary["python"] == sys.executable
    assert summary["config"] == "tiny"
    assert summary["steps"] == 6
    assert summary["chunks"] == [[0, 3], [3, 6]]  # two train() calls, the second resumed at step 3
    assert set(summary["restore_psnr"]) == {"noise:25", "rain", "haze"}
    for scores in summary["restore_psnr"].values():
        assert set(scores) == {"input", "auto", "text"}
        assert all(math.isfinite(v) and 5 < v < 60 for v in scores.values())
    tasks = {(row["dataset"], row["task"]) for row in summary["eval"]}
    # held-out photos (never in the `skimage` training source)
    assert {("skimage-heldout", t) for t in ("noise:25", "rain", "haze")} <= tasks
    assert all(row["images"] == 2 for row in summary["eval"])
    assert math.isfinite(summary["eval_average"]["psnr_rgb"])
    has_torch = importlib.util.find_spec("torch") is not None
    if has_torch:
        # the README's promise: PyTorch outputs equal JAX's to 1e-4
        assert summary["torch_max_diff"] is not None and summary["torch_max_diff"] < 1e-4
    else:  # without the export extra the notebook skips the PyTorch section instead of failing
        assert summary["torch_max_diff"] is None

    work = tmp_path / "work"
    assert (work / "train" / "config.json").is_file()
    records = [json.loads(x) for x in (work / "train" / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    assert [step for step, _ in losses] == [1, 2, 3, 4, 5, 6]
    # the summary's final loss is the run's last logged loss (step 6): an L1 loss of images in [0, 1]
    assert summary["final_loss"] == losses[-1][1] and 0 < summary["final_loss"] < 1
    assert (work / "export-torch" / "model.safetensors").is_file() == has_torch
    images = [
        out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
        if "image/png" in out.get("data", {})
    ]
    assert len(images) >= 4  # degradation grid, cache references, loss curve, before/after
