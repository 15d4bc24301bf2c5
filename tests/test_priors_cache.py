"""Prior cache: build, interrupted + resumed == one run, captions file, half-written items, references."""

import json
import pickle

import numpy as np
import pytest

from lmdir_jax.data.io import write_image
from lmdir_jax.errors import UsageError
from lmdir_jax.priors.cache import INDEX, ITEMS, PriorCache, build_cache, item_file
from lmdir_jax.priors.clip import load_clip


@pytest.fixture(scope="module")
def clip(clip_dir):
    return load_clip(clip_dir, max_text_len=12)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for i in range(5):
        write_image(root / f"sub/im{i}.png", rng.random((20 + i, 24, 3)).astype(np.float32))
    return root


def _build(images, clip, out, **kw):
    kw.setdefault("batch_size", 2)
    return build_cache(str(images), "", out, clip=clip, progress=False, **kw)


def _snapshot(path):
    cache = PriorCache(path)
    return {k: cache.get(k) for k in sorted(cache.keys())}


def test_build_and_read(images, clip, tmp_path):
    summary = _build(images, clip, tmp_path / "c")
    assert summary["items"] == 5 and summary["captions_zero_shot"] == 5 and summary["references"] == 0
    cache = pickle.loads(pickle.dumps(PriorCache(tmp_path / "c")))
    assert sorted(cache.keys()) == [f"sub/im{i}.png" for i in range(5)]
    item = cache.get("sub/im3.png")
    assert item["scene_states"].shape == (12, 32) and item["scene_mask"].shape == (12,)
    n = item["scene_mask"].sum()
    states, mask = clip.encode_text([item["caption"]])
    np.testing.assert_array_equal(item["scene_mask"], mask[0])
    np.testing.assert_allclose(item["scene_states"][:n], states[0, :n], atol=1e-6)
    assert not item["scene_states"][n:].any()  # padding is zeros (masked)
    assert item["has_reference"] is False and item["reference"].shape == (64, 64, 3)
    assert cache.get("nope.png") is None and cache.missing == 1


def test_interrupted_build_resumes_to_the_same_cache(images, clip, tmp_path):
    _build(images, clip, tmp_path / "one")

    def stop(done):
        if done >= 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _build(images, clip, tmp_path / "two", on_batch=stop)
    assert len(PriorCache(tmp_path / "two")) == 2  # the first batch is whole and readable
    summary = _build(images, clip, tmp_path / "two")
    assert summary["resumed_items"] == 2 and summary["items"] == 5
    a, b = _snapshot(tmp_path / "one"), _snapshot(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k]["caption"] == b[k]["caption"]
        np.testing.assert_array_equal(a[k]["scene_states"], b[k]["scene_states"])
        np.testing.assert_array_equal(a[k]["scene_mask"], b[k]["scene_mask"])


def test_half_written_items_are_never_read(images, clip, tmp_path):
    out = tmp_path / "c"
    _build(images, clip, out, max_items=2)
    # A kill during an item write leaves a temp file; one between the file and its index line
    # leaves an orphan; one during the index append leaves a partial line.
    (out / ITEMS / ".tmp-123-abc.npz").write_bytes(b"partial")
    lines = (out / INDEX).read_text().splitlines(keepends=True)
    (out / INDEX).write_text(lines[0] + lines[1][:15])
    cache = PriorCache(out)
    assert cache.keys() == [json.loads(lines[0])["key"]]
    orphan = json.loads(lines[1])["key"]
    assert (out / ITEMS / item_file(orphan)).is_file() and cache.get(orphan) is None
    summary = _build(images, clip, out)
    assert summary["items"] == 5 and not list((out / ITEMS).glob(".tmp-*"))
    assert len(PriorCache(out)) == 5


def test_captions_file_and_settings_check(images, clip, tmp_path):
    caps = tmp_path / "caps.jsonl"
    caps.write_text(
        json.dumps({"key": "sub/im0.png", "caption": "a red bus"}) + "\n"
        + json.dumps({"file": "/elsewhere/im4.png", "caption": "a dog on a beach"}) + "\n"
    )
    summary = _build(images, clip, tmp_path / "c", captions_file=caps)
    assert summary["captions_given"] == 2 and summary["captions_zero_shot"] == 3
    cache = PriorCache(tmp_path / "c")
    assert cache.get("sub/im0.png")["caption"] == "a red bus"
    assert cache.get("sub/im4.png")["caption"] == "a dog on a beach"
    with pytest.raises(UsageError, match="other settings"):
        _build(images, clip, tmp_path / "c", captions_file=caps, ref_size=32)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"caption": 1}\nnot json\n')
    with pytest.raises(UsageError, match="bad.jsonl:"):
        _build(images, clip, tmp_path / "d", captions_file=bad)


def test_references_from_stable_diffusion(images, clip, tmp_path):
    from lmdir_jax.priors.diffusion import load_sd, save_tiny_sd

    sd = load_sd(save_tiny_sd(tmp_path / "sd"))
    summary = build_cache(
        str(images), "", tmp_path / "c", sd_path=tmp_path / "sd", clip=clip, sd=sd, ref_size=8,
        steps=1, batch_size=3, max_items=3, progress=False,
    )
    assert summary["references"] == 3
    cache = PriorCache(tmp_path / "c")
    refs = [cache.get(k) for k in cache.keys()]
    for r in refs:
        assert r["has_reference"] is True and r["reference"].shape == (8, 8, 3)
        assert 0.0 <= r["reference"].min() and r["reference"].max() <= 1.0
    assert not np.array_equal(refs[0]["reference"], refs[1]["reference"])  # per-image seeds


def test_get_from_many_threads_gives_the_serial_results(images, clip, tmp_path):
    """The training loader reads the cache from several threads at once (prefetch + grain)."""
    from concurrent.futures import ThreadPoolExecutor

    _build(images, clip, tmp_path / "c")
    cache = PriorCache(tmp_path / "c")
    keys = cache.keys() * 40
    serial = {k: cache.get(k)["scene_states"] for k in cache.keys()}
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda k: (k, cache.get(k)["scene_states"]), keys))
    assert len(got) == len(keys)
    for k, states in got:
        np.testing.assert_array_equal(states, serial[k])
