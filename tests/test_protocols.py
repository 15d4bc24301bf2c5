"""All-in-one protocols: data.sources mixtures, PromptIR's layout and AdaIR's five-task layout,
`lmdir data check`, the published rows, and `lmdir evaluate --protocol` from tiny trained workdirs
(fixtures are generated images)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from lmdir_jax.cli import main
from lmdir_jax.config import load_config
from lmdir_jax.data.config import source_config
from lmdir_jax.data.io import write_image
from lmdir_jax.data.pipeline import make_dataset, make_train_iterator, source_names
from lmdir_jax.data.sources import ImageSource, match_pairs
from lmdir_jax.degradations import KINDS
from lmdir_jax.errors import UsageError
from lmdir_jax.metrics import ssim

P = 16


def _pairs(root: Path, ddir: str, cdir: str, names: list[tuple[str, str]], rng, size=(24, 28)):
    for dname, cname in names:
        clean = rng.random((*size, 3))
        write_image(root / cdir / cname, clean)
        write_image(root / ddir / dname, clean * 0.5)


def build_promptir(root: Path, seed: int = 0) -> Path:
    """PromptIR's layout (Train/ and test/) from a few generated images."""
    rng = np.random.default_rng(seed)
    for i in range(3):
        write_image(root / "Train/Denoise" / f"{i:05d}.png", rng.random((24, 30, 3)))
    _pairs(root / "Train/Derain", "rainy", "gt", [(f"rain-{i}.png", f"norain-{i}.png") for i in (1, 2)], rng)
    _pairs(root / "Train/Dehaze", "synthetic", "original",
           [(f"part1/{i:04d}_0.8_0.2.jpg", f"{i:04d}.jpg") for i in (25, 39)], rng)
    for i in range(2):
        write_image(root / "test/denoise/bsd68" / f"test{i:03d}.png", rng.random((32, 36, 3)))
    _pairs(root / "test/derain/Rain100L", "input", "target", [(f"{i:03d}.png",) * 2 for i in (1, 2)], rng,
           size=(32, 32))
    _pairs(root / "test/dehaze", "input", "target", [("0001_0.8_0.2.jpg", "0001.png")], rng, size=(32, 32))
    return root


def _config(root: Path, **weights) -> object:
    c = load_config("tiny")
    c.data.patch_size, c.data.batch_size, c.data.root = P, 8, str(root)
    c.data.sources.denoise = source_config("Train/Denoise", weights.get("denoise", 2.0),
                                           specs=("noise:15", "noise:25", "noise:50"))
    c.data.sources.derain = source_config("Train/Derain", weights.get("derain", 1.0), text="rain streaks")
    c.data.sources.dehaze = source_config("Train/Dehaze", weights.get("dehaze", 1.0), text="haze",
                                          degraded_dir="synthetic", clean_dir="original")
    return c


@pytest.fixture(scope="module")
def promptir(tmp_path_factory) -> Path:
    return build_promptir(tmp_path_factory.mktemp("promptir"))


def test_match_pairs_rules():
    pairs, lone_d, lone_c = match_pairs(
        ["rain-1.png", "rain-2.png", "part1/0025_0.8_0.04.jpg", "part1/0025_1_0.2.jpg", "x.png"],
        ["norain-1.png", "norain-2.png", "0025.jpg", "y.png"],
    )
    assert ("rain-1.png", "norain-1.png") in pairs and ("rain-2.png", "norain-2.png") in pairs
    assert ("part1/0025_0.8_0.04.jpg", "0025.jpg") in pairs and ("part1/0025_1_0.2.jpg", "0025.jpg") in pairs
    assert lone_d == ["x.png"] and lone_c == ["y.png"]


