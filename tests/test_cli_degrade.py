"""CLI: `lmdir degrade`, `lmdir data preview`, `lmdir bench data`, and their misuse (exit 2)."""

import json

import numpy as np
import pytest

from lmdir_jax.cli import main
from lmdir_jax.data.io import load_image, read_image, write_image


@pytest.fixture()
def images(tmp_path):
    root = tmp_path / "in"
    rng = np.random.default_rng(0)
    write_image(root / "a.png", rng.random((20, 24, 3)))
    write_image(root / "sub" / "b.jpg", rng.random((16, 16, 3)))
    alpha = np.ones((12, 12), np.float32)
    alpha[:, :6] = 0.5
    write_image(root / "c16.png", rng.random((12, 12, 3)), bit_depth=16, alpha=alpha)
    return root


def test_degrade_folder_writes_pngs_and_labels(images, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["degrade", str(images), "--spec", "noise:25", "--output", str(out), "--seed", "3"]) == 0
    names = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert names == ["a.png", "c16.png", "sub/b.png"]
    records = [json.loads(line) for line in (out / "labels.jsonl").read_text().splitlines()]
    assert [r["name"] for r in records] == ["a.png", "c16.png", "sub/b.png"]
    assert all(r["spec"] == "noise:25" and "noise" in r["text"] for r in records)
    assert records[0]["label"]["severities"] == {"noise": 0.5}
    clean, noisy = read_image(images / "a.png"), read_image(out / "a.png")
    assert 15 / 255 < np.std(noisy - clean) < 35 / 255
    c16 = load_image(out / "c16.png")
    assert c16.bit_depth == 16 and c16.alpha is not None and np.isclose(c16.alpha[0, 0], 0.5, atol=1e-3)
    # same seed -> identical output
    out2 = tmp_path / "out2"
    main(["degrade", str(images / "a.png"), "--spec", "noise:25", "-o", str(out2), "--seed", "3"])
    assert np.array_equal(read_image(out2 / "a.png"), noisy)


def test_degrade_glob(images, tmp_path):
    out = tmp_path / "g"
    assert main(["degrade", str(images / "*.png"), "--spec", "jpeg:30+noise:15", "-o", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["a.png", "c16.png"]


def test_degrade_never_overwrites_inputs(images, capsys):
    before = (images / "a.png").read_bytes()
    assert main(["degrade", str(images / "a.png"), "--spec", "noise:25", "--output", str(images)]) == 2
    assert "is, or contains, the input" in capsys.readouterr().err
    assert (images / "a.png").read_bytes() == before


@pytest.mark.parametrize(
    "argv",
    [
        ["degrade", "IMAGES", "--spec", "bogus:3", "-o", "OUT"],
        ["degrade", "IMAGES", "--spec", "noise:999", "-o", "OUT"],
        ["degrade", "/no/such/file.png", "--spec", "noise:25", "-o", "OUT"],
        ["degrade", "IMAGES/*.gif", "--spec", "noise:25", "-o", "OUT"],
        ["degrade", "IMAGES", "-o", "OUT"],
        ["data", "preview", "--config", "nosuchconfig", "--output", "OUT/p.png"],
        ["data", "preview", "--config", "tiny", "--output", "OUT/p.png", "--config.data.nokey=1"],
        ["data", "preview", "--config", "tiny", "--output", "OUT/p.png", "--config.data.source=/nope"],
        ["bench", "data", "--config", "tiny", "--batches", "0"],
    ],
)
def test_misuse_exits_2_with_one_line(argv, images, tmp_path, capsys):
    argv = [a.replace("IMAGES", str(images)).replace("OUT", str(tmp_path / "o")) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmdir") and len(err.splitlines()) == 1


def test_data_preview_writes_a_grid(tmp_path, images):
    out = tmp_path / "grid.png"
    code = main(["data", "preview", "--config", "tiny", "--output", str(out), "--rows", "2",
                 "--cols", "1", "--cell", "48", f"--config.data.source={images}"])
    assert code == 0
    grid = read_image(out)
    assert grid.shape[0] > 2 * 48 and grid.shape[1] >= 2 * 48
    assert grid.std() > 0.05
