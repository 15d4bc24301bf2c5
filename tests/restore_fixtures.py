"""Shared fixtures of the restore/evaluate tests: a tiny trained-run workdir with a tiny CLIP.

Import the fixtures into a test module with `from restore_fixtures import tiny_clip, tiny_workdir`.
The network is the tiny config at initialisation: its zero-initialised output conv makes it the
identity, so restored images can be compared with their inputs exactly.
"""

from __future__ import annotations

from pathlib import Path

import pytest


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


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    """A tiny random CLIP folder (text width 32 = the tiny config's model.text_dim)."""
    from lmdir_jax.priors.tiny import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "clip", text_dim=32)


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory, tiny_clip) -> Path:
    """A tiny-config workdir whose config names the tiny CLIP (automatic priors on)."""
    return write_workdir(tmp_path_factory.mktemp("run") / "wd", [f"config.priors.clip={tiny_clip}"])