class _Const(ImageSource):
    """n in-memory 12x12 images of one grey level (no files)."""

    def __init__(self, n: int, level: float):
        super().__init__()
        self.n, self.level, self.name = n, level, f"const{level}"

    def keys(self):
        return [f"{self.name}/{i}" for i in range(self.n)]

    def _load(self, index):
        return {"key": self.keys()[index], "clean": np.full((12, 12, 3), self.level, np.float32)}


def test_mixture_weights_within_binomial_tolerance():
    c = load_config("tiny")
    c.data.patch_size, c.data.batch_size = 8, 100
    weights = {"a": 0.6, "b": 0.3, "c": 0.1}
    for name, w in weights.items():
        c.data.sources[name] = source_config(name, w, specs=("noise:25",))
    ds = make_dataset(c, sources=[_Const(64, 0.2), _Const(64, 0.5), _Const(64, 0.8)])
    counts = Counter()
    for i in range(30):  # 3000 draws
        counts.update(ds[i]["source"].tolist())
    n = sum(counts.values())
    for name, w in weights.items():
        assert abs(counts[name] - n * w) <= 4 * np.sqrt(n * w * (1 - w)), counts
    b = ds[0]
    levels = {"a": 0.2, "b": 0.5, "c": 0.8}
    for s, sid, gt in zip(b["source"].tolist(), b["source_id"].tolist(), b["gt"], strict=True):
        assert source_names(c)[sid] == s and np.allclose(gt, levels[s])  # each example keeps its source


def test_promptir_mixture_examples(promptir):
    c = _config(promptir)
    it = make_train_iterator(c, process_index=0, process_count=1)
    seen, levels = Counter(), set()
    for _ in range(4):
        b = next(it)
        for i, s in enumerate(b["source"].tolist()):
            seen[s] += 1
            if s == "derain":
                assert b["deg_text"][i] == "rain streaks"
                np.testing.assert_allclose(b["lq"][i], b["gt"][i] * 0.5, atol=1.5 / 255)
                assert b["key"][i].startswith("rainy/rain-")
                # a pair's label names its source text's kind (PIP's prompt weights, the controller)
                assert np.flatnonzero(b["deg_vector"][i]).tolist() == [KINDS.index("rain")]
            elif s == "dehaze":
                assert b["deg_text"][i] == "haze" and b["key"][i].startswith("synthetic/part1/")
                assert np.flatnonzero(b["deg_vector"][i]).tolist() == [KINDS.index("haze")]
            else:  # noise only, at one of the three fixed levels
                vec = b["deg_vector"][i]
                assert np.flatnonzero(vec).tolist() == [KINDS.index("noise")]
                levels.add(round(float(vec[KINDS.index("noise")]), 5))
    it.close()
    assert seen["denoise"] == 2 * seen["derain"] == 2 * seen["dehaze"]
    assert 2 <= len(levels) <= 3


def test_mixture_resume_through_orbax_checkpoint(promptir, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    c = _config(promptir)
    it = make_train_iterator(c, process_index=0, process_count=1)
    for _ in range(3):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mgr.wait_until_finished()
    expected = [next(it) for _ in range(2)]
    it2 = make_train_iterator(c, process_index=0, process_count=1)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it2)))
    for a in expected:
        b = next(it2)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    other = _config(promptir)
    other.seed = 1
    assert not np.array_equal(next(make_train_iterator(other, process_index=0, process_count=1))["gt"],
                              next(make_train_iterator(c, process_index=0, process_count=1))["gt"])


def test_bad_sources_are_one_line_usage_errors(promptir, tmp_path):
    c = _config(promptir, derain=0.0)
    with pytest.raises(UsageError, match="derain.weight must be > 0"):
        make_train_iterator(c, process_index=0, process_count=1)
    c = _config(promptir)
    c.data.sources.derain.path = "Train/Nope"
    with pytest.raises(UsageError, match="derain: path not found"):
        make_train_iterator(c, process_index=0, process_count=1)
    (tmp_path / "rainy").mkdir()
    write_image(tmp_path / "rainy" / "a.png", np.zeros((8, 8, 3)))
    write_image(tmp_path / "gt" / "b.png", np.zeros((8, 8, 3)))
    c = _config(promptir)
    c.data.sources.derain.path = str(tmp_path)
    with pytest.raises(UsageError, match="no matching rainy/gt pair"):
        make_train_iterator(c, process_index=0, process_count=1)


