"""Stable Diffusion prior: a tiny random SD folder loaded through the real path, our DDIM loop.

Sizes are tiny (16 px images, 2 DDIM steps) and calls share shapes so each sampler compiles once.
"""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from lmdir_jax.errors import UsageError
from lmdir_jax.priors import sd_weights
from lmdir_jax.priors.diffusion import StableDiffusion, benchmark_sd, load_sd, save_tiny_sd

STEPS, SIZE = 2, 16
PROMPTS = ["a photo of a cat", "a photo of a city street"]


@pytest.fixture(scope="module")
def tiny_sd_dir(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("tiny_sd"), seed=0)


@pytest.fixture(scope="module")
def sd(tiny_sd_dir) -> StableDiffusion:
    return load_sd(tiny_sd_dir)


@pytest.fixture(scope="module")
def mesh1():
    return Mesh(np.array(jax.devices()[:1]), ("data",))


@pytest.fixture(scope="module")
def mesh8():
    assert jax.device_count() == 8, "tests/conftest.py should emulate 8 CPU devices"
    return Mesh(np.array(jax.devices()), ("data",))


def t2i(sd, mesh, prompts=PROMPTS, seed=(1, 2), **kw):
    return sd.text_to_image(
        list(prompts), seed=list(seed), steps=STEPS, height=SIZE, width=SIZE, mesh=mesh, **kw
    )


@pytest.fixture(scope="module")
def pair(sd, mesh1):
    """Two images (seeds 1, 2) on one device: the reference most tests compare against."""
    return t2i(sd, mesh1)


def test_folder_layout(tiny_sd_dir):
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_sd_dir / part).is_dir()
    assert (tiny_sd_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()  # as diffusers writes it
    assert (tiny_sd_dir / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tiny_sd_dir / "text_encoder" / "model.safetensors").is_file()  # as transformers writes it
    assert (tiny_sd_dir / "model_index.json").is_file()


def test_text_to_image_shape_and_range(pair):
    assert pair.shape == (2, SIZE, SIZE, 3)
    assert pair.dtype == np.float32
    assert np.isfinite(pair).all()
    assert pair.min() >= 0.0 and pair.max() <= 1.0
    assert pair.std() > 1e-3  # not a constant image


def test_same_seed_same_image_different_seed_different(sd, mesh1, pair):
    again = t2i(sd, mesh1)
    np.testing.assert_array_equal(again, pair)
    same_prompt = t2i(sd, mesh1, prompts=[PROMPTS[0]] * 2, seed=(1, 3))
    np.testing.assert_allclose(same_prompt[0], pair[0], atol=1e-5)
    assert np.abs(same_prompt[1] - same_prompt[0]).max() > 1e-2


def test_image_depends_only_on_its_own_seed(sd, mesh1, pair):
    swapped = t2i(sd, mesh1, prompts=PROMPTS[::-1], seed=(2, 1))
    np.testing.assert_allclose(swapped[::-1], pair, atol=1e-5)


def test_one_vs_eight_devices_and_batch_vs_single(sd, mesh8, pair):
    # On 8 devices a batch of 2 and a batch of 1 are both padded to 8: same program.
    batch = t2i(sd, mesh8)
    np.testing.assert_allclose(batch, pair, atol=1e-5)
    for i in range(2):
        single = t2i(sd, mesh8, prompts=[PROMPTS[i]], seed=[i + 1])
        assert single.shape == (1, SIZE, SIZE, 3)
        np.testing.assert_allclose(single[0], batch[i], atol=1e-5)


def test_negative_prompt_and_guidance_change_the_output(sd, mesh1, pair):
    negative = t2i(sd, mesh1, negative_prompt="blurry noisy dark")
    assert np.abs(negative - pair).max() > 1e-3
    stronger = t2i(sd, mesh1, guidance=12.0)
    assert np.abs(stronger - pair).max() > 1e-3


def test_image_to_image_strength_zero_is_vae_round_trip(sd, mesh1):
    rng = np.random.default_rng(0)
    images = rng.random((2, SIZE, SIZE, 3), dtype=np.float32)
    out = sd.image_to_image(images, PROMPTS, strength=0.0, seed=0, steps=STEPS, mesh=mesh1)
    round_trip = sd.vae_round_trip(images)
    assert out.shape == images.shape
    np.testing.assert_allclose(out, round_trip, atol=1e-5)
    assert np.abs(round_trip - images).max() > 1e-3  # the random VAE is not the identity


def test_image_to_image_strength_changes_and_is_seeded(sd, mesh1):
    images = np.full((2, SIZE, SIZE, 3), 0.5, np.float32)
    a = sd.image_to_image(images, PROMPTS, strength=0.5, seed=[4, 5], steps=STEPS, mesh=mesh1)
    b = sd.image_to_image(images, PROMPTS, strength=0.5, seed=[4, 5], steps=STEPS, mesh=mesh1)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - sd.vae_round_trip(images)).max() > 1e-3


def test_bfloat16(tiny_sd_dir, mesh1, pair):
    sd16 = load_sd(tiny_sd_dir, dtype="bfloat16")
    leaves = jax.tree.leaves(sd16.params["unet"])
    assert all(x.dtype == jax.numpy.bfloat16 for x in leaves)
    out = t2i(sd16, mesh1)
    assert out.dtype == np.float32 and out.shape == pair.shape
    assert np.abs(out - pair).mean() < 0.1  # bf16 stays close to float32


def test_parts_round_trip_through_their_files(tmp_path, sd):
    """save_part writes what load_unet / load_vae read back, value for value."""
    for part, load in (("unet", sd_weights.load_unet), ("vae", sd_weights.load_vae)):
        cfg = sd.unet_config if part == "unet" else sd.vae_config
        folder = sd_weights.save_part(cfg, sd.params[part], tmp_path / part)
        cfg2, _, params = load(folder)
        assert cfg2 == cfg
        a = jax.tree_util.tree_leaves_with_path(sd.params[part])
        b = dict(jax.tree_util.tree_leaves_with_path(params))
        assert len(a) == len(b)
        for path, leaf in a:
            np.testing.assert_array_equal(np.asarray(b[path]), np.asarray(leaf))


def test_missing_or_incomplete_folder_is_a_usage_error(tmp_path, tiny_sd_dir):
    with pytest.raises(UsageError, match="not found"):
        load_sd(tmp_path / "nope")
    (tmp_path / "partial" / "unet").mkdir(parents=True)
    with pytest.raises(UsageError, match="missing"):
        load_sd(tmp_path / "partial")
    with pytest.raises(UsageError, match="dtype"):
        load_sd(tiny_sd_dir, dtype="float16")


def test_bad_arguments_are_usage_errors(sd, mesh1):
    with pytest.raises(UsageError, match="multiples"):
        sd.text_to_image(PROMPTS, seed=0, steps=STEPS, height=10, width=SIZE, mesh=mesh1)
    with pytest.raises(UsageError, match="seeds"):
        sd.text_to_image(PROMPTS, seed=[1], steps=STEPS, height=SIZE, width=SIZE, mesh=mesh1)
    with pytest.raises(UsageError, match="strength"):
        sd.image_to_image(np.zeros((2, SIZE, SIZE, 3)), PROMPTS, strength=2.0, seed=0)


def test_benchmark_sd_reports_throughput(sd, mesh1):
    result = benchmark_sd(sd, batch=2, steps=STEPS, size=SIZE, repeats=1, mesh=mesh1)
    assert result["images_per_s"] > 0
    assert result["batch"] == 2 and result["devices"] == 1
