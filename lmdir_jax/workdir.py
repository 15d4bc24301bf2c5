"""A run folder (WORKDIR), as training writes it and every command reads it:

  config.json            the resolved config (what inference rebuilds the model from)
  checkpoints/<step>/    orbax checkpoint steps (train/checkpoints.py)
  checkpoints_corrupt/   steps shown to be damaged, set aside by training (never deleted)
  previous_run[.N]/      checkpoints/ and checkpoints_corrupt/ of a run restarted at step 0
  metrics.jsonl          one JSON record of scalars per logged step
  tensorboard/           TensorBoard event files
  plots/                 loss.png, val_STEP.png and train_STEP.png image grids (a controller
                         run: confusion.png)

The names are defined here and nowhere else.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections

CONFIG = "config.json"
CHECKPOINTS = "checkpoints"
CORRUPT = "checkpoints_corrupt"
PREVIOUS_RUN = "previous_run"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
PLOTS = "plots"
LOSS_PLOT = "loss.png"
CONFUSION_PLOT = "confusion.png"
VAL_GRID, TRAIN_GRID = "val", "train"  # prefixes of plots/<prefix>_STEP.png


def config_file(workdir: str | Path) -> Path:
    """WORKDIR/config.json."""
    return Path(workdir) / CONFIG


def checkpoints_dir(workdir: str | Path) -> Path:
    """WORKDIR/checkpoints (absolute, as orbax needs it)."""
    return Path(workdir).resolve() / CHECKPOINTS


def corrupt_dir(workdir: str | Path) -> Path:
    """WORKDIR/checkpoints_corrupt."""
    return Path(workdir) / CORRUPT


def previous_run_dir(workdir: str | Path) -> Path:
    """WORKDIR/previous_run (a restart moves the old checkpoints to it, or to previous_run.N)."""
    return Path(workdir) / PREVIOUS_RUN


def metrics_file(workdir: str | Path) -> Path:
    """WORKDIR/metrics.jsonl."""
    return Path(workdir) / METRICS


def tensorboard_dir(workdir: str | Path) -> Path:
    """WORKDIR/tensorboard."""
    return Path(workdir) / TENSORBOARD


def plots_dir(workdir: str | Path) -> Path:
    """WORKDIR/plots."""
    return Path(workdir) / PLOTS


def plot_file(workdir: str | Path, name: str) -> Path:
    """WORKDIR/plots/NAME."""
    return plots_dir(workdir) / name


def grid_name(prefix: str, step: int) -> str:
    """The file name of an image grid: `val_000200.png` (VAL_GRID) or `train_000200.png`."""
    return f"{prefix}_{int(step):06d}.png"


def grids(workdir: str | Path, prefix: str) -> list[Path]:
    """The image grids with `prefix` in WORKDIR/plots, oldest step first."""
    folder = plots_dir(workdir)
    return sorted(folder.glob(f"{prefix}_*.png")) if folder.is_dir() else []


def config_to_json(config: ml_collections.ConfigDict) -> str:
    """The resolved config as JSON (saved as `WORKDIR/config.json`)."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def config_from_json(text: str) -> ml_collections.ConfigDict:
    """Inverse of `config_to_json`: a ConfigDict with the saved values (tuples come back as lists)."""
    return ml_collections.ConfigDict(json.loads(text))