CONFIG_FILE = """
from lmdir_jax.config import load_config
from lmdir_jax.data.config import source_config


def get_config():
    c = load_config("tiny")
    c.data.patch_size, c.data.batch_size, c.data.root = {patch}, 8, {root!r}
    c.data.protocol = "three-task"
    c.data.sources.denoise = source_config("Train/Denoise", 2.0, specs=("noise:15", "noise:25", "noise:50"))
    c.data.sources.derain = source_config("Train/Derain", 1.0, text="rain streaks")
    c.data.sources.dehaze = source_config("Train/Dehaze", 1.0, text="haze", degraded_dir="synthetic",
                                          clean_dir="original")
    # test_train.py's overrides: the tiny network compiles to the same step (compilation cache)
    c.train.steps, c.train.ckpt_every, c.train.plot_every = 4, 2, -1
    return c
"""


def _write_config(path: Path, root: Path) -> Path:
    """A config file like configs/three_task.py, on the tiny network (what `_config` builds)."""
    path.write_text(CONFIG_FILE.format(patch=P, root=str(root)))
    return path


def test_data_check_table_and_problem_lines(promptir, tmp_path, capsys):
    cfg = _write_config(tmp_path / "good.py", promptir)
    assert main(["data", "check", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "train:derain" in out and "test:rain100l" in out and "no problem" in out
    row = next(line for line in out.splitlines() if line.startswith("train:dehaze"))
    assert row.split()[1:5] == ["4", "2", "0", "0"]  # images, pairs, unpaired, unreadable

    bad = build_promptir(tmp_path / "bad", seed=1)
    write_image(bad / "Train/Derain/gt/norain-2.png", np.zeros((10, 12, 3)))  # sizes now differ
    write_image(bad / "Train/Derain/rainy/rain-9.png", np.zeros((24, 28, 3)))  # unpaired
    for f in (bad / "test/dehaze/target").iterdir():
        f.unlink()  # no pair left
    (bad / "Train/Denoise").rename(bad / "Train/Gone")
    cfg = _write_config(tmp_path / "bad.py", bad)
    assert main(["data", "check", "--config", str(cfg)]) == 1
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.startswith("lmdir: data problem:")]
    assert any("train:denoise: folder not found" in line for line in err)
    assert any("pair sizes differ: rainy/rain-2.png 24x28 vs gt/norain-2.png 10x12" in line for line in err)
    assert any("test:sots" in line and "no input/target pair" in line for line in err)
    assert len(err) == 3 and "Traceback" not in captured.err
    assert "train:derain" in captured.out and "    1 " in captured.out  # the unpaired file is counted

    wd = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--workdir", str(wd), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "lmdir: error: train:denoise: folder not found" in err and "test:sots" not in err
    assert "Traceback" not in err
    assert not wd.exists()  # nothing written


def test_ssim_windows():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    a = rng.random((32, 32, 3))
    b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
    assert ssim(b, a, "uniform") == pytest.approx(structural_similarity(a, b, data_range=1.0, channel_axis=-1))
    assert abs(ssim(b, a, "uniform") - ssim(b, a, "gaussian")) > 1e-3


@pytest.fixture(scope="module")
def trained(promptir, tmp_path_factory) -> Path:
    """A tiny network trained 4 steps on the PromptIR-layout mixture (per-source losses logged)."""
    tmp = tmp_path_factory.mktemp("trained")
    cfg = _write_config(tmp / "cfg.py", promptir)
    wd = tmp / "wd"
    assert main(["train", "--config", str(cfg), "--workdir", str(wd), "--no-progress"]) == 0
    return wd


@pytest.mark.slow
def test_metrics_log_the_loss_per_source(trained):
    records = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss" in r]
    assert len(losses) == 4
    for r in losses:
        per = {k: v for k, v in r.items() if k.startswith("loss/")}
        assert set(per) == {"loss/denoise", "loss/derain", "loss/dehaze"}
        # sources weighted 2:1:1 in every batch of 8: the mean of the per-source means, so weighted
        assert r["loss"] == pytest.approx(
            (2 * per["loss/denoise"] + per["loss/derain"] + per["loss/dehaze"]) / 4, rel=1e-4
        )


@pytest.mark.slow
def test_evaluate_protocol_table(trained, promptir, tmp_path, capsys, caplog):
    out_json = tmp_path / "r.json"
    code = main(["evaluate", "--protocol", "three-task", "--root", str(promptir), "--checkpoint",
                 str(trained), "--ssim", "uniform", "--format", "markdown", "--json", str(out_json)])
    assert code == 0
    out = capsys.readouterr().out
    assert "| PromptIR | 33.98/0.9330 | 31.31/0.8880 | 28.06/0.7990 | 36.37/0.9720 | 30.58/0.9740 |" in out
    assert "| this checkpoint |" in out and "uniform" in out
    data = json.loads(out_json.read_text())
    mine = data["table"]["rows"][-1]["results"]
    assert set(mine) == {"cbsd68-15", "cbsd68-25", "cbsd68-50", "rain100l", "sots"}
    assert mine["cbsd68-15"][0] > mine["cbsd68-50"][0]  # the same images, more noise
    assert data["settings"]["ssim"] == "uniform" and len(data["images"]) == 2 * 3 + 2 + 1

    partial = build_promptir(tmp_path / "partial")
    for f in sorted((partial / "test/dehaze").rglob("*"), reverse=True):
        f.unlink() if f.is_file() else f.rmdir()
    (partial / "test/dehaze").rmdir()
    assert main(["evaluate", "--protocol", "three-task", "--root", str(partial), "--checkpoint",
                 str(trained)]) == 0
    captured = capsys.readouterr()
    assert "SOTS not found" in caplog.text and "missing under" in captured.out
    mine = next(line for line in captured.out.splitlines() if line.startswith("this checkpoint"))
    assert mine.split()[-2:] == ["-", "-"]  # no SOTS value and no average for an incomplete row


@pytest.mark.parametrize(
    "argv, code, message",
    [
        (["--protocol", "nine-task", "--root", "."], 2, "unknown protocol 'nine-task'"),
        (["--protocol", "three-task"], 2, "--protocol needs --root"),
        (["--protocol", "three-task", "--root", "EMPTY"], 1, "no three-task test set under"),
        (["--protocol", "five-task", "--root", "EMPTY"], 1, "no five-task test set under"),
    ],
)
def test_evaluate_protocol_misuse(argv, code, message, tmp_path, capsys):
    argv = [str(tmp_path) if a == "EMPTY" else a for a in argv]
    out_json = tmp_path / "never.json"
    assert main(["evaluate", "--checkpoint", str(tmp_path), "--json", str(out_json), *argv]) == code
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out_json.exists()


# ---- five tasks: AdaIR's layout (PromptIR's plus GoPro and LOL), the real configs/five_task.py sources


def build_five_task(root: Path, seed: int = 2) -> Path:
    """AdaIR's five-task layout (its INSTALL.md names) from a few generated images."""
    build_promptir(root, seed)
    rng = np.random.default_rng(seed + 1)
    _pairs(root / "Train/Deblur", "blur", "sharp",
           [(f"GOPR0372_07_00_{i:06d}.png",) * 2 for i in (47, 48)], rng)
    _pairs(root / "Train/Enhance", "low", "gt", [(f"{i}.png",) * 2 for i in (2, 5)], rng)
    _pairs(root / "test/deblur/gopro", "input", "target", [("GOPR0384_11_00_000001.png",) * 2], rng,
           size=(32, 32))
    _pairs(root / "test/enhance/lol", "input", "target", [(f"{i}.png",) * 2 for i in (1, 22)], rng,
           size=(32, 32))
    return root


FIVE_CONFIG_FILE = """
from lmdir_jax.config import load_config


def get_config():
    c = load_config("tiny")  # the tiny network; the data sources are configs/five_task.py's
    five = load_config("five_task")
    c.data.sources, c.data.protocol = five.data.sources, five.data.protocol
    c.data.patch_size, c.data.batch_size, c.data.root = {patch}, 8, {root!r}
    c.train.steps, c.train.ckpt_every, c.train.plot_every = 3, 3, -1
    return c
"""


@pytest.fixture(scope="module")
def five(tmp_path_factory) -> Path:
    return build_five_task(tmp_path_factory.mktemp("five"))


def _five_config(path: Path, root: Path) -> Path:
    path.write_text(FIVE_CONFIG_FILE.format(patch=P, root=str(root)))
    return path


def test_five_task_config_sources():
    c = load_config("five_task")
    assert c.data.protocol == "five-task"
    assert source_names(c) == ["deblur", "dehaze", "denoise", "derain", "lowlight"]
    assert {n: c.data.sources[n].weight for n in source_names(c)} == dict.fromkeys(source_names(c), 1.0)
    assert c.data.sources.deblur.path == "Train/Deblur" and c.data.sources.deblur.text == "motion blur"
    assert c.data.sources.lowlight.path == "Train/Enhance" and c.data.sources.lowlight.text == "underexposure"


def test_published_rows_match_their_printed_averages():
    from lmdir_jax.protocols import protocol_sets, published, row_average

    leaders = {"three-task": {"AdaIR", "MoCE-IR", "BioIR-L", "DFPIR", "EvoIR", "DACG-IR"},
               "five-task": {"PromptIR", "InstructIR-5D", "AdaIR", "MoCE-IR", "DFPIR", "BioIR-L", "DACG-IR"}}
    for name, methods in leaders.items():
        keys = [ps.key for ps in protocol_sets(name)]
        rows = published(name)
        assert methods <= {r["method"] for r in rows}
        for r in rows:
            assert r["source"] and set(r["results"]) == set(keys), r["method"]
            psnr, ssim_ = row_average(r["results"], keys)
            # the per-set numbers reproduce the average the paper prints (catches a mistyped cell)
            assert abs(psnr - r["average"][0]) <= 0.0051 and abs(ssim_ - r["average"][1]) <= 0.0011, r


def test_five_task_sets_found_in_adair_and_other_layouts(five, tmp_path):
    from lmdir_jax.protocols import find_sets

    found, missing = find_sets("five-task", five)
    assert not missing
    paths = {ps.key: p.relative_to(five).as_posix() for ps, p in found}
    assert paths == {"sots": "test/dehaze", "rain100l": "test/derain/Rain100L",
                     "cbsd68-25": "test/denoise/bsd68", "gopro": "test/deblur/gopro",
                     "lol": "test/enhance/lol"}
    # the datasets' own folder names, as under ../shared/data
    rng = np.random.default_rng(0)
    _pairs(tmp_path / "GoPro/test", "blur", "sharp", [("a.png",) * 2], rng)
    _pairs(tmp_path / "LOL/eval15", "low", "high", [("1.png",) * 2], rng)
    found, missing = find_sets("five-task", tmp_path)
    assert {ps.key: p.relative_to(tmp_path).as_posix() for ps, p in found} == {
        "gopro": "GoPro/test", "lol": "LOL/eval15"}
    assert {ps.key for ps in missing} == {"sots", "rain100l", "cbsd68-25"}


def test_five_task_data_check(five, tmp_path, capsys):
    cfg = _five_config(tmp_path / "five.py", five)
    assert main(["data", "check", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:5] for line in out.splitlines() if line.startswith(("train:", "test:"))}
    assert rows["train:deblur"] == ["4", "2", "0", "0"] and rows["train:lowlight"] == ["4", "2", "0", "0"]
    assert rows["test:gopro"] == ["2", "1", "0", "0"] and rows["test:lol"] == ["4", "2", "0", "0"]
    assert {"train:denoise", "train:derain", "train:dehaze", "test:sots", "test:rain100l", "test:cbsd68"} <= set(rows)

    bad = build_five_task(tmp_path / "bad")
    for f in (bad / "test/enhance/lol/target").iterdir():
        f.unlink()  # LOL inputs without targets
    (bad / "Train/Deblur/sharp").rename(bad / "Train/Deblur/clear_frames")  # no clean sub-folder left
    cfg = _five_config(tmp_path / "bad.py", bad)
    assert main(["data", "check", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    problems = [line for line in err.splitlines() if line.startswith("lmdir: data problem:")]
    assert len(problems) == 2 and "Traceback" not in err
    assert any("train:deblur" in line and "Train/Deblur is not a paired folder" in line for line in problems)
    assert any("test:lol" in line and "lol" in line for line in problems)


@pytest.fixture(scope="module")
def five_trained(five, tmp_path_factory) -> Path:
    """The tiny network trained 3 steps on the five-task mixture (configs/five_task.py's sources)."""
    tmp = tmp_path_factory.mktemp("five_trained")
    wd = tmp / "wd"
    assert main(["train", "--config", str(_five_config(tmp / "cfg.py", five)), "--workdir", str(wd),
                 "--no-progress"]) == 0
    return wd


@pytest.mark.slow
def test_five_task_trains_and_evaluates(five_trained, five, tmp_path, capsys):
    records = [json.loads(x) for x in (five_trained / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss" in r]
    assert len(losses) == 3 and all(np.isfinite(r["loss"]) for r in losses)
    seen = {k for r in losses for k in r if k.startswith("loss/")}
    assert seen <= {f"loss/{n}" for n in ("denoise", "derain", "dehaze", "deblur", "lowlight")}
    assert len(seen) >= 4  # 24 draws over five equal sources

    out_json = tmp_path / "five.json"
    assert main(["evaluate", "--protocol", "five-task", "--root", str(five), "--checkpoint",
                 str(five_trained), "--format", "markdown", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "| method | SOTS | Rain100L | CBSD68 σ25 | GoPro | LOL | average |" in out
    assert ("| DACG-IR | 31.63/0.9810 | 39.24/0.9860 | 31.57/0.8900 | 29.58/0.8910 | 23.35/0.8640 "
            "| 31.07/0.9220 |") in out  # the average as DACG-IR prints it
    assert "| AdaIR | 30.53/0.9780 |" in out and "| MoCE-IR | 30.48/0.9740 |" in out
    mine = next(line for line in out.splitlines() if line.startswith("| this checkpoint |"))
    cells = [c.strip() for c in mine.strip("|").split("|")][1:]
    assert len(cells) == 6 and "-" not in cells  # five sets and the average, all scored
    data = json.loads(out_json.read_text())
    res = data["table"]["rows"][-1]["results"]
    assert set(res) == {"sots", "rain100l", "cbsd68-25", "gopro", "lol"}
    assert data["settings"]["sets"]["gopro"].endswith("test/deblur/gopro")
    assert data["settings"]["sets"]["lol"].endswith("test/enhance/lol")
    assert len(data["images"]) == 1 + 2 + 2 + 1 + 2  # SOTS, Rain100L, CBSD68, GoPro, LOL
    for key, (psnr, ssim_) in res.items():
        assert 0 < psnr < 100 and -1 <= ssim_ <= 1, key
