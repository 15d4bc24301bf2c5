"""Loading a trained degradation controller (`lmdir priors train-controller`'s workdir, or DA-CLIP's
checkpoint file) and attaching it to a CLIP prior: the automatic mode's guess of the degradation.
The controller network and its assessor are `priors/controller.py`; its training is
`train/controller_train.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
from flax import nnx

from lmdir_jax.errors import UsageError
from lmdir_jax.priors.controller import (
    GRID,
    SPEC_FILE,
    Controller,
    DegradationAssessor,
    check_spec,
    load_daclip_controller,
)
from lmdir_jax.train import checkpoints as ckpt
from lmdir_jax.workdir import checkpoints_dir


def attach_from_config(clip, config, controller: str | None = None):
    """Attach the controller named by `controller` or `config.priors.controller` to `clip` (a
    `ClipPrior`); returns the assessor, or None when neither names one."""
    path = controller or str(config.priors.get("controller", "") or "")
    if not path or clip is None:
        return None
    assessor = load_controller(path, clip, grid=int(config.priors.get("controller_grid", GRID)))
    clip.attach_controller(assessor)
    return assessor


def load_controller(workdir: str | Path, clip, grid: int = GRID) -> DegradationAssessor:
    """A trained controller workdir (from `lmdir priors train-controller`), or DA-CLIP's released
    checkpoint file (`load_daclip_controller`), for `clip`.

    Missing folder, missing spec or checkpoint, or a controller for another CLIP -> UsageError.
    """
    wd = Path(workdir)
    if wd.is_file():
        return load_daclip_controller(wd, clip, grid=grid)
    if not wd.is_dir():
        raise UsageError(f"controller folder not found: {wd}")
    spec_file = wd / SPEC_FILE
    if not spec_file.is_file():
        raise UsageError(f"{wd} is not a controller workdir (no {SPEC_FILE}; train one with "
                         "`lmdir priors train-controller`)")
    try:
        spec = json.loads(spec_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {spec_file}: {e}") from None
    check_spec(wd, spec, clip)
    if not checkpoints_dir(wd).is_dir():
        raise UsageError(f"no checkpoints in controller folder {wd}")
    controller = Controller.from_clip(clip, reverse=spec.get("wiring") == "daclip")
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state = nnx.state(controller)
    abstract = {"model": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)}
    manager = ckpt.make_manager(wd, keep=1_000_000, async_save=False)
    try:
        restored = ckpt.restore_latest(manager, abstract, items=("model",))
    finally:
        manager.close()
    if restored is None:
        raise UsageError(f"no readable checkpoint in controller folder {wd}")
    nnx.update(controller, restored[1]["model"])
    return DegradationAssessor(controller, clip, grid=grid, max_text_len=spec.get("max_text_len"),
                               kinds=spec.get("kinds"))
