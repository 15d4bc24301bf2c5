"""Tests of lmdir_jax.degradations: every kind, mixtures, labels and text, the spec grammar."""

import json

import numpy as np
import pytest

from lmdir_jax.degradations import (
    KIND_FUNCTIONS,
    KINDS,
    Label,
    apply_kinds,
    apply_spec,
    degrade,
    format_spec,
    parse_spec,
    sample_degradation,
    sample_kinds,
    vocabulary,
)
from lmdir_jax.degradations.blur import apply_gaussian_blur, motion_blur
from lmdir_jax.degradations.haze import DEPTH_RANGE, apply_haze, haze, pseudo_depth
from lmdir_jax.degradations.jpeg import apply_jpeg
from lmdir_jax.degradations.noise import gaussian_noise, poisson_gaussian_noise
from lmdir_jax.degradations.timing import time_kinds
from lmdir_jax.errors import UsageError


def _photo(h: int = 48, w: int = 40, seed: int = 0) -> np.ndarray:
    """A smooth, textured synthetic image in [0.1, 0.9] (gradients plus sinusoids)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(seed)
    ph = rng.uniform(0, 6.28, 3)
    img = np.stack(
        [0.5 + 0.3 * np.sin(x / 3.0 + ph[c]) * np.cos(y / 4.0 + ph[c]) for c in range(3)], -1
    )
    img += 0.1 * (x / w)[..., None] - 0.05
    return np.clip(img, 0.1, 0.9).astype(np.float32)


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a.astype(np.float64) - b) ** 2))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(7, 5, 3), (1, 1, 3), (33, 18, 3)])
def test_each_kind_keeps_shape_dtype_range(kind, shape):
    img = np.random.default_rng(1).random(shape, dtype=np.float32)
    for sev in (0.0, 0.5, 1.0):
        out, label = KIND_FUNCTIONS[kind](img, np.random.default_rng(2), sev)
        assert out.shape == shape and out.dtype == np.float32
        assert np.all(np.isfinite(out)) and out.min() >= 0.0 and out.max() <= 1.0
        assert label.kinds == (kind,)
        assert abs(label.items[0].severity - sev) < 0.35  # downsample rounds to 2/3/4


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_is_seeded_and_changes_the_image(kind):
    img = _photo()
    a, la = degrade(img, kind, np.random.default_rng(5), 0.7)
    b, lb = degrade(img, kind, np.random.default_rng(5), 0.7)
    np.testing.assert_array_equal(a, b)
    assert la == lb
    assert _mse(a, img) > 1e-5
    outs = [degrade(img, kind, np.random.default_rng(s), 0.7)[0] for s in range(6, 12)]
    if kind not in ("jpeg", "blur", "downsample"):  # these may draw no random numbers
        assert not np.array_equal(a, outs[0])
    assert any(not np.array_equal(a, o) for o in outs) or kind == "jpeg"


def test_input_is_not_modified():
    img = _photo()
    keep = img.copy()
    for kind in KINDS:
        degrade(img, kind, np.random.default_rng(0), 0.9)
    apply_spec(img, "rain+haze+noise:30+jpeg:20", np.random.default_rng(0))
    np.testing.assert_array_equal(img, keep)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_rejects_non_float_or_non_rgb_input(kind):
    with pytest.raises(ValueError):
        degrade(np.zeros((8, 8, 3), np.uint8), kind, np.random.default_rng(0), 0.5)
    with pytest.raises(ValueError):
        degrade(np.zeros((8, 8), np.float32), kind, np.random.default_rng(0), 0.5)
    with pytest.raises(ValueError):
        apply_spec(np.zeros((8, 8, 3), np.uint8), kind, np.random.default_rng(0))


def test_noise_error_grows_with_sigma():
    img = _photo(64, 64)
    errs = [_mse(gaussian_noise(img, np.random.default_rng(0), s)[0], img) for s in (0.1, 0.4, 1.0)]
    assert errs[0] < errs[1] < errs[2]
    # sigma 25 on 0-255: the measured std is close to 25/255 (few pixels clip in [0.1, 0.9])
    out, label = apply_spec(img, "noise:25", np.random.default_rng(0))
    assert label.items[0].params["sigma"] == 25.0 and label.items[0].variant == "gaussian"
    assert abs(np.std(out - img) * 255 - 25) < 1.5
    pg = [
        _mse(poisson_gaussian_noise(img, np.random.default_rng(0), s)[0], img) for s in (0.2, 0.9)
    ]
    assert pg[0] < pg[1]


def test_poisson_gaussian_noise_is_signal_dependent():
    dark = np.full((64, 64, 3), 0.1, np.float32)
    bright = np.full((64, 64, 3), 0.8, np.float32)
    sd = np.std(poisson_gaussian_noise(dark, np.random.default_rng(0), 1.0)[0])
    sb = np.std(poisson_gaussian_noise(bright, np.random.default_rng(0), 1.0)[0])
    assert sb > 1.5 * sd


def test_blur_removes_detail_monotonically():
    img = _photo(64, 64)

    def detail(x):
        return float(np.abs(np.diff(x, axis=1)).mean())

    d = [detail(apply_gaussian_blur(img, s)) for s in (0.5, 1.5, 4.0)]
    assert detail(img) > d[0] > d[1] > d[2]
    out, label = motion_blur(img, np.random.default_rng(0), 1.0)
    assert label.items[0].variant == "motion" and detail(out) < detail(img)
    # a constant image stays constant (the kernel is normalised)
    flat = np.full((16, 16, 3), 0.4, np.float32)
    np.testing.assert_allclose(motion_blur(flat, np.random.default_rng(1), 1.0)[0], 0.4, atol=1e-5)


def test_jpeg_quality_10_worse_than_90():
    img = _photo(64, 64)
    assert _mse(apply_jpeg(img, 10), img) > 3 * _mse(apply_jpeg(img, 90), img)
    _, label = apply_spec(img, "jpeg:30", np.random.default_rng(0))
    assert label.items[0].params["quality"] == 30


def test_haze_lowers_contrast_and_follows_the_model():
    img = _photo(64, 64)
    stds = [
        float(np.std(apply_spec(img, f"haze:{b}", np.random.default_rng(0))[0])) for b in (0.5, 2.5)
    ]
    assert stds[1] < stds[0] < float(np.std(img))
    depth = np.full((4, 4), 1.0, np.float32)
    j = np.full((4, 4, 3), 0.2, np.float32)
    out = apply_haze(j, depth, 1.0, (0.9, 0.9, 0.9))
    t = np.exp(-1.0)
    np.testing.assert_allclose(out, 0.2 * t + 0.9 * (1 - t), atol=1e-6)


def test_haze_depth_has_the_spatial_scale_of_a_photo_in_patches_too():
    """A training patch gets a window of a photo-sized depth field: its depth varies gently, as a
    crop of a hazy photo does, while a photo-sized image spans most of the depth range."""
    lo, hi = DEPTH_RANGE
    for seed in range(8):
        whole = pseudo_depth((321, 481), np.random.default_rng(seed))
        patch = pseudo_depth((64, 64), np.random.default_rng(seed))
        assert whole.shape == (321, 481) and patch.shape == (64, 64)
        assert lo <= patch.min() and patch.max() <= hi
        assert whole.max() - whole.min() > 0.4 * (hi - lo)
        assert patch.max() - patch.min() < 0.5 * (whole.max() - whole.min())


def test_haze_transmission_stays_in_the_range_of_real_hazy_photos():
    """Severity 0..1 keeps t = exp(-beta d) in about [0.37, 0.94] (SOTS-outdoor pairs: 0.45-0.82):
    a hazy copy of a flat grey image is never washed out to the airlight."""
    j = np.full((64, 64, 3), 0.2, np.float32)
    for severity in (0.0, 0.5, 1.0):
        out, label = haze(j, np.random.default_rng(1), severity)
        a = np.asarray(label.items[0].params["airlight"], np.float32)
        t = (out - a) / (j - a)
        assert 0.36 <= float(t.min()) and float(t.max()) <= 0.95


def test_lowlight_lowers_the_mean_monotonically():
    img = _photo(64, 64)
    means = [
        float(degrade(img, "lowlight", np.random.default_rng(0), s)[0].mean())
        for s in (0.1, 0.5, 1.0)
    ]
    assert img.mean() > means[0] > means[1] > means[2]
    # a gamma spec value is used as is
    _, label = apply_spec(img, "lowlight:2.5", np.random.default_rng(0))
    assert label.items[0].params["gamma"] == 2.5


def test_rain_and_snow_brighten_and_grow_with_severity():
    img = _photo(64, 64) * 0.5
    for kind in ("rain", "snow"):
        m = [float(degrade(img, kind, np.random.default_rng(3), s)[0].mean()) for s in (0.1, 0.9)]
        assert img.mean() < m[0] < m[1], kind


def test_rain_draws_both_styles_and_each_blends_as_documented():
    """`rain` draws the additive (Rain100L's) and the screen style about half the time each, and
    records the style. The additive style adds the same light to every channel wherever nothing
    clips, whatever the colour underneath; the screen style adds less to the brighter channels."""
    from lmdir_jax.degradations.rain import apply_rain, rain_params

    img = np.empty((64, 80, 3), np.float32)
    img[...] = (0.1, 0.4, 0.7)  # one colour, channels far apart
    styles = [degrade(img, "rain", np.random.default_rng(i), 0.5)[1].items[0].params["style"]
              for i in range(200)]
    assert set(styles) == {"additive", "screen"} and 70 < styles.count("additive") < 130
    for style in ("additive", "screen"):
        gains = []
        for s in (0.2, 0.9):
            rng = np.random.default_rng(4)
            p = rain_params(rng, s, style)
            assert p["style"] == style
            out = apply_rain(img, rng, **p)
            added = out - img
            assert added.min() >= -1e-6
            unclipped = (out.max(2) < 1.0) & (added.mean(2) > 0.02)
            spread = (added[..., 0] - added[..., 2])[unclipped]
            if style == "additive":
                assert p["width"] == 1 and np.abs(spread).max() < 1e-5
            else:  # screen: the dark channel gains more than the bright one
                assert spread.min() > 0
            gains.append(float(added.mean()))
        assert 0 < gains[0] < gains[1], style
    with pytest.raises(ValueError, match="rain style"):
        rain_params(np.random.default_rng(0), 0.5, "drizzle")


def test_downsample_factor_and_low_pass():
    img = _photo(64, 64)
    errs = []
    for f in (2, 3, 4):
        out, label = apply_spec(img, f"downsample:{f}", np.random.default_rng(0))
        assert label.items[0].params["factor"] == f
        errs.append(_mse(out, img))
    assert 0 < errs[0] < errs[2]
    words = [
        apply_spec(img, f"downsample:{f}", np.random.default_rng(0))[1].text() for f in (2, 3, 4)
    ]
    assert words == [
        "slightly low resolution",
        "moderately low resolution",
        "very low resolution",
    ]


def test_parse_spec_valid_forms():
    items = parse_spec("jpeg:30+noise:25")
    assert [(i.kind, i.value) for i in items] == [("noise", 25.0), ("jpeg", 30.0)]  # KINDS order
    assert format_spec(items) == "noise:25+jpeg:30"
    assert [(i.kind, i.value) for i in parse_spec(" Rain + haze:heavy ")] == [
        ("rain", None),
        ("haze", "heavy"),
    ]
    assert parse_spec("downsample:4")[0].value == 4.0
    assert parse_spec("blur:2.0")[0].value == 2.0
    assert parse_spec("clean") == []


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("", "empty"),
        ("fog", "'fog'"),
        ("noise:abc", "'noise:abc'"),
        ("noise:25+noise:10", "twice"),
        ("jpeg:0", "'jpeg:0'"),
        ("downsample:1", "factor"),
        ("rain:2", "severity"),
        ("noise:25+", "''"),
    ],
)
def test_parse_spec_errors_name_the_part_and_the_kinds(spec, fragment):
    with pytest.raises(UsageError) as e:
        parse_spec(spec)
    msg = str(e.value)
    assert fragment in msg and "\n" not in msg
    assert "rain" in msg and "jpeg" in msg  # lists the valid kinds


def test_apply_spec_default_severity_and_order():
    img = _photo()
    out, label = apply_spec(img, "jpeg+rain", np.random.default_rng(0))
    assert label.kinds == ("rain", "jpeg")
    assert all(abs(d.severity - 0.5) < 1e-6 for d in label.items)
    # the written order does not matter
    out2, label2 = apply_spec(img, "rain+jpeg", np.random.default_rng(0))
    np.testing.assert_array_equal(out, out2)
    clean, lab = apply_spec(img, "clean", np.random.default_rng(0))
    np.testing.assert_array_equal(clean, img)
    assert lab.is_clean and lab.text() == "no degradation" and not lab.vector().any()


def test_mixture_is_applied_in_kinds_order():
    img = _photo()
    a, la = apply_kinds(
        img, np.random.default_rng(0), [("jpeg", 0.8), ("noise", 0.5), ("haze", 0.5)]
    )
    b, lb = apply_kinds(img, np.random.default_rng(0), {"haze": 0.5, "noise": 0.5, "jpeg": 0.8})
    assert la.kinds == ("haze", "noise", "jpeg") == lb.kinds
    np.testing.assert_array_equal(a, b)
    rng = np.random.default_rng(0)
    for _ in range(40):
        _, lab = sample_degradation(img, rng, dict.fromkeys(KINDS, 1.0), mix_prob=1.0, max_kinds=3)
        idx = [KINDS.index(k) for k in lab.kinds]
        assert idx == sorted(idx) and len(set(idx)) == len(idx) and 2 <= len(idx) <= 3


def test_sample_kinds_respects_weights_and_mix_prob():
    rng = np.random.default_rng(0)
    weights = {"noise": 1.0, "rain": 2.0, "haze": 0.0, "jpeg": 0.0}
    seen = {}
    for _ in range(400):
        for k in sample_kinds(rng, weights, mix_prob=0.5, max_kinds=3):
            seen[k] = seen.get(k, 0) + 1
    assert set(seen) == {"noise", "rain"}  # weight 0 and missing kinds never appear
    singles = [len(sample_kinds(rng, dict.fromkeys(KINDS, 1.0), 0.0, 3)) for _ in range(50)]
    assert singles == [1] * 50
    with pytest.raises(ValueError):
        sample_kinds(rng, {"noise": 0.0}, 0.3, 3)
    with pytest.raises(ValueError):
        sample_kinds(rng, {"fog": 1.0}, 0.3, 3)


def test_sample_degradation_is_seeded():
    img = _photo()
    w = dict.fromkeys(KINDS, 1.0)
    a, la = sample_degradation(img, np.random.default_rng(9), w, 0.5, 3)
    b, lb = sample_degradation(img, np.random.default_rng(9), w, 0.5, 3)
    np.testing.assert_array_equal(a, b)
    assert la.to_dict() == lb.to_dict()


def test_label_text_vector_and_dict():
    label = Label.single("rain", 0.9, density=0.02) + Label.single(
        "noise", 0.5, "gaussian", sigma=25
    )
    assert label.text() == "heavy rain streaks and moderate gaussian noise"
    three = label + Label.single("haze", 0.1, beta=0.6)
    assert three.text() == "heavy rain streaks, light haze and moderate gaussian noise"
    v = three.vector()
    assert v.dtype == np.float32 and v.shape == (len(KINDS),)
    assert v[KINDS.index("rain")] == np.float32(0.9) and v[KINDS.index("jpeg")] == 0
    d = json.loads(json.dumps(three.to_dict()))
    assert d["text"] == three.text() and [i["kind"] for i in d["items"]] == [
        "rain",
        "haze",
        "noise",
    ]
    # phrasings: seeded, varied, and each still names every degradation somehow
    rng = np.random.default_rng(0)
    texts = {label.text(rng) for _ in range(60)}
    assert len(texts) > 10
    r1 = [label.text(np.random.default_rng(3)) for _ in range(2)]
    assert r1[0] == r1[1]
    for t in texts:
        assert any(w in t for w in ("rain", "raindrop")), t


def test_labels_from_sampling_carry_parameters_and_words():
    img = _photo()
    _, label = degrade(img, "blur", np.random.default_rng(0), 0.95)
    d = label.items[0]
    assert d.variant in ("gaussian", "motion") and d.params
    assert label.text().startswith("heavy ") and label.text().endswith("blur")
    _, label = degrade(img, "noise", np.random.default_rng(0), 0.05)
    assert label.text().startswith("light ")


def test_vocabulary():
    vocab = vocabulary()
    assert vocab[0] == ("clean", "a clean photo with no degradation")
    assert [k for k, _ in vocab[1:]] == list(KINDS)
    assert len({d for _, d in vocab}) == len(vocab)


def test_time_kinds_reports_every_kind():
    t = time_kinds(size=16, n=2)
    assert set(t) == set(KINDS) | {"mixture"} and all(v > 0 for v in t.values())


def test_standard_normal_is_seeded_per_thread_and_per_channel():
    from concurrent.futures import ThreadPoolExecutor

    from lmdir_jax.degradations.imageops import standard_normal

    def draw(seed):
        rng = np.random.default_rng(seed)
        return [standard_normal(rng, (32, 32, 3)) for _ in range(20)]

    sequential = [draw(s) for s in range(4)]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(draw, range(4)))
    for a, b in zip(sequential, threaded, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
    x = np.stack(sequential[0])
    assert x.dtype == np.float32
    np.testing.assert_allclose(x.std(axis=(0, 1, 2)), 1.0, atol=0.03)  # every channel is noisy
    assert abs(float(x.mean())) < 0.02
    assert not np.array_equal(sequential[0][0], sequential[1][0])
