"""Defaults of the `data` config section (owned by lmdir_jax/data)."""

import ml_collections


def default_config() -> ml_collections.ConfigDict:
    """Training data: source, crops, degradation sampling, batching, workers."""
    c = ml_collections.ConfigDict()
    # 'skimage' (sample images inside scikit-image), a folder of clean images, a paired folder
    # (degraded/ + clean/), or 'tfds:NAME:SPLIT'.
    c.source = "skimage"
    c.patch_size = 64
    c.batch_size = 8  # global batch size
    c.num_workers = 0  # grain mp_prefetch worker processes (0 = in-process)
    c.augment = True  # random flips / 90-degree rotations
    # Relative weights of each degradation kind when sampling a training example.
    c.tasks = ml_collections.ConfigDict(
        dict(noise=1.0, blur=1.0, jpeg=1.0, rain=1.0, haze=1.0, lowlight=1.0, downsample=1.0, snow=0.0)
    )
    c.mix_prob = 0.3  # probability an example gets a mixture of 2..max_kinds kinds
    c.max_kinds = 3
    # Probability that a training example's degradation text is a random phrasing of its label
    # ("strong rain", "a photo with mist") instead of the canonical one (robust user-guided text).
    c.random_phrasing = 0.5
    # Degradation text given to pairs from a paired-folder source (their label is unknown).
    c.paired_text = ""
    # Validation: a folder (clean images degraded with val_spec at a fixed seed, or a paired folder).
    c.val_source = ""
    c.val_spec = "noise:25"
    c.val_max_images = 8
    c.val_size = 128  # center crop side for validation images (0 = full image)
    return c
