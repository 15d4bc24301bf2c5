"""Small training workdirs written through the real checkpoint path, without training.

`write_workdir(path, steps)` writes WORKDIR/config.json and one orbax checkpoint per step (model,
optimizer, grain iterator state, meta) of a very small LMDIR, exactly as `lmdir train` saves them;
step k holds the initial parameters + k * 1e-3, so every step is told apart.

tests/data/checkpoint_format1/ is a checkpoint of today's format (1) written by this module and
committed, so that a later lmdir-jax proves it still reads it. Regenerate it (only when
checkpoints.FORMAT changes, keeping the old folder) with

    PYTHONPATH=. python tests/checkpoint_fixture.py tests/data/checkpoint_format1
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

# A model small enough for a committed checkpoint (about 20 k parameters; model + Adam moments
# < 300 KB on disk), with every part of the network present.
OVERRIDES = [
    "model.width=2",
    "model.text_dim=8",
    "model.prompt_dim=4",
    "model.ref_dim=4",
    "model.refinement_blocks=0",
    "model.ffn_expansion=1.0",
    "model.catb_levels=(4,)",
    "model.rtb_levels=(4,)",
    "data.patch_size=16",
]


def config():
    """The tiny config with OVERRIDES."""
    from lmdir_jax.config import load_config

    return load_config("tiny", OVERRIDES)


def write_workdir(workdir: str | Path, steps: tuple[int, ...] = (1, 2), opt: bool = True) -> Path:
    """A training workdir holding checkpoints at `steps` (model, opt, data, meta; without opt
    when not `opt`: the inference items only); returns it."""
    import jax
    import jax.numpy as jnp

    from lmdir_jax.data.pipeline import make_train_iterator
    from lmdir_jax.train import checkpoints as ckpt
    from lmdir_jax.train import mesh as mesh_lib
    from lmdir_jax.train import state as state_lib
    from lmdir_jax.train.loop import write_config

    workdir = Path(workdir).resolve()
    cfg = config()
    write_config(cfg, workdir)
    mesh = mesh_lib.make_mesh(1, 1, jax.devices()[:1])
    setup = state_lib.make_setup(cfg, mesh)
    state = state_lib.init_state(cfg, setup)
    iterator = make_train_iterator(cfg)
    manager = ckpt.make_manager(workdir, keep=len(steps), async_save=False)
    try:
        for step in steps:
            shifted = dict(state if opt else {"model": state["model"]}, model=jax.tree.map(
                lambda x, k=step: x + k * 1e-3 if jnp.issubdtype(x.dtype, jnp.floating) else x,
                state["model"]))
            next(iterator)
            ckpt.save(manager, step, shifted, iterator, meta={"mesh": [1, 1]})
            manager.wait_until_finished()
    finally:
        manager.close()
        iterator.close()
    return workdir


def param_digest(model) -> str:
    """sha256 of the model's parameters (paths, dtypes, shapes and bytes, in tree order)."""
    import jax
    import numpy as np
    from flax import nnx

    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]:
        x = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)} {x.dtype} {x.shape}".encode())
        h.update(x.tobytes())
    return h.hexdigest()


def listing(root: str | Path) -> dict[str, tuple]:
    """{relative path: (kind, size, mtime_ns, sha256)} of everything under `root` (folders too)."""
    root = Path(root)
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
            out[p.relative_to(root).as_posix()] = ("dir" if p.is_dir() else "file", st.st_size,
                                                   st.st_mtime_ns, digest)
    return out


if __name__ == "__main__":
    from lmdir_jax.train.checkpoints import load_for_inference

    wd = write_workdir(sys.argv[1], steps=(1,), opt=False)
    model, _ = load_for_inference(wd)
    (wd.parent / f"{wd.name}.json").write_text(json.dumps({"step": 1, "params_sha256": param_digest(model)},
                                                          indent=1) + "\n")
    print(f"wrote {wd}: {sum(f.stat().st_size for f in wd.rglob('*') if f.is_file())} bytes")
