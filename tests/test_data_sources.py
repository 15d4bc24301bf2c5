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


def _tiny_tfds_dataset(data_dir):
    """Build a real 3-image TFDS dataset (array_record, no TensorFlow needed) under data_dir."""
    import tensorflow_datasets as tfds

    class LmdirTinyImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            image = tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding="zlib")
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"image": image}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(3):
                yield i, {"image": _tfds_image(i)}

    LmdirTinyImages(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    tfds.core.add_data_dir(str(data_dir))  # `tfds:NAME:SPLIT` finds it like any prepared dataset


def _tfds_image(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)


def test_tfds_source_reads_a_real_prepared_dataset(tmp_path):
    """A TFDS dataset built here (tensorflow-datasets is the `tfds` extra, installed in CI) is read
    through `tfds.data_source`, image for image, and feeds the training pipeline."""
    pytest.importorskip("tensorflow_datasets", reason="needs the tfds extra (scripts/test.sh installs it)")
    from lmdir_jax.config import load_config
    from lmdir_jax.data.pipeline import make_train_iterator

    _tiny_tfds_dataset(tmp_path / "tfds")
    src = load_source("tfds:lmdir_tiny_images:train")
    assert len(src) == 3 and src.name == "tfds:lmdir_tiny_images:train"
    for i in range(3):
        item = src[i]
        assert item["key"] == f"lmdir_tiny_images/train/{i}"
        np.testing.assert_array_equal(item["clean"], _tfds_image(i).astype(np.float32) / 255.0)
    config = load_config("tiny", ["config.data.source=tfds:lmdir_tiny_images:train",
                                  "config.data.patch_size=16", "config.data.batch_size=4"])
    batch = next(make_train_iterator(config))
    assert batch["gt"].shape == (4, 16, 16, 3) and batch["lq"].shape == (4, 16, 16, 3)
    assert {str(k).rsplit("/", 1)[0] for k in batch["key"]} == {"lmdir_tiny_images/train"}
    with pytest.raises(UsageError, match="cannot open"):
        load_source("tfds:lmdir_tiny_images:validation")




def test_data_check_counts_what_the_loader_will_skip(tmp_path, capsys):
    """`lmdir data check` decodes files as the loader does: a truncated JPEG whose header parses is
    counted and named, where a header-only check (what `lmdir train` runs first) misses it."""
    from lmdir_jax.cli import main
    from lmdir_jax.data.check import check_folder

    _make_bad_files(tmp_path)
    write_image(tmp_path / "good.png", _img(2))
    header = check_folder("train", str(tmp_path), decode="header")
    assert header.unreadable == 2 and header.unreadable_files == ["empty.png", "notes.jpg"]
    for decode in ("auto", "full"):
        rep = check_folder("train", str(tmp_path), decode=decode)
        assert rep.unreadable == load_source(tmp_path).num_unreadable == 3 and not rep.problems
    assert main(["data", "check", "--config", "tiny", f"--config.data.source={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "train: 3 unreadable file(s) will be skipped: empty.png, notes.jpg, truncated.jpg" in out
    assert "no problem" in out
