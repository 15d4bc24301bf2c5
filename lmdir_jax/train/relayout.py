"""`lmdir model convert`: a training workdir's latest checkpoint in the other block layout.

A run trained with `model.scan_blocks=True` stores each level's blocks stacked (one leading axis);
an unscanned run stores blocks/0, blocks/1, ... The two cannot be restored into each other
directly (resuming with the other setting is refused in one line); this writes a new workdir
whose config.json and checkpoint (model, optimizer state, EMA, data-iterator state, at the same
step) use the requested layout, via `models.stacking`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
from flax import nnx

from lmdir_jax.errors import UsageError
from lmdir_jax.models import stacking
from lmdir_jax.train import checkpoints as ckpt
from lmdir_jax.train import mesh as mesh_lib
from lmdir_jax.train import state as state_lib
from lmdir_jax.workdir import checkpoints_dir, config_file, config_to_json


def convert_workdir(src: str | Path, dst: str | Path, scan_blocks: bool) -> int:
    """Write `dst` (a new or empty folder): `src`'s config with `model.scan_blocks=scan_blocks`
    and its latest checkpoint in that layout. Returns the converted step."""
    src, dst = Path(src).resolve(), Path(dst).resolve()
    config = ckpt.load_config(src)
    if dst == src or src in dst.parents or dst in src.parents:
        raise UsageError(f"--output {dst} must be outside the run {src} (and not contain it)")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise UsageError(f"--output {dst} exists and is not an empty folder")
    steps = sorted(int(p.name) for p in checkpoints_dir(src).glob("*") if p.name.isdigit())
    if not steps:
        raise UsageError(f"no checkpoints in {src}")
    saved = stacking.saved_layout(checkpoints_dir(src) / str(steps[-1]))
    configs = {}
    for name, scanned in (("src", saved == "scanned"), ("dst", scan_blocks)):
        c = config.copy_and_resolve_references()
        with c.unlocked():
            c.model.scan_blocks = bool(scanned)
        configs[name] = c
    mesh = mesh_lib.make_mesh(1, 1, jax.devices()[:1])
    src_setup = state_lib.make_setup(configs["src"], mesh)
    dst_setup = state_lib.make_setup(configs["dst"], mesh)
    manager = ckpt.read_only_manager(src)
    try:
        restored = ckpt.restore_latest(manager, src_setup.abstract, items=("model", "opt", "ema"))
    finally:
        manager.close()
    if restored is None:
        raise UsageError(f"no readable checkpoint in {checkpoints_dir(src)}")
    step, state = restored
    out = {}
    for item, value in state.items():
        target = jax.tree.map(lambda x: x, dst_setup.abstract[item])
        nnx.replace_by_pure_dict(target, stacking.relayout(nnx.to_pure_dict(value), scan_blocks))
        out[item] = target
    dst.mkdir(parents=True, exist_ok=True)
    config_file(dst).write_text(config_to_json(configs["dst"]))
    manager = ckpt.make_manager(dst, async_save=False)
    try:
        ckpt.save(manager, step, out, meta={"converted_from": str(src)})
        manager.wait_until_finished()
    finally:
        manager.close()
    data = checkpoints_dir(src) / str(step) / "data"
    if data.is_dir():  # the grain iterator state does not depend on the layout
        shutil.copytree(data, checkpoints_dir(dst) / str(step) / "data")
    return step
