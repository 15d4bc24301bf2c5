"""`lmdir restore`: quality of a trained network's output, 16-bit and alpha round trips, output
safety, and one-line errors (exit 2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import restore_fixtures

from lmdir_jax.cli import main
from lmdir_jax.data.io import load_image, write_image

H, W = 39, 47  # odd sizes; one image size (and 32-pixel tiles) for all restore/evaluate tests
# The trained fixture on 48x48 noisy (sigma 25) held-out crops, tiled: blind gains 0.24-0.39 dB over
# the input, told 'noise' gains 0.93-1.08 dB (measured on this code; the checks leave room).
MIN_GAIN_DB = 0.1
MIN_GUIDANCE_GAIN_DB = 0.3


tiny_clip = restore_fixtures.tiny_clip  # shared session fixture
tiny_workdir = restore_fixtures.tiny_workdir  # shared session fixture (the identity network)
trained_workdir = restore_fixtures.trained_workdir  # shared session fixture (trained, cached)
trained_clip = restore_fixtures.trained_clip


def _photo(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:H, 0:W] / max(H, W)
    base = np.stack([x, y, 0.5 * (x + y)], axis=-1)
    return np.clip(base + 0.05 * rng.standard_normal((H, W, 3)), 0, 1).astype(np.float32)


def _err(capsys) -> str:
    return capsys.readouterr().err.strip()


def test_restore_file_16bit_and_rgba(tiny_workdir, tmp_path, capsys):
    src = tmp_path / "in"
    img16 = _photo(0)
    write_image(src / "deep.png", img16, bit_depth=16)
    alpha = np.linspace(0, 1, H * W, dtype=np.float32).reshape(H, W)
    write_image(src / "cut.png", _photo(1), alpha=alpha)
    out = tmp_path / "out"
    code = main(["restore", str(src / "deep.png"), str(src / "cut.png"),
                 "--checkpoint", str(tiny_workdir), "--output", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "(auto, p=" in printed  # the automatic degradation prior and its probability
    deep = load_image(out / "deep.png")
    assert deep.bit_depth == 16 and deep.alpha is None
    # the untrained tiny network is the identity: 16 bits survive the round trip
    np.testing.assert_allclose(deep.rgb, load_image(src / "deep.png").rgb, atol=1.5 / 65535)
    cut = load_image(out / "cut.png")
    assert cut.bit_depth == 8 and cut.alpha is not None
    np.testing.assert_allclose(cut.alpha, load_image(src / "cut.png").alpha, atol=0.6 / 255)
    np.testing.assert_allclose(cut.rgb, load_image(src / "cut.png").rgb, atol=0.6 / 255)


def _psnr(path, clean) -> float:
    from lmdir_jax.metrics import psnr

    return psnr(load_image(path).rgb, clean)


def test_trained_restore_beats_the_input_and_guidance_beats_blind(trained_workdir, tmp_path, capsys, caplog):
    """Noisy crops of photos the network never saw: restored > input (tiled folder run, with an
    unreadable file skipped and named), and told 'noise' > blind."""
    clean_paths = restore_fixtures.heldout_crops(tmp_path / "clean", 2)
    src = tmp_path / "photos"
    cleans, text = [], ""
    for i, p in enumerate(clean_paths):
        clean = load_image(p).rgb
        lq, text = restore_fixtures.degraded_copy(clean, "noise:25", seed=i)
        write_image(src / "sub" / f"p{i}.png", lq)
        cleans.append(clean)
    (src / "broken.png").write_bytes(b"not an image at all")
    runs = {"guided": ["--degradation", text, "--caption", "a photo"], "blind": ["--blind"]}
    for name, extra in runs.items():
        code = main(["restore", str(src), "--checkpoint", str(trained_workdir),
                     "--output", str(tmp_path / name), "--tile", "32", "--tile-overlap", "8", *extra])
        assert code == 0
        out = capsys.readouterr().out
        assert "restored 2 image(s)" in out and f"skipped 1 unreadable file(s): {src / 'broken.png'}" in caplog.text
        caplog.clear()
    assert f"'{text}' (given)" not in out and "degradation prior masked" in out
    scores = {name: [_psnr(folder / "sub" / f"p{i}.png", c) for i, c in enumerate(cleans)]
              for name, folder in (("input", src), ("blind", tmp_path / "blind"),
                                   ("guided", tmp_path / "guided"))}
    assert all(b > i + MIN_GAIN_DB for i, b in zip(scores["input"], scores["blind"], strict=True)), scores
    assert np.mean(scores["guided"]) > np.mean(scores["blind"]) + MIN_GUIDANCE_GAIN_DB, scores


def test_restore_exits_1_naming_every_file_when_nothing_is_restored(trained_workdir, tmp_path, capsys,
                                                                   caplog):
    src = tmp_path / "junk"
    src.mkdir()
    for i in range(6):
        (src / f"bad{i}.jpg").write_bytes(b"\xff\xd8 truncated")
    assert main(["restore", str(src), "--checkpoint", str(trained_workdir),
                 "--output", str(tmp_path / "out")]) == 1
    captured = capsys.readouterr()
    assert all(str(src / f"bad{i}.jpg") in caplog.text for i in range(6))  # the warning line
    assert "no image could be restored" in captured.err and not (tmp_path / "out").exists()


def test_grayscale_input_comes_back_grayscale(trained_workdir, tmp_path):
    clean = load_image(restore_fixtures.heldout_crops(tmp_path / "c", 1)[0]).rgb
    write_image(tmp_path / "gray.png", clean @ np.array([0.299, 0.587, 0.114], np.float32))
    assert main(["restore", str(tmp_path / "gray.png"), "--checkpoint", str(trained_workdir),
                 "--output", str(tmp_path / "o"), "--blind"]) == 0
    out = load_image(tmp_path / "o" / "gray.png")
    assert out.grayscale  # one channel: no colour tint


def test_no_reference_and_missing_clip(trained_workdir, tmp_path, capsys):
    """--no-reference is the default (same output, 'no reference'); a missing --clip folder and
    --reference with --no-reference are one-line errors."""
    write_image(tmp_path / "a.png", _photo(7))
    base = ["restore", str(tmp_path / "a.png"), "--checkpoint", str(trained_workdir), "--blind"]
    assert main([*base, "--output", str(tmp_path / "o1")]) == 0
    assert main([*base, "--output", str(tmp_path / "o2"), "--no-reference"]) == 0
    assert "no reference" in capsys.readouterr().out
    np.testing.assert_array_equal(load_image(tmp_path / "o1" / "a.png").rgb,
                                  load_image(tmp_path / "o2" / "a.png").rgb)
    for extra, needle in [(["--clip", str(tmp_path / "no-clip")], "CLIP"),
                          (["--reference", str(tmp_path / "a.png"), "--no-reference"], "not allowed")]:
        assert main([*base, "--output", str(tmp_path / "o3"), *extra]) == 2
        err = _err(capsys)
        assert err.splitlines()[-1].startswith("lmdir") and needle in err, err
    assert not (tmp_path / "o3").exists()


def test_restore_glob_with_reference(tiny_workdir, tmp_path, capsys):
    write_image(tmp_path / "a.png", _photo(3))
    write_image(tmp_path / "ref.jpg", _photo(4)[:20])
    code = main(["restore", str(tmp_path / "*.png"), "--checkpoint", str(tiny_workdir),
                 "--output", str(tmp_path / "o"), "--reference", str(tmp_path / "ref.jpg")])
    assert code == 0
    assert "reference image" in capsys.readouterr().out
    assert (tmp_path / "o" / "a.png").is_file()


def test_restore_errors_are_one_line(tiny_workdir, tmp_path, capsys):
    img = tmp_path / "x.png"
    write_image(img, _photo(5))
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "fake.png").write_bytes(b"\x89PNG broken")
    cases = [
        (["restore", str(img), "--checkpoint", str(tmp_path / "nope"), "--output", str(tmp_path / "o")],
         "no checkpoint"),
        (["restore", str(tmp_path / "notes.txt"), "--checkpoint", str(tiny_workdir),
          "--output", str(tmp_path / "o")], "not an image"),
        (["restore", str(tmp_path / "fake.png"), "--checkpoint", str(tiny_workdir),
          "--output", str(tmp_path / "o")], "not an image"),
        (["restore", str(img), "--checkpoint", str(tiny_workdir), "--output", str(tmp_path)],
         "is, or contains, the input"),
        (["restore", str(tmp_path / "missing.png"), "--checkpoint", str(tiny_workdir),
          "--output", str(tmp_path / "o")], "no such file"),
        (["restore", str(img), "--checkpoint", str(tiny_workdir), "--output", str(tmp_path / "o"),
          "--tile", "16", "--tile-overlap", "8"], "more than twice"),
        (["restore", str(img), "--checkpoint", str(tiny_workdir), "--output", str(img / "sub")],
         "is a file, not a folder"),
        (["restore", str(img), "--checkpoint", str(tiny_workdir), "--output", str(tmp_path / "o"),
          "--degradation", ""], "--degradation needs a text"),
        (["restore", str(img), "--checkpoint", str(tiny_workdir), "--output", str(tiny_workdir)],
         "is, or contains, the input"),
        (["restore", str(img), "--checkpoint", str(tiny_workdir),
          "--output", str(tiny_workdir.parent)], "is, or contains, the input"),
    ]
    before = img.read_bytes()
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = _err(capsys)
        assert err.startswith("lmdir: error:") and needle in err and "\n" not in err, err
    assert img.read_bytes() == before
    assert not (tmp_path / "o").exists()


def test_plan_outputs_refuses_collisions(tmp_path):
    from lmdir_jax.commands.restore import collect_inputs, plan_outputs
    from lmdir_jax.errors import UsageError

    write_image(tmp_path / "a.png", _photo(6))
    write_image(tmp_path / "a.jpg", _photo(6))
    items = collect_inputs([str(tmp_path)])
    try:
        plan_outputs(items, tmp_path / "out")
    except UsageError as e:
        assert "both be written" in str(e)
    else:
        raise AssertionError("two inputs mapping to one output must be refused")
    outs = plan_outputs(collect_inputs([str(tmp_path / "a.jpg")]), tmp_path)
    assert outs == [tmp_path / "a.png"] and Path(outs[0]).suffix == ".png"
