"""What a real (small) training run leaves behind: validation scores and plots, EMA parameters, and
the `lmdir report` page of it. Uses the cached trained fixture (tests/trained_fixture.py)."""

from __future__ import annotations

import json
import re

import jax
import numpy as np
import restore_fixtures
from flax import nnx

from lmdir_jax.cli import main
from lmdir_jax.data.io import load_image, read_image, write_image

trained_workdir = restore_fixtures.trained_workdir  # shared session fixture (trained, cached)
trained_clip = restore_fixtures.trained_clip


def test_validation_scores_and_plots(trained_workdir):
    records = [json.loads(x) for x in (trained_workdir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val_psnr" in r]
    assert [r["step"] for r in val] == [300]
    v = val[0]
    assert v["val_images"] == 2 and 0 < v["val_ssim"] < 1
    assert v["val_psnr"] > v["val_input_psnr"]  # the network restores the held-out photos
    grids = sorted((trained_workdir / "plots").glob("val_*.png"))
    assert [g.name for g in grids] == ["val_000300.png"]
    grid = read_image(grids[0])
    assert grid is not None and grid.shape[0] >= 2 * 48 and grid.std() > 0.02  # two rows of photos
    assert read_image(trained_workdir / "plots" / "loss.png") is not None


def test_ema_parameters_are_saved_and_used(trained_workdir):
    from lmdir_jax.train.checkpoints import load_for_inference

    config = json.loads((trained_workdir / "config.json").read_text())
    assert config["train"]["ema_decay"] == 0.9
    ema, _ = load_for_inference(trained_workdir, use_ema=True)
    raw, _ = load_for_inference(trained_workdir, use_ema=False)
    e = jax.tree.leaves(nnx.state(ema, nnx.Param))
    r = jax.tree.leaves(nnx.state(raw, nnx.Param))
    diffs = [float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(e, r, strict=True)]
    assert max(diffs) > 1e-6  # two different parameter sets, the EMA lagging behind
    assert all(np.isfinite(np.asarray(a)).all() for a in e)


def test_report_of_the_run(trained_workdir, tmp_path, capsys):
    """`lmdir report`: training data (and which photos were held out), curve, validation grid,
    sample with PSNR and the evaluation text."""
    clean_path = restore_fixtures.heldout_crops(tmp_path / "crops", 1)[0]
    clean = load_image(clean_path).rgb
    write_image(tmp_path / "coffee.png", clean)  # the quick start's held-out sample photo
    lq, _ = restore_fixtures.degraded_copy(clean, "noise:25")
    write_image(tmp_path / "sample" / "coffee.png", lq)
    assert main(["restore", str(tmp_path / "sample"), "--checkpoint", str(trained_workdir),
                 "--output", str(tmp_path / "restored")]) == 0  # automatic priors: +0.8 dB here
    (tmp_path / "eval.txt").write_text("dataset  task  psnr\nskimage-heldout noise:25 21.00\n")
    out = tmp_path / "rep" / "report.md"
    assert main(["report", "--workdir", str(trained_workdir), "--output", str(out),
                 "--compare", str(tmp_path / "sample" / "coffee.png"),
                 str(tmp_path / "restored" / "coffee.png"), str(tmp_path / "coffee.png"),
                 "--eval-text", str(tmp_path / "eval.txt")]) == 0
    text = out.read_text()
    assert "## PSNR side by side" not in text  # no --eval reports given
    assert "training data: `skimage`" in text and "held out, never trained on: coffee, chelsea" in text
    assert "(`coffee.png`) is held out" in text
    assert "## Training curve" in text and "## Validation" in text and "val_000300.png" in text
    assert "skimage-heldout noise:25 21.00" in text
    psnrs = [float(x) for x in re.findall(r"(?:degraded|restored) ([\d.]+) dB", text)]
    assert len(psnrs) == 2 and psnrs[1] > psnrs[0]  # restored beats degraded in the report too
    assert (out.parent / "sample.png").is_file()
    capsys.readouterr()
    assert main(["report", "--workdir", str(trained_workdir), "--output", str(out),
                 "--compare", str(tmp_path / "coffee.png")]) == 2
    assert "--compare takes" in capsys.readouterr().err
    # --eval NAME=FILE: `lmdir evaluate --json` reports side by side, printed and in the report
    runs = {}
    for name, args in (("blind", ["--blind"]), ("told", ["--oracle"])):
        runs[name] = tmp_path / f"eval-{name}.json"
        assert main(["evaluate", "--checkpoint", str(trained_workdir), "--data", "skimage-heldout",
                     "--spec", "noise:25", "--max-images", "1", *args,
                     "--json", str(runs[name])]) == 0
    capsys.readouterr()
    assert main(["report", "--workdir", str(trained_workdir), "--output", str(out),
                 *[a for n, p in runs.items() for a in ("--eval", f"{n}={p}")]]) == 0
    printed = capsys.readouterr().out
    assert "| test set | images | input | blind | told |" in printed
    assert "## PSNR side by side" in out.read_text()
    assert "| skimage-heldout noise:25 | 1 |" in out.read_text()
    assert main(["report", "--workdir", str(trained_workdir), "--output", str(out),
                 "--eval", str(runs["blind"])]) == 2
    assert "--eval takes NAME=FILE" in capsys.readouterr().err
