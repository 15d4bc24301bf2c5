"""The quick-start notebook: committed clean, generated from scripts/build_notebook.py, and executed
top to bottom (TINY = True) in a kernel of this interpreter, with its summary checked."""

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


def _builder():
    spec = importlib.util.spec_from_file_location("build_notebook", ROOT / "scripts" / "build_notebook.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _parameters_index(nb) -> int:
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell must be tagged 'parameters'"
    return tagged[0]


def test_committed_notebook_is_clean_and_current():
    """No outputs or execution counts are committed, and the file is what the builder writes."""
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
    assert NOTEBOOK.read_text() == _builder().render(), "run scripts/build_notebook.py"


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
    env["JAX_PLATFORMS"] = "cpu"
    client.execute(env=env)

    lines = [ln for ln in _stream_text(nb).splitlines() if ln.startswith(_builder().SUMMARY_PREFIX)]
    assert len(lines) == 1, "the summary cell must print one summary line"
    summary = json.loads(lines[0][len(_builder().SUMMARY_PREFIX):])

    # The "python3" kernel spec starts `python`, which jupyter_client maps to this interpreter.
    assert summary["python"] == sys.executable
    assert summary["config"] == "tiny"
    assert summary["steps"] == 6
    assert summary["chunks"] == [[0, 3], [3, 6]]  # two train() calls, the second resumed at step 3
    assert math.isfinite(summary["final_loss"]) and 0 < summary["final_loss"] < 1
    assert set(summary["restore_psnr"]) == {"noise:25", "rain", "haze"}
    for scores in summary["restore_psnr"].values():
        assert set(scores) == {"input", "auto", "text"}
        assert all(math.isfinite(v) and 5 < v < 60 for v in scores.values())
    tasks = {(row["dataset"], row["task"]) for row in summary["eval"]}
    assert {("skimage", "noise:25"), ("skimage", "rain"), ("skimage", "haze")} <= tasks
    assert all(row["images"] == 2 for row in summary["eval"])
    assert math.isfinite(summary["eval_average"]["psnr_rgb"])
    has_torch = importlib.util.find_spec("torch") is not None
    if has_torch:
        assert summary["torch_max_diff"] is not None and summary["torch_max_diff"] < 1e-3
    else:  # without the export extra the notebook skips the PyTorch section instead of failing
        assert summary["torch_max_diff"] is None

    work = tmp_path / "work"
    assert (work / "train" / "config.json").is_file()
    records = [json.loads(x) for x in (work / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert (work / "export-torch" / "model.safetensors").is_file() == has_torch
    images = [
        out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
        if "image/png" in out.get("data", {})
    ]
    assert len(images) >= 4  # degradation grid, cache references, loss curve, before/after
