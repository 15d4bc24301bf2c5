"""`lmdir priors ...` through lmdir_jax.cli.main: make-tiny, build (and resume), classify, misuse."""

import json

import numpy as np
import pytest

from lmdir_jax.cli import main
from lmdir_jax.data.io import write_image
from lmdir_jax.priors.cache import PriorCache


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    assert main(["priors", "make-tiny", str(out), "--no-sd"]) == 0
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(1)
    for i in range(3):
        write_image(root / f"p{i}.png", rng.random((24, 32, 3)).astype(np.float32))
    return root


def test_make_tiny_writes_a_real_clip_folder(tiny, capsys):
    for name in ("config.json", "model.safetensors", "vocab.json", "merges.txt", "preprocessor_config.json"):
        assert (tiny / "clip" / name).is_file()
    assert json.loads((tiny / "clip" / "config.json").read_text())["model_type"] == "clip"
    assert main(["priors", "make-tiny", str(tiny), "--no-sd"]) == 2  # never overwrites
    assert "not empty" in capsys.readouterr().err


def test_build_and_resume(tiny, images, tmp_path, capsys):
    caps = tmp_path / "c.jsonl"
    caps.write_text(json.dumps({"file": "p1.png", "caption": "a cat"}) + "\n")
    args = ["priors", "build", "--data", str(images), "--clip", str(tiny / "clip"),
            "--captions", str(caps), "--output", str(tmp_path / "cache"), "--batch", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "3 items" in out and "1 given / 2 zero-shot" in out and "0 references" in out
    assert PriorCache(tmp_path / "cache").get("p1.png")["caption"] == "a cat"
    assert main(args) == 0
    assert "(3 already there)" in capsys.readouterr().out


def test_classify_prints_confusion_matrix(tiny, images, tmp_path, capsys):
    res = tmp_path / "r.json"
    code = main(["priors", "classify", "--clip", str(tiny / "clip"), "--data", str(images),
                 "--spec", "noise:25", "--spec", "clean", "--max-images", "2", "--json", str(res)])
    assert code == 0
    out = capsys.readouterr().out
    assert "overall accuracy" in out and "noise:25" in out
    r = json.loads(res.read_text())
    assert np.asarray(r["confusion"]).sum(axis=1).tolist() == [2, 2] and r["images"] == 4
    assert r["classes"][0] == "clean"
    # the accuracies are the confusion matrix's hits: noise:25 rows named "noise", clean rows "clean"
    conf, names = np.asarray(r["confusion"]), r["classes"]
    hits = {"noise:25": conf[0, names.index("noise")], "clean": conf[1, names.index("clean")]}
    assert r["accuracy"] == {s: round(h / 2, 4) for s, h in hits.items()}
    assert r["overall_accuracy"] == round(sum(hits.values()) / 4, 4)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["priors", "build", "--data", "skimage", "--clip", "/no/such/clip", "--output", "/tmp/x"], "CLIP folder not found"),
        (["priors", "classify", "--clip", "/no/such/clip", "--data", "skimage", "--spec", "noise"], "CLIP folder not found"),
        (["priors", "classify", "--clip", "/x", "--data", "skimage", "--spec", "bogus:3"], "bogus"),
    ],
)
def test_misuse_exits_2_with_one_line(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err
