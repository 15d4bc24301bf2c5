"""orbax checkpoints in WORKDIR/checkpoints: model + optimizer (+ EMA) + step + grain iterator state.

Each checkpoint step is an `ocp.args.Composite` of items:
  model  nnx.State of the network (all variables)
  opt    nnx.State of the nnx.Optimizer (step counter and optax state)
  ema    nnx.State of the EMA parameters (only when train.ema_decay > 0)
  data   the grain iterator state (grain.checkpoint.CheckpointSave), per process
  meta   JSON: step, device count, mesh shape
Restoring takes abstract targets (jax.ShapeDtypeStruct with the *current* NamedSharding), so a run
saved on 8 devices resumes on 1 (or on another mesh shape). A checkpoint whose parameter shapes do
not fit the config is a UsageError (never "corruption"); a checkpoint that cannot be read is
reported in one warning line saying what is used instead, and moved to WORKDIR/checkpoints_corrupt/.
On resume, `check_resume_config` compares the config with WORKDIR/config.json before anything is
written.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from lmdir_jax.errors import UsageError

ITEMS = ("model", "opt", "ema", "data", "meta")

# Config keys that may change when a run resumes (they alter neither parameter shapes nor the data
# order); everything else under FIXED_PREFIXES needs --config.train.allow_config_change=True.
FIXED_PREFIXES = ("seed", "model.", "data.", "priors.clip", "priors.cache", "priors.max_text_len",
                  "priors.ref_size")
FREE_KEYS = ("data.num_workers", "data.read_threads", "data.prefetch", "data.val_",
             "model.scan_unroll")


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(old: dict, new: dict) -> list[str]:
    """Dotted keys present in both configs (as JSON dicts) whose values differ, sorted."""
    a, b = _flatten(old), _flatten(new)
    return sorted(k for k in a.keys() & b.keys() if a[k] != b[k])


def is_fixed(key: str) -> bool:
    """Whether changing `key` on resume would alter parameter shapes or the data order."""
    return key.startswith(FIXED_PREFIXES) and not key.startswith(FREE_KEYS)


def check_resume_config(config, workdir: str | Path) -> list[str]:
    """Compare `config` with WORKDIR/config.json (if any); returns the changed keys.

    A change of a fixed key (model, data order, seed, prior inputs) is a UsageError naming the
    keys, unless `config.train.allow_config_change`. Reads only: nothing is written.
    """
    from lmdir_jax.config import config_to_json

    path = Path(workdir) / "config.json"
    if not path.is_file():
        return []
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} is unreadable ({e}); use another --workdir") from None
    new = json.loads(config_to_json(config))
    changed = config_changes(old, new)
    fixed = [k for k in changed if is_fixed(k)]
    if fixed and not bool(config.train.get("allow_config_change", False)):
        a, b = _flatten(old), _flatten(new)
        diff = ", ".join(f"{k}: {_short(a[k])} -> {_short(b[k])}" for k in fixed)
        raise UsageError(
            f"{workdir} holds a run with another config ({diff}); this would change parameter shapes "
            "or the data order: use a new --workdir, or --config.train.allow_config_change=True"
        )
    return changed


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def checkpoint_dir(workdir: str | Path) -> Path:
    """WORKDIR/checkpoints (absolute)."""
    return Path(workdir).resolve() / "checkpoints"


REPLICA_PARALLEL_MIN_BYTES = 1 << 20
"""Replicated arrays are split among processes for saving only from this size per slice up."""


def use_array_handler_for_this_run() -> None:
    """Register orbax's jax.Array handler with replica-parallel saving only across processes.

    Orbax's default splits every replicated array among its replicas, one device slice each. In
    one process all replicas are local, so that only costs a slicing op per device and shape (on
    an 8-device CPU mesh the tiny config's two saves took 42 s of which most was compiling 392
    slices). Several processes still share the writing of arrays of at least 1 MiB per slice.
    """
    from absl import logging as absl_logging

    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)  # not "overriding jax.Array" on every command
    try:
        ocp.type_handlers.register_type_handler(
            jax.Array,
            ocp.type_handlers.ArrayHandler(
                use_replica_parallel=jax.process_count() > 1,
                min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES,
            ),
            override=True,
        )
    finally:
        absl_logging.set_verbosity(verbosity)


def make_manager(workdir: str | Path, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
    """An orbax CheckpointManager on WORKDIR/checkpoints keeping the last `keep` steps."""
    use_array_handler_for_this_run()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max(1, int(keep)),
        create=True,
        enable_async_checkpointing=async_save,
    )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: dict,
    iterator: Any = None,
    meta: dict | None = None,
) -> None:
    """Start an (asynchronous) save of the train state and the data-iterator state at `step`."""
    import grain

    items: dict[str, Any] = {
        "model": ocp.args.StandardSave(state["model"]),
        "opt": ocp.args.StandardSave(state["opt"]),
        "meta": ocp.args.JsonSave(
            {"step": int(step), "devices": jax.device_count(), **(meta or {})}
        ),
    }
    if "ema" in state:
        items["ema"] = ocp.args.StandardSave(state["ema"])
    if iterator is not None:
        items["data"] = grain.checkpoint.CheckpointSave(iterator)
    manager.save(int(step), args=ocp.args.Composite(**items), force=True)


def _warn(message: str) -> None:
    sys.stderr.write(f"lmdir: warning: {message}\n")
    sys.stderr.flush()


def _quarantine(manager: ocp.CheckpointManager, step: int) -> Path:
    """Move an unreadable step folder out of the manager's directory (never silently deleted)."""
    src = Path(manager.directory) / str(step)
    dst = Path(manager.directory).parent / "checkpoints_corrupt" / str(step)
    if jax.process_index() == 0 and src.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists():
            shutil.rmtree(dst)
        shutil.move(str(src), str(dst))
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"lmdir_quarantine_{step}")
    manager.reload()
    return dst


