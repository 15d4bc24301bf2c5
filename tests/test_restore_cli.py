"""`lmdir restore`: outputs, 16-bit and alpha round trips, and one-line errors (exit 2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import restore_fixtures

from lmdir_jax.cli import main
from lmdir_jax.data.io import load_image, write_image

H, W = 39, 47  # odd sizes; one image size (and 32-pixel tiles) for all restore/evaluate tests


tiny_clip = restore_fixtures.tiny_clip  # shared session fixture
tiny_workdir = restore_fixtures.tiny_workdir  # shared session fixture


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


def test_restore_folder_tiled_guided_skips_unreadable(tiny_workdir, tmp_path, capsys):
    src = tmp_path / "photos"
    for i in range(2):
        write_image(src / "sub" / f"p{i}.jpg", _photo(i), quality=98)
    (src / "broken.png").write_bytes(b"not an image at all")
    out = tmp_path / "restored"
    code = main(["restore", str(src), "--checkpoint", str(tiny_workdir), "--output", str(out),
                 "--tile", "32", "--tile-overlap", "8", "--tile-batch", "1",
                 "--degradation", "heavy rain", "--caption", "a city street"])
    assert code == 0
    text = capsys.readouterr().out
    assert "skipped 1 unreadable" in text and "restored 2 image(s)" in text
    assert "'heavy rain' (given)" in text and "caption 'a city street'" in text
    for i in range(2):
        got = load_image(out / "sub" / f"p{i}.png")
        assert got is not None and got.rgb.shape == (H, W, 3)
        np.testing.assert_allclose(got.rgb, load_image(src / "sub" / f"p{i}.jpg").rgb, atol=0.6 / 255)


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
