"""Training pipeline: batch layout, determinism, sharding, priors, resume; evaluation pairs."""

import numpy as np
import pytest

from lmdir_jax.config import load_config
from lmdir_jax.data.evaluation import iter_eval_pairs
from lmdir_jax.data.io import write_image
from lmdir_jax.data.pipeline import make_train_iterator, pad_to
from lmdir_jax.data.sources import FolderSource, load_source
from lmdir_jax.degradations import KINDS, Label, apply_spec, parse_spec
from lmdir_jax.errors import UsageError

P = 16


def _config(**data):
    c = load_config("tiny")
    c.data.patch_size = P
    c.data.batch_size = 4
    for k, v in data.items():
        c.data[k] = v
    return c


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean")
    rng = np.random.default_rng(0)
    for i in range(5):
        write_image(root / f"img{i}.png", rng.random((24 + 3 * i, 30, 3)))
    write_image(root / "tiny.png", rng.random((5, 7, 3)))  # smaller than the patch
    return root


@pytest.fixture(scope="module")
def source(folder):
    return load_source(folder)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    assert a.keys() == b.keys()
    diff = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not diff, (diff, a["deg_text"], b["deg_text"])


def test_batch_layout(source):
    it = make_train_iterator(_config(), source=source, process_index=0, process_count=1)
    b = next(it)
    assert set(b) == {"lq", "gt", "deg_vector", "deg_text", "key"}
    assert b["lq"].shape == b["gt"].shape == (4, P, P, 3)
    assert b["lq"].dtype == b["gt"].dtype == np.float32
    assert b["deg_vector"].shape == (4, len(KINDS)) and b["deg_vector"].dtype == np.float32
    assert b["deg_text"].shape == b["key"].shape == (4,)
    assert all(isinstance(t, str) and t for t in b["deg_text"].tolist())
    assert set(b["key"].tolist()) <= set(source.keys())
    assert 0.0 <= b["gt"].min() and b["gt"].max() <= 1.0
    assert (b["deg_vector"] > 0).any(axis=1).all()  # every example is degraded
    assert not np.array_equal(b["lq"], b["gt"])


def test_same_seed_same_batches_other_seed_differs(source):
    """Same seed, same batches, whatever grain's read-ahead (threads, batches kept ready)."""
    a = _take(make_train_iterator(_config(), source=source, process_index=0, process_count=1), 3)
    b = _take(make_train_iterator(_config(read_threads=1, prefetch=0), source=source,
                                  process_index=0, process_count=1), 3)
    for x, y in zip(a, b, strict=True):
        _same(x, y)
    c = load_config("tiny")
    c.data.patch_size, c.data.batch_size, c.seed = P, 4, 1
    other = next(make_train_iterator(c, source=source, process_index=0, process_count=1))
    assert not np.array_equal(other["gt"], a[0]["gt"])


