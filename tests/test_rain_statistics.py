"""scripts/rain_statistics.py on a tiny paired folder made here: it runs, prints its table and
writes its JSON, and its estimators recover the angle, the blending and the input PSNR they measure."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from lmdir_jax.data.io import write_image
from lmdir_jax.degradations.imageops import screen
from lmdir_jax.degradations.rain import rain_layer

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "rain_statistics.py"


@pytest.fixture(scope="module")
def stats():
    spec = importlib.util.spec_from_file_location("rain_statistics", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _clean(seed: int, h: int = 72, w: int = 96) -> np.ndarray:
    """A smooth colourful image in about [0.1, 0.8]."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(seed)
    ch = [0.45 + 0.3 * np.sin(x / (9 + 3 * k) + rng.uniform(0, 6)) * np.cos(y / 13.0) for k in range(3)]
    return np.stack(ch, 2).astype(np.float32)


def _layer(seed: int, shape: tuple[int, int], angle: float) -> np.ndarray:
    return 0.4 * rain_layer(np.random.default_rng(seed), shape, 0.01, 14.0, angle, 1)


def test_script_writes_json_and_recovers_the_rain_it_measures(stats, tmp_path, capsys):
    root = tmp_path / "pairs"
    psnrs = []
    for i in range(3):
        clean = _clean(i)
        rainy = np.clip(clean + _layer(i, clean.shape[:2], 75.0)[..., None], 0, 1)
        write_image(root / "clean" / f"{i:03d}.png", clean)
        write_image(root / "degraded" / f"{i:03d}.png", rainy)
        q = lambda a: np.round(a * 255) / 255  # noqa: E731 (what the 8-bit PNGs hold)
        psnrs.append(10 * np.log10(1 / np.mean((q(rainy) - q(clean)) ** 2)))
    out = tmp_path / "stats" / "rain.json"
    argv = ["--real", str(root), "--photos", str(root / "clean"), "--severities", "0.5",
            "--max-images", "2", "--seed", "1", "--json", str(out)]
    assert stats.main(argv) == 0
    table = capsys.readouterr().out
    assert "| statistic | real | synthetic U(0.1, 1) | synthetic 0.5 |" in table
    assert "blend exponent" in table
    doc = json.loads(out.read_text())
    assert set(doc["summaries"]) == {"real", "synthetic U(0.1, 1)", "synthetic 0.5"}
    assert [r["name"] for r in doc["per_image"]["real"]] == ["000.png", "001.png"]  # --max-images
    real = doc["summaries"]["real"]
    assert real["images"] == 2
    assert real["psnr"] == pytest.approx(np.mean(psnrs[:2]), abs=0.01)
    assert abs(real["angle_mean"] - 75.0) < 4.0
    assert abs(real["blend_exponent"]) < 0.1 and real["chroma"] < 0.05  # additive, grey
    assert 0 < real["streak_fraction"] < 100 and real["length"] > 5
    # the same seed draws the same synthetic rain
    again = tmp_path / "again.json"
    stats.main(argv[:-1] + [str(again)])
    assert json.loads(again.read_text())["per_image"] == doc["per_image"]


def test_screen_blended_coloured_rain_is_told_apart(stats):
    clean = _clean(5)
    layer = _layer(5, clean.shape[:2], 100.0)
    additive = stats.pair_statistics(clean, np.clip(clean + layer[..., None], 0, 1))
    screened = stats.pair_statistics(clean, screen(clean.copy(), layer))
    assert abs(additive["blend_exponent"]) < 0.1 and additive["chroma"] < 0.05
    assert screened["blend_exponent"] > 0.8 and screened["chroma"] > 0.1
    assert abs(screened["angle_mean"] - 100.0) < 4.0


def test_script_needs_a_side(stats, tmp_path):
    with pytest.raises(SystemExit):
        stats.main(["--json", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="no pairs"):
        stats.main(["--real", str(tmp_path)])


def test_styles_get_a_column_each_and_blend_as_they_should(stats, tmp_path, capsys):
    photos = tmp_path / "photos"
    for i in range(2):
        write_image(photos / f"{i:03d}.png", _clean(10 + i, 96, 128))
    out = tmp_path / "styles.json"
    assert stats.main(["--photos", str(photos), "--styles", "additive,screen", "--json", str(out)]) == 0
    assert "| statistic | synthetic U(0.1, 1) | additive U(0.1, 1) | screen U(0.1, 1) |" in capsys.readouterr().out
    summaries = json.loads(out.read_text())["summaries"]
    assert abs(summaries["additive U(0.1, 1)"]["blend_exponent"]) < 0.1
    assert summaries["screen U(0.1, 1)"]["blend_exponent"] > 0.8
    with pytest.raises(SystemExit) as e:
        stats.main(["--photos", str(photos), "--styles", "drizzle"])
    assert e.value.code == 2