def _has_item(manager: ocp.CheckpointManager, step: int, item: str) -> bool:
    return (Path(manager.directory) / str(step) / item).exists()


def _shapes(tree) -> dict[str, tuple]:
    """{'a/b/c': shape} of the array leaves of a (nested dict / nnx.State) tree."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    out = {}
    for path, leaf in leaves:
        if hasattr(leaf, "shape"):
            key = "/".join(str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))) for p in path)
            out[key.removesuffix("/value")] = tuple(leaf.shape)  # (saved nnx Variables end in /value)
    return out


class ShapeMismatch(Exception):
    """A readable checkpoint whose arrays do not have the config's shapes."""


def check_shapes(manager: ocp.CheckpointManager, step: int, name: str, abstract) -> None:
    """Raise ShapeMismatch when item `name` of `step` holds other arrays than `abstract`.

    Reads only the item's metadata; an unreadable one raises whatever orbax raises.
    """
    meta = ocp.StandardCheckpointHandler().metadata(Path(manager.directory) / str(step) / name)
    tree = getattr(meta, "tree", meta)
    saved = _shapes(tree)
    want = _shapes(abstract.to_pure_dict() if hasattr(abstract, "to_pure_dict") else abstract)
    for key in sorted(want.keys() | saved.keys()):
        if saved.get(key) != want.get(key):
            got = "absent" if key not in saved else f"shape {saved[key]}"
            exp = "absent" if key not in want else f"shape {want[key]}"
            raise ShapeMismatch(f"{name}/{key} is {got} in the checkpoint but {exp} in the config")