def test_epochs_cover_every_image_and_reshuffle(source):
    it = make_train_iterator(_config(batch_size=6), source=source, process_index=0, process_count=1)
    epochs = [next(it)["key"].tolist() for _ in range(3)]  # 6 images, batch of 6 = one epoch
    assert all(sorted(e) == sorted(source.keys()) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 3  # each epoch in its own order


def test_small_images_are_reflect_padded():
    img = np.arange(5 * 7 * 3, dtype=np.float32).reshape(5, 7, 3)
    out = pad_to(img, 16)
    assert out.shape == (16, 16, 3)
    one = pad_to(np.ones((1, 3, 3), np.float32), 8)
    assert one.shape == (8, 8, 3)


def test_per_host_shards_split_the_global_batch(source):
    whole = next(make_train_iterator(_config(), source=source, process_index=0, process_count=1))
    h0 = next(make_train_iterator(_config(), source=source, process_index=0, process_count=2))
    h1 = next(make_train_iterator(_config(), source=source, process_index=1, process_count=2))
    assert h0["gt"].shape[0] == h1["gt"].shape[0] == 2
    np.testing.assert_array_equal(h0["gt"], whole["gt"][0::2])
    np.testing.assert_array_equal(h1["lq"], whole["lq"][1::2])
    with pytest.raises(UsageError):
        make_train_iterator(_config(batch_size=5), source=source, process_index=0, process_count=2)


class FakePriorCache:
    """In-memory stand-in for priors.cache.PriorCache."""

    def __init__(self, keys, ts=6, d=10, ref=40):
        rng = np.random.default_rng(0)
        self.entries = {
            k: {
                "scene_states": rng.random((ts, d), dtype=np.float32),
                "scene_mask": np.arange(ts) < 3,
                "reference": rng.random((ref, ref, 3), dtype=np.float32),
            }
            for k in keys
        }

    def get(self, key):
        return self.entries.get(key)


def test_prior_cache_attached_and_missing_counted(source):
    keys = source.keys()
    cache = FakePriorCache(keys[:-2])
    config = _config(batch_size=6)
    it = make_train_iterator(
        config, source=source, prior_cache=cache, process_index=0, process_count=1
    )
    assert sorted(it.missing_priors) == sorted(keys[-2:])
    b = next(it)
    r = config.priors.ref_size
    assert b["scene_states"].shape == (6, 6, 10) and b["scene_states"].dtype == np.float32
    assert b["scene_mask"].dtype == bool and b["reference"].shape == (6, r, r, 3)
    for i, key in enumerate(b["key"].tolist()):
        if key in cache.entries:
            assert b["has_reference"][i] and b["scene_mask"][i].sum() == 3
            np.testing.assert_array_equal(b["scene_states"][i], cache.entries[key]["scene_states"])
        else:
            assert not b["has_reference"][i] and not b["scene_mask"][i].any()
            assert not b["scene_states"][i].any() and not b["reference"][i].any()


def test_paired_source_crops_both_alike(tmp_path):
    rng = np.random.default_rng(0)
    clean = rng.random((20, 20, 3))
    write_image(tmp_path / "clean" / "a.png", clean)
    write_image(tmp_path / "degraded" / "a_rain.png", clean * 0.5)
    config = _config(augment=True, paired_text="rain")
    b = next(
        make_train_iterator(config, source=load_source(tmp_path), process_index=0, process_count=1)
    )
    np.testing.assert_allclose(b["lq"], b["gt"] * 0.5, atol=1.5 / 255)
    assert b["deg_text"].tolist() == ["rain"] * 4


def test_resume_from_state_yields_identical_batches(source):
    config = _config()
    it = make_train_iterator(config, source=source, process_index=0, process_count=1)
    _take(it, 2)
    state = it.get_state()
    expected = _take(it, 3)
    it2 = make_train_iterator(config, source=source, process_index=0, process_count=1)
    it2.set_state(state)
    for x, y in zip(expected, _take(it2, 3), strict=True):
        _same(x, y)


def test_resume_through_orbax_checkpoint(source, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    config = _config()
    it = make_train_iterator(config, source=source, process_index=0, process_count=1)
    _take(it, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.save(
            3,
            args=ocp.args.Composite(
                step=ocp.args.JsonSave({"step": 3}), data=grain.checkpoint.CheckpointSave(it)
            ),
        )
        mgr.wait_until_finished()
    expected = _take(it, 2)
    it2 = make_train_iterator(config, source=source, process_index=0, process_count=1)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mgr:
        mgr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it2)))
    for x, y in zip(expected, _take(it2, 2), strict=True):
        _same(x, y)


def test_workers_give_the_same_batches_and_resume(folder):
    source = FolderSource(folder)
    base = _take(make_train_iterator(_config(), source=source, process_index=0, process_count=1), 4)
    it = make_train_iterator(
        _config(num_workers=2), source=source, process_index=0, process_count=1
    )
    got = _take(it, 2)
    state = it.get_state()
    got += _take(it, 2)
    for x, y in zip(base, got, strict=True):
        _same(x, y)
    # batches in the process's own memory: no worker shared-memory block outlives its batch
    assert all(type(v) is np.ndarray for b in got for v in b.values())
    it.close()
    it2 = make_train_iterator(
        _config(num_workers=2), source=source, process_index=0, process_count=1
    )
    it2.set_state(state)
    for x, y in zip(base[2:], _take(it2, 2), strict=True):
        _same(x, y)


def test_bad_task_weights(source):
    c = _config()
    c.data.tasks.noise = -1.0
    with pytest.raises(UsageError):
        make_train_iterator(c, source=source, process_index=0, process_count=1)
    for bad in (dict(read_threads=0), dict(prefetch=-1)):
        with pytest.raises(UsageError, match="read_threads"):
            make_train_iterator(_config(**bad), source=source, process_index=0, process_count=1)
    for name in ("rain_additive_share", "noun_text"):
        with pytest.raises(UsageError, match=rf"data.{name} must be in \[0, 1\], got 1.5"):
            make_train_iterator(_config(**{name: 1.5}), source=source, process_index=0,
                                process_count=1)


def test_noun_text_tells_the_kinds_nouns_alone():
    """`data.noun_text` is the share of examples told only their kinds' nouns, the automatic mode's
    words ('gaussian noise'); the others keep their severity word (without random phrasing)."""
    from lmdir_jax.data.pipeline import TrainTransform

    item = {"clean": np.random.default_rng(0).random((24, 24, 3)).astype(np.float32), "key": "a"}
    texts = {}
    for share in (0.0, 0.5, 1.0):
        data = _config(noun_text=share, random_phrasing=0.0, mix_prob=0.0).data
        data.tasks = {"noise": 1.0}
        transform = TrainTransform(data)
        texts[share] = [str(transform(item, np.random.default_rng(i))["deg_text"]) for i in range(40)]
    nouns = {"gaussian noise", "poisson-gaussian noise"}
    assert set(texts[1.0]) <= nouns
    assert all(t.split(" ", 1)[1] in nouns and t.split()[0] in ("light", "moderate", "heavy")
               for t in texts[0.0])
    assert 10 < sum(t in nouns for t in texts[0.5]) < 30
    assert Label.merge([Label.single("rain", 0.9), Label.single("noise", 0.2, "gaussian")]).noun_text() == \
        "rain streaks and gaussian noise"
    assert Label.merge([]).noun_text() == "no degradation"


