"""Metrics and `lmdir evaluate`: PSNR/SSIM conventions, paired and synthetic sets, JSON and CSV."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import restore_fixtures

from lmdir_jax.cli import main
from lmdir_jax.data.io import write_image
from lmdir_jax.metrics import crop_to_multiple, image_metrics, psnr, rgb_to_y, ssim

tiny_clip = restore_fixtures.tiny_clip  # shared session fixture
tiny_workdir = restore_fixtures.tiny_workdir  # shared session fixture (the identity network)
trained_workdir = restore_fixtures.trained_workdir  # shared session fixture (trained, cached)
trained_clip = restore_fixtures.trained_clip


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([x, y, 0.5 * (x + y)], axis=-1) * 0.8 + 0.1
    return np.clip(base + 0.02 * rng.standard_normal((h, w, 3)), 0, 1).astype(np.float32)


def test_psnr_ssim_y_conventions():
    a = np.full((32, 32, 3), 0.5, np.float32)
    b = a + 0.1
    assert psnr(b, a) == pytest.approx(20.0, abs=1e-4)  # MSE 0.01, peak 1
    assert psnr(a, a) == np.inf and ssim(a, a) == pytest.approx(1.0)
    white, black = np.ones((2, 2, 3)), np.zeros((2, 2, 3))
    assert rgb_to_y(white)[0, 0] * 255 == pytest.approx(235.0)  # studio-swing BT.601
    assert rgb_to_y(black)[0, 0] * 255 == pytest.approx(16.0)
    img = _photo(40, 50, 0)
    noisy = np.clip(img + 0.1 * np.random.default_rng(1).standard_normal(img.shape), 0, 1)
    m = image_metrics(noisy, img)
    assert 15 < m["psnr_rgb"] < 25 and 0 < m["ssim_rgb"] < 0.9
    assert m["psnr_y"] > m["psnr_rgb"]  # luma averages the independent channel noise
    assert crop_to_multiple(img, 16).shape == (32, 48, 3)
    # centre crop (AirNet/PromptIR crop_img): 40 -> rows 4..36, 50 -> cols 1..49
    np.testing.assert_array_equal(crop_to_multiple(img, 16), img[4:36, 1:49])


def _sots_like(root, n: int = 2, h: int = 40, w: int = 48):
    """A paired folder in SOTS naming: degraded/0001_0.8_0.2.jpg <-> clean/0001.png."""
    for i in range(1, n + 1):
        clean = _photo(h, w, i)
        hazy = 0.6 * clean + 0.35
        write_image(root / "clean" / f"{i:04d}.png", clean)
        write_image(root / "degraded" / f"{i:04d}_0.8_0.{i}.jpg", hazy, quality=95)


def test_evaluate_paired_and_synthetic_json_csv(trained_workdir, tmp_path, capsys):
    """The trained network beats the input on held-out photos with noise, the oracle (the true
    degradation text) beats blind restoration, and JSON/CSV hold the numbers printed."""
    paired = tmp_path / "SOTS-tiny"
    _sots_like(paired)
    cleanset = tmp_path / "clean-tiny"
    restore_fixtures.heldout_crops(cleanset, 3)  # 48x48 crops of photos never trained on
    js, cs = tmp_path / "r.json", tmp_path / "r.csv"
    code = main(["evaluate", "--checkpoint", str(trained_workdir), "--data", str(paired),
                 "--data", str(cleanset), "--spec", "noise:25", "--max-images", "2",
                 "--crop-multiple", "16", "--json", str(js), "--csv", str(cs),
                 "--tile", "32", "--tile-overlap", "8"])
    assert code == 0
    out = capsys.readouterr().out
    assert "SOTS-tiny" in out and "paired" in out and "noise:25" in out and "average" in out
    report = json.loads(js.read_text())
    rows = {(r["dataset"], r["task"]): r for r in report["summary"]}
    assert rows[("SOTS-tiny", "paired")]["images"] == 2
    noisy = rows[("clean-tiny", "noise:25")]
    assert noisy["images"] == 2  # --max-images
    assert 17 < noisy["input_psnr_rgb"] < 24  # sigma 25 on 0-255 is about 20 dB
    assert noisy["psnr_rgb"] > noisy["input_psnr_rgb"] + 0.3  # it denoises
    assert noisy["ssim_rgb"] > noisy["input_ssim_rgb"]
    avg = report["average"]
    assert avg["psnr_rgb"] == pytest.approx(np.mean([r["psnr_rgb"] for r in report["summary"]]))
    with cs.open() as f:
        recs = list(csv.DictReader(f))
    assert len(recs) == 4 and {"psnr_y", "ssim_y", "input_psnr_rgb", "degradation"} <= set(recs[0])
    assert all(r["degradation"] and r["probability"] for r in recs)  # automatic prior recorded
    assert {(int(r["height"]), int(r["width"])) for r in recs if r["dataset"] == "SOTS-tiny"} == {(32, 48)}
    assert {(int(r["height"]), int(r["width"])) for r in recs if r["dataset"] == "clean-tiny"} == {(48, 48)}

    # same seed, same degraded inputs: a second run gives identical numbers
    assert main(["evaluate", "--checkpoint", str(trained_workdir), "--data", str(cleanset),
                 "--spec", "noise:25", "--max-images", "2", "--crop-multiple", "16", "--oracle",
                 "--tile", "32", "--tile-overlap", "8",
                 "--json", str(tmp_path / "r2.json")]) == 0
    again = json.loads((tmp_path / "r2.json").read_text())["summary"][0]
    assert again["input_psnr_rgb"] == pytest.approx(noisy["input_psnr_rgb"])
    assert main(["evaluate", "--checkpoint", str(trained_workdir), "--data", str(cleanset),
                 "--spec", "noise:25", "--max-images", "2", "--crop-multiple", "16", "--blind",
                 "--tile", "32", "--tile-overlap", "8", "--json", str(tmp_path / "r3.json")]) == 0
    blind = json.loads((tmp_path / "r3.json").read_text())["summary"][0]
    # Blind still denoises; told the true text it gains clearly more (the text matters: the fixture
    # is a run that learned to use it, tests/trained_fixture.py).
    assert blind["psnr_rgb"] > blind["input_psnr_rgb"] + 0.1
    assert again["psnr_rgb"] > blind["psnr_rgb"] + 0.3
    assert "noise" in json.loads((tmp_path / "r2.json").read_text())["images"][0]["degradation"]


def test_evaluate_errors(tiny_workdir, tmp_path, capsys):
    """Each misuse exits 2 with one line naming it, before anything is evaluated or written."""
    paired = tmp_path / "P"
    _sots_like(paired, n=1)
    before = _files(tmp_path, tiny_workdir)
    for argv, needle in [
        (["evaluate", "--checkpoint", str(tiny_workdir), "--spec", "noise:25", "--data", str(paired)],
         "--spec must follow"),
        (["evaluate", "--checkpoint", str(tmp_path / "none"), "--data", str(paired)], "no checkpoint"),
        (["evaluate", "--checkpoint", str(tiny_workdir), "--data", str(tmp_path / "gone")], "not found"),
        (["evaluate", "--checkpoint", str(tiny_workdir), "--data", str(paired), "--oracle"], "label"),
        # output paths are checked before the evaluation runs (nothing printed, nothing lost)
        (["evaluate", "--checkpoint", str(tiny_workdir), "--data", str(paired),
          "--json", str(paired / "clean" / "0001.png" / "r.json")], "is a file, not a folder"),
        (["evaluate", "--checkpoint", str(tiny_workdir), "--data", str(paired), "--csv", str(paired)],
         "is a folder"),
        (["evaluate", "--checkpoint", str(tiny_workdir), "--data", str(paired),
          "--degradation", " "], "--degradation needs a text"),
        (["evaluate", "--checkpoint", str(tiny_workdir), "--data", str(paired), "--data", "skimage",
          "--spec", "noise:abc"], "bad degradation spec part 'noise:abc'"),
        # a report never replaces a photo nor the run's own files
        (["evaluate", "--checkpoint", str(tiny_workdir), "--data", str(paired),
          "--csv", str(paired / "clean" / "0001.png")], "is an existing image"),
        (["evaluate", "--checkpoint", str(tiny_workdir), "--data", str(paired),
          "--json", str(tiny_workdir / "config.json")], "would overwrite the input"),
    ]:
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert err.startswith("lmdir: error:") and needle in err and "\n" not in err, err
        assert "average" not in captured.out and "img" not in captured.err  # failed before evaluating
    # nothing written, replaced or removed: the photos, the run's files, no report anywhere
    assert _files(tmp_path, tiny_workdir) == before


def _files(*roots: Path) -> dict[Path, bytes]:
    """Every file under `roots` with its bytes."""
    return {p: p.read_bytes() for root in roots for p in sorted(root.rglob("*")) if p.is_file()}


def test_evaluate_real_sots_sample(tiny_workdir, shared_data, tmp_path, capsys):
    sots = shared_data / "test" / "SOTS-outdoor-sample"
    if not sots.is_dir():
        pytest.skip("SOTS-outdoor-sample not present")
    js = tmp_path / "sots.json"
    assert main(["evaluate", "--checkpoint", str(tiny_workdir), "--data", str(sots),
                 "--crop-multiple", "16", "--max-images", "1", "--json", str(js),
                 "--tile", "32", "--tile-overlap", "8"]) == 0
    rec = json.loads(js.read_text())["images"][0]
    assert rec["image"].endswith("0001_0.8_0.2.jpg")
    assert rec["height"] % 16 == 0 and rec["width"] % 16 == 0
    assert 5 < rec["degraded"]["psnr_rgb"] < 30 and 0 < rec["degraded"]["ssim_y"] < 1


def test_evaluate_blind_masks_the_degradation_prior(tiny_workdir, tmp_path):
    """--blind: no degradation text reaches the network (the record says so); --blind and --oracle
    exclude each other."""
    paired = tmp_path / "P"
    _sots_like(paired, n=1)
    js = tmp_path / "blind.json"
    assert main(["evaluate", "--checkpoint", str(tiny_workdir), "--data", str(paired), "--blind",
                 "--crop-multiple", "16", "--tile", "32", "--tile-overlap", "8",
                 "--json", str(js)]) == 0
    report = json.loads(js.read_text())
    assert report["settings"]["prior"] == "blind"
    assert report["images"][0]["degradation"] == "" and report["images"][0]["probability"] is None
    assert main(["evaluate", "--checkpoint", str(tiny_workdir), "--data", str(paired), "--blind",
                 "--oracle"]) == 2


def test_evaluate_accepts_the_skimage_source(tiny_workdir, tmp_path):
    """`--data skimage` (the quick start's fallback without ../shared) is a clean source."""
    js = tmp_path / "sk.json"
    assert main(["evaluate", "--checkpoint", str(tiny_workdir), "--data", "skimage", "--spec",
                 "noise:25", "--max-images", "1", "--blind", "--crop-multiple", "16",
                 "--tile", "32", "--tile-overlap", "8", "--json", str(js)]) == 0
    summary = json.loads(js.read_text())["summary"]
    assert summary[0]["dataset"] == "skimage" and summary[0]["images"] == 1


def test_evaluations_side_by_side(tmp_path):
    """`compare_evaluations` (what `lmdir report --eval NAME=FILE` draws): one PSNR column per
    named `--json` report, reports of one name merged, a set a report lacks left blank, and a file
    that is not such a report named in a UsageError."""
    from lmdir_jax.errors import UsageError
    from lmdir_jax.report import compare_evaluations

    def report(path, rows):
        summary = [dict(dataset=d, task=t, images=n, psnr_rgb=p, input_psnr_rgb=i)
                   for d, t, n, p, i in rows]
        path.write_text(json.dumps({"settings": {}, "summary": summary}))
        return path

    blind = report(tmp_path / "b.json", [("CBSD68", "noise:25", 20, 26.7, 20.53),
                                         ("Rain100L", "paired", 20, 26.74, 24.79)])
    auto = report(tmp_path / "a.json", [("CBSD68", "noise:25", 20, 27.1, 20.53),
                                        ("Rain100L", "paired", 20, 26.9, 24.79)])
    told1 = report(tmp_path / "t1.json", [("CBSD68", "noise:25", 20, 27.5, 20.53)])
    told2 = report(tmp_path / "t2.json", [("SOTS", "paired", 2, 19.0, 18.25)])
    table = compare_evaluations([("blind", blind), ("automatic", auto), ("told", told1),
                                 ("told", told2)])
    lines = table.splitlines()
    assert lines[0] == "| test set | images | input | blind | automatic | told |"
    assert lines[2] == "| CBSD68 noise:25 | 20 | 20.53 | 26.70 | 27.10 | 27.50 |"
    assert lines[3] == "| Rain100L paired | 20 | 24.79 | 26.74 | 26.90 |  |"
    assert lines[4] == "| SOTS paired | 2 | 18.25 |  |  | 19.00 |"
    (tmp_path / "bad.json").write_text("{}")
    (tmp_path / "rows.json").write_text(json.dumps({"summary": [{"dataset": "x", "task": "y"}]}))
    for bad in (tmp_path / "bad.json", tmp_path / "rows.json", tmp_path / "missing.json"):
        with pytest.raises(UsageError, match=str(bad.name)):
            compare_evaluations([("blind", bad)])