def restore_latest(
    manager: ocp.CheckpointManager,
    abstract: dict,
    iterator: Any = None,
    items: tuple[str, ...] = ("model", "opt", "ema", "data"),
) -> tuple[int, dict] | None:
    """Restore the newest readable checkpoint onto the shardings in `abstract`.

    Returns (step, state) or None when there is no checkpoint. `iterator` (a grain iterator) gets
    its saved state set in place. Unreadable checkpoints are reported, moved aside and skipped; a
    readable one that does not fit `abstract` (another model config) is a UsageError.
    """
    import grain

    from lmdir_jax.models.stacking import check_layout

    steps = sorted(manager.all_steps(), reverse=True)
    for i, step in enumerate(steps):
        if "model" in abstract:  # scanned blocks into an unscanned model or back: one clear line
            check_layout(Path(manager.directory) / str(step), abstract["model"])
        args: dict[str, Any] = {}
        for name in items:
            if name == "data":
                if iterator is not None and _has_item(manager, step, "data"):
                    args["data"] = grain.checkpoint.CheckpointRestore(iterator)
            elif name in abstract and (name != "ema" or _has_item(manager, step, "ema")):
                # (EMA switched on after this checkpoint was written: EMA starts from the params.)
                args[name] = ocp.args.StandardRestore(abstract[name])
        try:
            missing = [n for n in args if n != "data" and not _has_item(manager, step, n)]
            if missing:
                raise FileNotFoundError(f"item(s) {', '.join(missing)} missing")
            for name in args:
                if name in ("model", "ema"):
                    check_shapes(manager, step, name, abstract[name])
            restored = manager.restore(step, args=ocp.args.Composite(**args))
        except ShapeMismatch as e:
            raise UsageError(
                f"the checkpoint at step {step} in {manager.directory} does not fit the config ({e}); "
                "use a new --workdir for another model"
            ) from None
        except Exception as e:  # a truncated / corrupt checkpoint: report, fall back
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
            dst = _quarantine(manager, step)
            later = f"trying step {steps[i + 1]}" if i + 1 < len(steps) else "no earlier checkpoint is left"
            _warn(f"checkpoint at step {step} is unreadable ({type(e).__name__}: {first}); "
                  f"moved to {dst}; {later}")
            continue
        state = {k: restored[k] for k in args if k != "data"}
        return int(step), state
    return None


def load_config(workdir: str | Path):
    """The resolved config saved by training as WORKDIR/config.json."""
    from lmdir_jax.config import config_from_json

    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise UsageError(f"no trained run in {workdir} (missing config.json)")
    config = config_from_json(path.read_text())
    model = config.model
    with model.unlocked():
        for k, v in list(model.items()):
            if isinstance(v, list):
                model[k] = tuple(v)
    return config


def load_for_inference(workdir: str | Path, use_ema: bool = True, step: int | None = None):
    """(model, config) from a training workdir: config.json + the latest readable checkpoint.

    Builds the network from the saved config and restores its parameters only (EMA parameters when
    present and `use_ema`), on one device. Used by restore, evaluate and export.
    """
    from flax import nnx

    from lmdir_jax.train.state import build_model

    workdir = Path(workdir)
    config = load_config(workdir)
    if not checkpoint_dir(workdir).is_dir():
        raise UsageError(f"no checkpoints in {workdir} (missing {checkpoint_dir(workdir)})")
    model = build_model(config)
    device = jax.devices()[0]
    sharding = jax.sharding.SingleDeviceSharding(device)

    def target(state):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)

    abstract = {"model": target(nnx.state(model))}
    if use_ema:
        abstract["ema"] = target(nnx.state(model, nnx.Param))
    manager = make_manager(workdir, keep=1_000_000, async_save=False)
    try:
        if step is not None:
            if step not in manager.all_steps():
                raise UsageError(f"no checkpoint at step {step} in {workdir}")
            args = {"model": ocp.args.StandardRestore(abstract["model"])}
            if use_ema and _has_item(manager, step, "ema"):
                args["ema"] = ocp.args.StandardRestore(abstract["ema"])
            got = manager.restore(step, args=ocp.args.Composite(**args))
            restored = (step, {k: got[k] for k in args})
        else:
            restored = restore_latest(manager, abstract, items=("model", "ema"))
    finally:
        manager.close()
    if restored is None:
        raise UsageError(f"no readable checkpoint in {checkpoint_dir(workdir)}")
    _, state = restored
    nnx.update(model, state["model"])
    if use_ema and "ema" in state:
        nnx.update(model, state["ema"])
    return model, config
