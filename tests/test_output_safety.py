"""Output paths are checked before any work; an output folder never is, or contains, an input;
grayscale images stay grayscale. (The restore/evaluate cases with a checkpoint are in
test_restore_cli.py and test_evaluate.py.)"""

from __future__ import annotations

import numpy as np
import pytest

from lmdir_jax.cli import main
from lmdir_jax.data.io import load_image, write_image
from lmdir_jax.errors import UsageError
from lmdir_jax.outputs import check_output_file, check_output_folder


def test_output_folder_that_is_or_contains_an_input_is_refused(tmp_path):
    photos = tmp_path / "photos"
    write_image(photos / "a.png", np.zeros((4, 4, 3)))
    for bad in (photos, tmp_path):  # is / contains the input
        with pytest.raises(UsageError, match="is, or contains"):
            check_output_folder(bad, [photos / "a.png"])
    with pytest.raises(UsageError, match="is, or contains"):
        check_output_folder(tmp_path, [photos])  # an input folder (a checkpoint workdir)
    assert check_output_folder(photos / "out", [photos / "a.png"]) == photos / "out"
    with pytest.raises(UsageError, match="not a file"):
        check_output_folder(photos / "a.png")
    with pytest.raises(UsageError, match="is a file, not a folder"):
        check_output_folder(photos / "a.png" / "sub")


