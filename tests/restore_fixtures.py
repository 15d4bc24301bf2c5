"""Shared fixtures of the restore/evaluate tests.

- `tiny_workdir`: the tiny config at initialisation with a tiny CLIP. Its zero-initialised output
  conv makes it the identity, so the file-format tests (16-bit, alpha) can compare restored images
  with their inputs exactly.
- `trained_workdir` (tests/trained_fixture.py): a tiny network trained on noise and rain, for every
  test that checks the quality of what comes out.
- `heldout_crops(folder, n)`: 48x48 crops of the skimage photos the network never trained on.

Import them into a test module with `tiny_workdir = restore_fixtures.tiny_workdir` and so on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import trained_fixture

trained_workdir = trained_fixture.trained_workdir
trained_clip = trained_fixture.trained_clip
CROP = 48  # one image size for the quality tests: the restorer compiles once


def write_workdir(path: Path, overrides: list[str]) -> Path:
    """A training workdir (config.json + one orbax checkpoint) for the tiny config, through H6's API."""
    from flax import nnx

    from lmdir_jax.config import config_to_json, load_config
    from lmdir_jax.train.checkpoints import make_manager, save
    from lmdir_jax.train.state import build_model

    config = load_config("tiny", overrides)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(config_to_json(config))
    model = build_model(config)
    manager = make_manager(path, async_save=False)
    save(manager, 1, {"model": nnx.state(model), "opt": nnx.state(model, nnx.Param)})
    manager.wait_until_finished()
    manager.close()
    return path


def heldout_crops(folder: Path, n: int = 2) -> list[Path]:
    """Write n CROP x CROP PNG crops of the held-out skimage photos (never trained on) to folder."""
    from lmdir_jax.data.io import write_image
    from lmdir_jax.data.sources import load_source

    src = load_source("skimage-heldout")
    paths = []
    for i in range(n):
        img = src[i % len(src)]["clean"]
        y, x = (img.shape[0] - CROP) // 2 + 40 * (i // len(src)), (img.shape[1] - CROP) // 2
        paths.append(write_image(folder / f"h{i}.png", img[y:y + CROP, x:x + CROP]))
    return paths


def degraded_copy(clean: np.ndarray, spec: str, seed: int = 0) -> tuple[np.ndarray, str]:
    """(degraded image, its canonical label text) for a spec at a seed."""
    from lmdir_jax.degradations import apply_spec

    lq, label = apply_spec(clean, spec, np.random.default_rng(seed))
    return np.clip(lq, 0, 1).astype(np.float32), label.text()


@pytest.fixture(scope="session")
def tiny_clip(clip_dir) -> Path:
    """The tiny random CLIP folder of tests/conftest.py (text width 32 = the tiny config's
    model.text_dim)."""
    return clip_dir


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory, tiny_clip) -> Path:
    """A tiny-config workdir whose config names the tiny CLIP (automatic priors on)."""
    return write_workdir(tmp_path_factory.mktemp("run") / "wd", [f"config.priors.clip={tiny_clip}"])