def test_rain_style_share_reaches_sampled_and_spec_examples():
    """`data.rain_additive_share` sets the rain style of every training example, sampled or from a
    source's fixed specs: 0 gives only the screen style, 1 only the additive one. On a one-colour
    patch the additive style adds the same light to each channel, the screen style more to the
    darker ones (degradations/rain.py)."""
    from lmdir_jax.data.pipeline import TrainTransform
    from lmdir_jax.data.sources import SourceSpec

    clean = np.empty((48, 48, 3), np.float32)
    clean[...] = (0.1, 0.4, 0.7)
    item = {"clean": clean, "key": "a"}
    specs = SourceSpec(name="rain", path=".", weight=1.0, specs=("rain:0.5", "rain:heavy"))
    for share in (0.0, 1.0):
        data = _config(rain_additive_share=share, mix_prob=0.0, patch_size=48).data
        data.tasks = {"rain": 1.0}
        for transform in (TrainTransform(data), TrainTransform(data, source=specs)):
            spread = []
            for i in range(8):
                out = transform(item, np.random.default_rng(i))
                added = out["lq"] - out["gt"]
                lit = (out["lq"].max(2) < 1.0) & (added.mean(2) > 0.02)
                spread.append((added[..., 0] - added[..., 2])[lit])
            spread = np.concatenate(spread)
            assert spread.size > 20
            if share == 1.0:
                assert np.abs(spread).max() < 1e-5
            else:
                assert spread.min() > 0


def test_eval_pairs_clean_folder_is_deterministic(folder):
    a = list(iter_eval_pairs(folder, "noise:25", seed=3, crop_multiple=8))
    b = list(iter_eval_pairs(folder, "noise:25", seed=3, crop_multiple=8, max_images=2))
    assert len(a) == 6 and len(b) == 2
    for (k1, d1, c1, lab), (k2, d2, c2, _) in zip(a, b, strict=False):
        assert k1 == k2 and np.array_equal(d1, d2) and np.array_equal(c1, c2)
        assert d1.shape == c1.shape
        assert all(n % 8 == 0 or n < 8 for n in c1.shape[:2])
        assert lab.kinds == ("noise",)
        assert 15 / 255 < np.std(d1 - c1) < 35 / 255
    c = list(iter_eval_pairs(folder, "noise:25", seed=4, max_images=1))
    assert not np.array_equal(c[0][1], a[0][1])


def test_eval_pairs_center_crop(folder):
    """The clean image is its central window (the whole image when smaller), degraded after cropping."""
    src = load_source(folder)
    shapes = []
    for i, (key, d, c, _) in enumerate(iter_eval_pairs(folder, "jpeg:30", center_crop=16)):
        full = src[i]["clean"]
        h, w = full.shape[:2]
        ch, cw = min(16, h), min(16, w)
        top, left = (h - ch) // 2, (w - cw) // 2
        assert key == src.keys()[i]
        np.testing.assert_array_equal(c, full[top : top + ch, left : left + cw])
        want, _ = apply_spec(c, parse_spec("jpeg:30"), np.random.default_rng([0, i]))
        np.testing.assert_array_equal(d, want)
        shapes.append(c.shape)
    assert len(shapes) == len(src) and (16, 16, 3) in shapes and (5, 7, 3) in shapes  # tiny.png whole


def test_eval_pairs_paired_and_misuse(tmp_path, folder):
    rng = np.random.default_rng(0)
    write_image(tmp_path / "clean" / "0001.png", rng.random((10, 12, 3)))
    write_image(tmp_path / "degraded" / "0001_0.8_0.2.png", rng.random((10, 12, 3)))
    pairs = list(iter_eval_pairs(tmp_path))
    assert len(pairs) == 1 and pairs[0][0] == "degraded/0001_0.8_0.2.png" and pairs[0][3] is None
    with pytest.raises(UsageError):
        list(iter_eval_pairs(tmp_path, "noise:25"))
    with pytest.raises(UsageError):
        list(iter_eval_pairs(folder))
    with pytest.raises(UsageError):
        list(iter_eval_pairs(folder, "bogus:3"))


@pytest.mark.slow
def test_two_worker_training_leaks_no_shared_memory(tmp_path):
    """`lmdir train` with two grain worker processes ends without Python's resource_tracker
    reporting leaked shared_memory objects (the workers' batch blocks are all released)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(repo), JAX_PLATFORMS="cpu",
               XLA_FLAGS=os.environ.get("LMDIR_TEST_XLA_FLAGS", ""))
    cmd = [sys.executable, "-m", "lmdir_jax.cli", "train", "--config", "tiny", "--workdir",
           str(tmp_path / "wd"), "--no-progress", "--config.data.num_workers=2",
           "--config.train.steps=6"]  # with the end-of-run plots, which hold the last batch
    r = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "leaked shared_memory" not in r.stderr, r.stderr[-3000:]