def test_output_file_checks(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(UsageError, match="is a file, not a folder"):
        check_output_file(tmp_path / "f.txt" / "r.json", flag="--json")
    with pytest.raises(UsageError, match="is a folder"):
        check_output_file(tmp_path, flag="--csv")
    with pytest.raises(UsageError, match="overwrite the input"):
        check_output_file(tmp_path / "f.txt", [tmp_path / "f.txt"])
    assert check_output_file(tmp_path / "new" / "deep" / "r.json") == tmp_path / "new" / "deep" / "r.json"


def test_degrade_names_every_skipped_file_and_exits_1_when_none_is_read(tmp_path, capsys, caplog):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(7):
        (src / f"bad{i}.png").write_bytes(b"not an image")
    assert main(["degrade", str(src), "--spec", "noise:25", "-o", str(tmp_path / "out")]) == 1
    captured = capsys.readouterr()
    assert all(f"bad{i}.png" in caplog.text for i in range(7))  # every one, not the first five
    assert captured.err.strip().splitlines()[-1].startswith("lmdir: error: no input image")


def test_grayscale_stays_grayscale(tmp_path, capsys):
    """A grayscale file comes back grayscale: one channel, no colour tint (io + degrade)."""
    rng = np.random.default_rng(0)
    gray = rng.random((24, 20)).astype(np.float32)
    write_image(tmp_path / "g.png", gray)
    write_image(tmp_path / "c.png", rng.random((24, 20, 3)))
    loaded = load_image(tmp_path / "g.png")
    assert loaded.grayscale and not load_image(tmp_path / "c.png").grayscale
    tinted = loaded.rgb * np.array([1.0, 0.9, 0.8], np.float32)  # what a network might return
    write_image(tmp_path / "out.png", tinted, grayscale=True)
    back = load_image(tmp_path / "out.png")
    assert back.grayscale
    np.testing.assert_allclose(back.rgb[..., 0], tinted @ np.array([0.299, 0.587, 0.114]), atol=0.6 / 255)
    # gray + alpha: equal colour channels beside the alpha
    write_image(tmp_path / "ga.png", tinted, alpha=np.full((24, 20), 0.5), grayscale=True)
    ga = load_image(tmp_path / "ga.png")
    assert ga.alpha is not None and np.array_equal(ga.rgb[..., 0], ga.rgb[..., 2])
    assert main(["degrade", str(tmp_path / "g.png"), "--spec", "rain", "-o", str(tmp_path / "d")]) == 0
    assert load_image(tmp_path / "d" / "g.png").grayscale


def test_every_command_refuses_bad_output_paths_and_seeds_in_one_line(tmp_path, capsys):
    """Outputs under a file, a report over its own inputs, and negative seeds: exit 2 with one line
    before any work (they were tracebacks), and the file in the way is left as it was."""
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me")
    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "config.json").write_text("{}")
    under = str(blocker / "sub")
    cases = [
        (["priors", "make-tiny", str(blocker)], "must be a folder, not a file"),
        (["priors", "make-tiny", under], "is a file, not a folder"),
        (["priors", "build", "--data", "skimage", "--clip", str(wd), "--output", under], "is a file"),
        (["priors", "classify", "--clip", str(wd), "--data", "skimage", "--spec", "noise",
          "--json", under], "is a file"),
        (["priors", "train-controller", "--clip", str(wd), "--workdir", under], "is a file"),
        (["data", "preview", "--config", "tiny", "--output", under], "is a file"),
        (["data", "preview", "--config", "tiny", "--output", str(tmp_path / "grid.gif")], "cannot write"),
        (["report", "--workdir", str(wd), "--output", under], "is a file"),
        (["report", "--workdir", str(wd), "--output", str(wd / "config.json")], "overwrite the input"),
        (["export", "torch", "--checkpoint", str(wd), "--output", under, "--no-check"], "is a file"),
        (["export", "torch", "--checkpoint", str(wd), "--output", str(blocker), "--force", "--no-check"],
         "must be a folder"),
        (["export", "onnx", "--checkpoint", str(wd), "--output", under + ".onnx", "--no-check"], "is a file"),
        (["model", "convert", "--checkpoint", str(wd), "--output", under, "--scan-blocks", "true"],
         "is a file"),
        (["degrade", str(blocker), "--spec", "noise", "-o", str(tmp_path / "d"), "--seed", "-1"],
         "--seed: must be >= 0"),
        (["evaluate", "--checkpoint", str(wd), "--data", "skimage", "--spec", "noise", "--seed", "-2"],
         "--seed: must be >= 0"),
        (["train", "--config", "tiny", "--workdir", str(tmp_path / "t"), "--config.seed=-1"],
         "config.seed must be >= 0"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err and "Traceback" not in err, (argv, err)
    assert blocker.read_text() == "keep me" and (wd / "config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "wd"]  # nothing written



def test_export_force_replaces_an_export_and_never_deletes_other_files(tmp_path, capsys):
    """`lmdir export torch --force` into a folder holding anything but a previous export's three
    files is refused (it used to delete the whole folder first); `export onnx --force` replaces
    only an .onnx file."""
    from lmdir_jax.export.convert import _prepare_output

    wd = tmp_path / "wd"
    wd.mkdir()
    (wd / "config.json").write_text("{}")
    photos = tmp_path / "photos"
    write_image(photos / "holiday.png", np.zeros((4, 4, 3)))
    (photos / "config.json").write_text("mine")
    argv = ["export", "torch", "--checkpoint", str(wd), "--output", str(photos), "--no-check"]
    for extra in ([], ["--force"]):
        assert main(argv + extra) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and ("--force" in err if not extra else "holiday.png" in err), err
    assert main(["export", "onnx", "--checkpoint", str(wd), "--output", str(photos / "holiday.png"),
                 "--force", "--no-check"]) == 2
    assert "not an .onnx file" in capsys.readouterr().err
    assert sorted(p.name for p in photos.iterdir()) == ["config.json", "holiday.png"]
    previous = tmp_path / "export"
    previous.mkdir()
    for name in ("model.safetensors", "config.json", "README.md"):
        (previous / name).write_text("old")
    with pytest.raises(UsageError, match="not empty"):
        _prepare_output(previous, force=False)
    _prepare_output(previous, force=True)  # a previous export: its files go, the folder stays
    assert previous.is_dir() and not any(previous.iterdir())


def test_writes_are_whole_or_not_at_all(tmp_path, monkeypatch):
    """Images, reports and JSON go through `atomic_write_bytes`: a write that dies half-way leaves
    the previous file as it was and no temporary file behind."""
    import os

    from lmdir_jax.outputs import atomic_write_bytes

    path = write_image(tmp_path / "a.png", np.zeros((4, 4, 3)))
    before = path.read_bytes()

    def killed(src, dst):
        raise KeyboardInterrupt  # e.g. Ctrl-C between writing and renaming

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_image(path, np.ones((4, 4, 3)))
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(tmp_path / "r.json", b"{}")
    monkeypatch.undo()
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]
    assert atomic_write_bytes(tmp_path / "r.json", b"{}", fsync=True).read_bytes() == b"{}"
    write_image(path, np.ones((4, 4, 3)))
    assert load_image(path).rgb.min() == 1.0 and sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "r.json"]


def test_console_warnings_read_like_the_cli_errors(capsys):
    """Under the console script a skipped file is an `lmdir: warning: ...` line on stderr (not the
    root logger's `WARNING:lmdir_jax.data:` format some library set up)."""
    import logging

    from lmdir_jax.cli import log_to_stderr

    log = logging.getLogger("lmdir_jax")
    handlers, propagate = list(log.handlers), log.propagate
    try:
        log_to_stderr()
        log_to_stderr()  # once only
        logging.getLogger("lmdir_jax.data").warning("photos: skipped %d unreadable file(s): %s", 1, "b.png")
        assert capsys.readouterr().err == "lmdir: warning: photos: skipped 1 unreadable file(s): b.png\n"
    finally:
        log.handlers[:], log.propagate = handlers, propagate


def _lmdir_lines(err: str) -> list[str]:
    """The command's own lines on stderr (without the progress bar's)."""
    return [line for line in err.splitlines() if line.startswith("lmdir:")]


def _photos(root, n=4):
    rng = np.random.default_rng(1)
    for i in range(n):
        write_image(root / f"p{i}.png", rng.random((16, 12, 3)))
    return root


def test_a_refused_permission_is_reported_as_one_not_as_an_unreadable_image(tmp_path, monkeypatch, capsys):
    """A file the user may not read stops the command with exit 1 and one line naming the file."""
    import builtins

    import lmdir_jax.data.io as io_mod

    src = _photos(tmp_path / "in")
    locked = src / "p2.png"

    def guarded_open(path, *args, **kwargs):
        if str(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(path))
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(io_mod, "open", guarded_open, raising=False)
    assert main(["degrade", str(src), "--spec", "noise:25", "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert _lmdir_lines(err) == [f"lmdir: error: permission denied: cannot read {locked}"]
    assert "unreadable" not in err


def test_a_folder_that_may_not_be_listed_is_reported_not_left_out(tmp_path, monkeypatch, capsys):
    import os

    src = _photos(tmp_path / "in")
    _photos(src / "private", 2)
    real_scandir = os.scandir

    def guarded_scandir(path="."):
        if os.fspath(path) == str(src / "private"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", guarded_scandir)
    assert main(["degrade", str(src), "--spec", "noise:25", "-o", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err == f"lmdir: error: permission denied: cannot list the folder {src / 'private'}\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() == 0,
                    reason="root reads any file whatever its mode")
def test_an_unreadable_mode_is_a_permission_error(tmp_path, capsys):
    src = _photos(tmp_path / "in")
    (src / "p1.png").chmod(0)
    try:
        assert main(["degrade", str(src), "--spec", "noise:25", "-o", str(tmp_path / "out")]) == 1
    finally:
        (src / "p1.png").chmod(0o644)
    assert "permission denied" in capsys.readouterr().err


def test_degrade_interrupted_leaves_no_label_file_and_resumes(tmp_path, monkeypatch, capsys):
    """labels.jsonl is written whole at the end: an interrupted run leaves none (nor an old one);
    the rerun skips the images already written and ends with the files of an uninterrupted run."""
    import lmdir_jax.data.io as io_mod

    src = _photos(tmp_path / "in", 5)
    args = ["degrade", str(src), "--spec", "rain+noise:10", "--seed", "2", "-o"]
    assert main([*args, str(tmp_path / "once")]) == 0
    expected = {p.name: p.read_bytes() for p in (tmp_path / "once").iterdir()}

    out = tmp_path / "out"
    out.mkdir()
    (out / "labels.jsonl").write_text('{"stale": true}\n')
    real_write, calls = io_mod.write_image, []

    def write_then_stop(path, *a, **kw):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(path)
        return real_write(path, *a, **kw)

    monkeypatch.setattr(io_mod, "write_image", write_then_stop)
    assert main([*args, str(out)]) == 130
    assert sorted(p.name for p in out.iterdir()) == ["labels.partial.jsonl", "p0.png", "p1.png", "p2.png"]
    monkeypatch.setattr(io_mod, "write_image", real_write)
    written = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert main([*args, str(out)]) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == expected
    assert all(out.joinpath(n).stat().st_mtime_ns == t for n, t in written.items())  # not redone


def test_package_warnings_are_one_line_on_stderr_under_the_console_script(tmp_path, capsys):
    """A skipped file in `lmdir degrade` is one `lmdir: warning: ...` line on stderr."""
    import logging

    from lmdir_jax.cli import log_to_stderr

    src = _photos(tmp_path / "in", 2)
    (src / "bad.png").write_bytes(b"not an image")
    log = logging.getLogger("lmdir_jax")
    handlers, propagate = list(log.handlers), log.propagate
    try:
        log_to_stderr()
        assert main(["degrade", str(src), "--spec", "noise:25", "-o", str(tmp_path / "out")]) == 0
    finally:
        log.handlers[:], log.propagate = handlers, propagate
    err = capsys.readouterr().err  # the progress bar's lines aside
    assert _lmdir_lines(err) == [f"lmdir: warning: skipped 1 unreadable file(s): {src / 'bad.png'}"]
