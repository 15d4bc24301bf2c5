"""`lmdir restore --iterative` / `--controller`: AutoDIR's chain, its stop rules and the JSON sidecar."""

import json

import numpy as np
import pytest
import restore_fixtures

from lmdir_jax.cli import main
from lmdir_jax.data.io import read_image, write_image
from lmdir_jax.metrics import psnr

tiny_clip = restore_fixtures.tiny_clip  # shared session fixture
tiny_workdir = restore_fixtures.tiny_workdir  # shared session fixture


@pytest.fixture(scope="module")
def controller_wd(tmp_path_factory, tiny_clip):
    """An untrained (zero-initialised) controller workdir for the tiny CLIP."""
    from flax import nnx

    from lmdir_jax.priors.clip import load_clip
    from lmdir_jax.priors.controller import SPEC_FILE, Controller, controller_spec
    from lmdir_jax.train.checkpoints import make_manager, save

    wd = tmp_path_factory.mktemp("ctl") / "wd"
    wd.mkdir()
    clip = load_clip(tiny_clip, max_text_len=16)
    (wd / SPEC_FILE).write_text(json.dumps(controller_spec(clip)))
    ctrl = Controller.from_clip(clip)
    manager = make_manager(wd, async_save=False)
    save(manager, 1, {"model": nnx.state(ctrl), "opt": nnx.state(ctrl, nnx.Param)})
    manager.wait_until_finished()
    manager.close()
    return wd


def _restorer(tiny_workdir, controller_wd, monkeypatch, script):
    from lmdir_jax.inference import Restorer, load_restorer

    r = load_restorer(str(tiny_workdir), controller=str(controller_wd))
    assert r.clip.controller is not None
    names = [n for n, _ in r.clip.degradation_vocab]
    seq = iter(script)

    def assess(self, image):
        p = np.full(len(names), 0.01)
        for k, v in next(seq).items():
            p[names.index(k)] = v
        return p

    monkeypatch.setattr(Restorer, "assess", assess)
    return r


def test_iterative_stops_when_clean_wins(tiny_workdir, controller_wd, monkeypatch):
    r = _restorer(tiny_workdir, controller_wd, monkeypatch,
                  [{"noise": 0.8}, {"rain": 0.7, "noise": 0.2}, {"clean": 0.9}, {"haze": 0.9}])
    img = np.random.default_rng(0).random((24, 24, 3)).astype(np.float32)
    out, chain = r.restore_iterative(img, max_steps=3, clean=img * 0.9)
    assert [s["degradation"] for s in chain["steps"]] == ["noise", "rain"]
    assert chain["stop"] == "clean" and chain["steps"][0]["probability"] == 0.8
    assert chain["steps"][0]["psnr_change"] == pytest.approx(chain["steps"][0]["psnr_after"] - chain["steps"][0]["psnr_before"], abs=2e-3)
    assert out.shape == img.shape


def test_iterative_never_treats_a_degradation_twice_and_caps_steps(tiny_workdir, controller_wd, monkeypatch):
    r = _restorer(tiny_workdir, controller_wd, monkeypatch,
                  [{"noise": 0.8, "rain": 0.1}, {"noise": 0.8, "rain": 0.1}, {"noise": 0.9, "haze": 0.05},
                   {"noise": 0.9}])
    _, chain = r.restore_iterative(np.zeros((16, 16, 3), np.float32), max_steps=3)
    kinds = [s["degradation"] for s in chain["steps"]]
    assert kinds == ["noise", "rain", "haze"] and chain["stop"] == "max_steps"
    r = _restorer(tiny_workdir, controller_wd, monkeypatch, [{"noise": 0.9}, {"noise": 0.5, "clean": 0.4}])
    _, chain = r.restore_iterative(np.zeros((16, 16, 3), np.float32), max_steps=3)
    assert [s["degradation"] for s in chain["steps"]] == ["noise"] and chain["stop"] == "clean"


