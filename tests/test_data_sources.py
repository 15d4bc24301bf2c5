"""Data sources: skimage, clean folders, paired folders, tfds, and folders with bad files."""

import logging

import numpy as np
import pytest

from lmdir_jax.data.io import write_image
from lmdir_jax.data.sources import (
    SKIMAGE_NAMES,
    FolderSource,
    PairedSource,
    load_source,
    match_pairs,
)
from lmdir_jax.errors import UsageError


def _img(seed, h=20, w=24):
    return np.random.default_rng(seed).random((h, w, 3)).astype(np.float32)


def _make_bad_files(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("this is text, not a JPEG")
    write_image(folder / "ok_tmp.jpg", _img(9, 64, 64))
    data = (folder / "ok_tmp.jpg").read_bytes()
    (folder / "ok_tmp.jpg").unlink()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])


def test_skimage_heldout_photos_are_not_training_photos():
    """The quick start's sample and fallback evaluation use photos the model never trained on."""
    from lmdir_jax.data.sources import SKIMAGE_HELDOUT_NAMES, is_named_source

    held = load_source("skimage-heldout")
    assert held.name == "skimage-heldout" and is_named_source("skimage-heldout")
    assert held.keys() == list(SKIMAGE_HELDOUT_NAMES) and "coffee" in held.keys()
    assert not set(held.keys()) & set(load_source("skimage").keys())
    assert held[0]["clean"].ndim == 3 and held[0]["clean"].shape[2] == 3


def test_skimage_source_is_local_and_stable():
    src = load_source("skimage")
    assert len(src) == len(SKIMAGE_NAMES) >= 6
    item = src[1]
    assert item["key"] == SKIMAGE_NAMES[1]
    assert item["clean"].dtype == np.float32 and item["clean"].shape[2] == 3
    assert 0.0 <= item["clean"].min() and item["clean"].max() <= 1.0
    assert np.array_equal(src[1]["clean"], item["clean"])
    with pytest.raises(IndexError):
        src[len(src)]


def test_folder_source_recursive_keys(tmp_path):
    write_image(tmp_path / "b.png", _img(0))
    write_image(tmp_path / "sub" / "a.jpg", _img(1))
    (tmp_path / "readme.txt").write_text("ignored")
    src = load_source(tmp_path)
    assert isinstance(src, FolderSource)
    assert src.keys() == ["b.png", "sub/a.jpg"]
    assert src[1]["key"] == "sub/a.jpg" and src[1]["clean"].shape == (20, 24, 3)


def test_folder_skips_bad_files_and_reports_once(tmp_path, caplog):
    _make_bad_files(tmp_path)
    write_image(tmp_path / "good.png", _img(2))
    with caplog.at_level(logging.WARNING, logger="lmdir_jax.data"):
        src = load_source(tmp_path)
    assert src.keys() == ["good.png"]
    assert src.num_unreadable == 3
    records = [r for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(records) == 1
    msg = records[0].getMessage()
    assert "3 unreadable" in msg and "empty.png" in msg and "truncated.jpg" in msg


def test_folder_of_only_bad_files_is_a_usage_error(tmp_path):
    _make_bad_files(tmp_path)
    with pytest.raises(UsageError) as e:
        load_source(tmp_path)
    assert "no usable image" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("spec", ["", "/no/such/folder", "tfds:onlyname"])
def test_bad_specs(spec):
    with pytest.raises(UsageError):
        load_source(spec)


def test_empty_folder_and_file_spec(tmp_path):
    with pytest.raises(UsageError, match="no image files"):
        load_source(tmp_path)
    write_image(tmp_path / "a.png", _img(0))
    with pytest.raises(UsageError, match="must be a folder"):
        load_source(tmp_path / "a.png")


def test_match_pairs_by_stem_and_prefix():
    pairs, lone_d, lone_c = match_pairs(
        ["0001_0.8_0.2.jpg", "0002.png", "x_rain.png", "zzz.png", "0010_1.jpg"],
        ["0001.png", "0002.png", "x.png", "0010.png", "0100.png", "unused.png"],
    )
    assert ("0001_0.8_0.2.jpg", "0001.png") in pairs
    assert ("0002.png", "0002.png") in pairs
    assert ("x_rain.png", "x.png") in pairs
    assert ("0010_1.jpg", "0010.png") in pairs  # not 0100
    assert lone_d == ["zzz.png"]
    assert lone_c == ["0100.png", "unused.png"]


def test_paired_folder_names_unmatched_files(tmp_path, caplog):
    for name in ("0001_0.8_0.2.jpg", "0002_0.9_0.1.jpg", "orphan.png"):
        write_image(tmp_path / "degraded" / name, _img(1))
    for name in ("0001.png", "0002.png", "lonely.png"):
        write_image(tmp_path / "clean" / name, _img(2))
    with caplog.at_level(logging.WARNING, logger="lmdir_jax.data"):
        src = load_source(tmp_path)
    assert isinstance(src, PairedSource) and len(src) == 2
    assert src.keys() == ["degraded/0001_0.8_0.2.jpg", "degraded/0002_0.9_0.1.jpg"]
    assert sorted(src.unmatched) == ["clean/lonely.png", "degraded/orphan.png"]
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "orphan.png" in msg and "lonely.png" in msg
    item = src[0]
    assert set(item) == {"key", "clean", "degraded"}
    assert item["clean"].shape == item["degraded"].shape


def test_paired_folder_without_any_match(tmp_path):
    write_image(tmp_path / "degraded" / "a.png", _img(1))
    write_image(tmp_path / "clean" / "b.png", _img(2))
    with pytest.raises(UsageError, match="no matching"):
        load_source(tmp_path)


def test_sots_sample(shared_data):
    src = load_source(shared_data / "test" / "SOTS-outdoor-sample")
    assert len(src) == 2 and src.unmatched == []
    assert src[0]["degraded"].shape == src[0]["clean"].shape


def test_source_pickles_without_its_cache(tmp_path):
    import pickle

    write_image(tmp_path / "a.png", _img(0))
    src = load_source(tmp_path)
    src[0]
    back = pickle.loads(pickle.dumps(src))
    assert back._cache.data == {} and np.array_equal(back[0]["clean"], src[0]["clean"])


def test_tfds_mock_source():
    tfds = pytest.importorskip("tensorflow_datasets")
    try:
        with tfds.testing.mock_data(num_examples=3):
            src = load_source("tfds:mnist:train")
            item = src[2]
    except Exception as e:  # noqa: BLE001 - mock_data needs pieces that may be absent here
        pytest.skip(f"tfds mock data unavailable: {type(e).__name__}: {e}")
    assert len(src) == 3 and item["key"] == "mnist/train/2"
    assert item["clean"].ndim == 3 and item["clean"].shape[2] == 3
