"""Defaults of the `data` config section (owned by lmdir_jax/data)."""

import ml_collections


def default_config() -> ml_collections.ConfigDict:
    """Training data: source, crops, degradation sampling, batching, workers."""
    c = ml_collections.ConfigDict()
    # 'skimage' (sample images inside scikit-image), a folder of clean images, a paired folder
    # (degraded/ + clean/), or 'tfds:NAME:SPLIT'.
    c.source = "skimage"
    # A mixture of named training sources (see `source_config`); when set it replaces `source`.
    # Relative source paths are read under `root`.
    c.sources = ml_collections.ConfigDict()
    c.root = ""
    # The evaluation protocol whose test sets `lmdir data check` looks for under `root`
    # ('' = none, 'three-task', 'five-task'; see lmdir_jax/protocols.py).
    c.protocol = ""
    c.patch_size = 64
    c.batch_size = 8  # global batch size
    c.num_workers = 0  # grain mp_prefetch worker processes (0 = in-process)
    # grain's read-ahead in each process (or worker): threads, and batches kept ready. grain's own
    # default (16 threads, 500 elements) makes 500 batches at start-up, beside the step's tracing.
    c.read_threads = 4
    c.prefetch = 8
    c.augment = True  # random flips / 90-degree rotations
    # Relative weights of each degradation kind when sampling a training example.
    c.tasks = ml_collections.ConfigDict(
        dict(noise=1.0, blur=1.0, jpeg=1.0, rain=1.0, haze=1.0, lowlight=1.0, downsample=1.0, snow=0.0)
    )
    # The share of rain examples drawn in the additive style, thin grey streaks like Rain100L's;
    # the others are the heavy screen-blended style (lmdir_jax/degradations/rain.py).
    c.rain_additive_share = 0.5
    c.mix_prob = 0.3  # probability an example gets a mixture of 2..max_kinds kinds
    c.max_kinds = 3
    # Probability that a training example's degradation text is a random phrasing of its label
    # ("strong rain", "a photo with mist") instead of the canonical one (robust user-guided text).
    c.random_phrasing = 0.5
    # Probability that it is only its kinds' nouns ("gaussian noise", `Label.noun_text`), before the
    # phrasings above: the words the automatic mode tells the network and a user types, which a
    # network trained on the phrasings alone rarely sees (docs/priors.md, "What the network is told").
    c.noun_text = 0.25
    # Degradation text given to pairs from a paired-folder source (their label is unknown).
    c.paired_text = ""
    # Validation: a folder (clean images degraded with val_spec at a fixed seed, or a paired folder).
    c.val_source = ""
    c.val_spec = "noise:25"
    c.val_max_images = 8
    c.val_size = 128  # center crop side for validation images (0 = full image)
    return c


def source_config(
    path: str,
    weight: float = 1.0,
    *,
    specs: tuple[str, ...] = (),
    tasks: dict[str, float] | None = None,
    text: str = "",
    degraded_dir: str = "",
    clean_dir: str = "",
) -> ml_collections.ConfigDict:
    """One entry of `data.sources`: a training source and its own settings.

    path: 'skimage', 'tfds:NAME:SPLIT', or a folder (relative paths are read under data.root); a
      folder with a degraded and a clean sub-folder is a paired source.
    weight: its share of the training examples (> 0; weights are normalised over the sources).
    specs: clean sources only: each example gets one of these specs, drawn uniformly
      (e.g. ('noise:15', 'noise:25', 'noise:50')); empty = sample `tasks` like data.tasks.
    tasks: clean sources only: task weights replacing data.tasks for this source.
    text: paired sources only: the degradation text of its pairs (default data.paired_text).
    degraded_dir / clean_dir: paired sources only: the sub-folder names (default: found by name,
      e.g. rainy/ + gt/, synthetic/ + original/, input/ + target/).
    """
    c = ml_collections.ConfigDict()
    c.path = str(path)
    c.weight = float(weight)
    c.specs = tuple(specs)
    c.tasks = ml_collections.ConfigDict(dict(tasks or {}))
    c.text = str(text)
    c.degraded_dir = str(degraded_dir)
    c.clean_dir = str(clean_dir)
    return c