def test_restore_iterative_cli_writes_sidecars(tiny_workdir, controller_wd, tmp_path, capsys, monkeypatch):
    """The sidecar holds the chain the restorer ran (kinds, told texts, probabilities, PSNR before and
    after each step against --clean, why it stopped), and the written image is its last output."""
    rng = np.random.default_rng(3)
    clean = rng.random((40, 48, 3)).astype(np.float32)
    write_image(tmp_path / "in.png", np.clip(clean + rng.normal(0, 0.1, clean.shape), 0, 1).astype(np.float32))
    write_image(tmp_path / "ref.png", clean)
    r = _restorer(tiny_workdir, controller_wd, monkeypatch,
                  [{"noise": 0.8}, {"rain": 0.6, "noise": 0.3}, {"clean": 0.9}])
    texts = dict(zip((n for n, _ in r.clip.degradation_vocab), r.clip.conditioning_texts(), strict=True))
    code = main(["restore", str(tmp_path / "in.png"), "--checkpoint", str(tiny_workdir), "--output",
                 str(tmp_path / "out"), "--iterative", "--max-steps", "2", "--controller", str(controller_wd),
                 "--clean", str(tmp_path / "ref.png")])
    assert code == 0
    chain = json.loads((tmp_path / "out" / "in.json").read_text())
    assert chain["input"] == str(tmp_path / "in.png") and chain["output"] == str(tmp_path / "out" / "in.png")
    assert [(s["degradation"], s["text"], s["probability"]) for s in chain["steps"]] == [
        ("noise", texts["noise"], 0.8), ("rain", texts["rain"], 0.6)]
    assert chain["stop"] == "clean" and chain["final"]["clean"] == 0.9
    ref, noisy = read_image(tmp_path / "ref.png"), read_image(tmp_path / "in.png")
    first, second = chain["steps"]
    assert first["psnr_before"] == pytest.approx(psnr(ref, noisy), abs=1e-3)
    assert second["psnr_before"] == first["psnr_after"]  # each step restores the previous output
    for st in chain["steps"]:
        assert st["psnr_change"] == pytest.approx(st["psnr_after"] - st["psnr_before"], abs=2e-3)
    written = read_image(tmp_path / "out" / "in.png")  # 8 bits, as the input
    assert psnr(ref, written) == pytest.approx(second["psnr_after"], abs=0.05)
    out = capsys.readouterr().out
    assert f"restored noise -> rain (stop: clean) -> {tmp_path / 'out' / 'in.png'}" in out


def test_missing_or_foreign_controller_exits_2(tiny_workdir, tmp_path, capsys):
    args = ["restore", str(tmp_path / "x.png"), "--checkpoint", str(tiny_workdir), "--output", str(tmp_path / "o")]
    write_image(tmp_path / "x.png", np.zeros((8, 8, 3), np.float32))
    assert main([*args, "--controller", str(tmp_path / "nope")]) == 2
    assert "controller folder not found" in capsys.readouterr().err
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "controller.json").write_text(json.dumps({"text_dim": 768}))
    assert main([*args, "--controller", str(tmp_path / "foreign")]) == 2
    err = capsys.readouterr().err
    assert "another CLIP" in err and err.count("\n") == 1


@pytest.mark.slow
def test_evaluate_iterative_reports_the_chain(tiny_workdir, controller_wd, tmp_path, capsys, monkeypatch):
    """Each image's record names its chain ('noise -> rain', or 'clean' when nothing was treated)
    and the chain's first probability."""
    # assessments in call order: c0 before, after step 1, after step 2; c1 before
    _restorer(tiny_workdir, controller_wd, monkeypatch,
              [{"noise": 0.8}, {"rain": 0.6, "noise": 0.3}, {"clean": 0.9}, {"clean": 0.9}])
    rng = np.random.default_rng(4)
    (tmp_path / "set").mkdir()
    for i in range(2):
        write_image(tmp_path / "set" / f"c{i}.png", rng.random((32, 40, 3)).astype(np.float32))
    code = main(["evaluate", "--checkpoint", str(tiny_workdir), "--data", str(tmp_path / "set"),
                 "--spec", "noise:25+rain", "--iterative", "--max-steps", "2", "--controller", str(controller_wd),
                 "--json", str(tmp_path / "r.json")])
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["settings"]["prior"] == "iterative:2"
    images = report["images"]
    assert [(img["image"], img["degradation"], img["probability"]) for img in images] == [
        ("c0.png", "noise -> rain", 0.8), ("c1.png", "clean", None)]
    assert images[1]["restored"] == images[1]["degraded"]  # judged clean: the input, unchanged
