"""orbax checkpoints in WORKDIR/checkpoints: model + optimizer (+ EMA) + step + grain iterator state.

Each checkpoint step is an `ocp.args.Composite` of items:
  model  nnx.State of the network (all variables)
  opt    nnx.State of the nnx.Optimizer (step counter and optax state)
  ema    nnx.State of the EMA parameters (only when train.ema_decay > 0)
  data   the grain iterator state (grain.checkpoint.CheckpointSave), per process
  meta   JSON: step, device count, mesh shape, checkpoint `format` number, lmdir-jax version
Restoring takes abstract targets (jax.ShapeDtypeStruct with the *current* NamedSharding), so a run
saved on 8 devices resumes on 1 (or on another mesh shape).

What a step that cannot be restored leads to:
- a readable checkpoint whose parameter shapes do not fit the config: UsageError (exit 2);
- a format number this version does not know, or a read that fails while every file is present
  and decodes (permissions, memory, another orbax): CheckpointError (exit 1), nothing moved;
- a step shown to be damaged by `find_damage` (a missing, truncated or undecodable file): skipped
  for the next older step, with one warning line. Only training (`set_aside=True`) moves it to
  WORKDIR/checkpoints_corrupt/; inference reads leave every file where it is.
On resume, `check_resume_config` compares the config with WORKDIR/config.json before anything is
written.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
import tensorstore as ts
from absl import logging as absl_logging
from flax import nnx
from jax.experimental import multihost_utils

from lmdir_jax import __version__
from lmdir_jax.errors import DataError, UsageError
from lmdir_jax.models.stacking import check_layout
from lmdir_jax.train.state import build_model
from lmdir_jax.workdir import (
    CONFIG,
    checkpoints_dir,
    config_file,
    config_from_json,
    config_to_json,
    corrupt_dir,
)

ITEMS = ("model", "opt", "ema", "data", "meta")
ARRAY_ITEMS = ("model", "opt", "ema")

FORMAT = 1
"""The checkpoint layout (the items above and what they hold), recorded in each step's meta item as
`format`. A change that older lmdir-jax versions cannot read raises it; steps written before the
number was recorded have no `format` key and are format 1."""

class CheckpointError(DataError):
    """A checkpoint that cannot be used, for a reason other than proven damage: one line, exit 1."""


class Damaged(Exception):
    """A checkpoint step shown to be damaged: a file missing, truncated or undecodable."""

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
    path = config_file(workdir)
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


REPLICA_PARALLEL_MIN_BYTES = 1 << 20
"""Replicated arrays are split among processes for saving only from this size per slice up."""


def use_array_handler_for_this_run() -> None:
    """Register orbax's jax.Array handler with replica-parallel saving only across processes.

    Orbax's default splits every replicated array among its replicas, one device slice each. In
    one process all replicas are local, so that only costs a slicing op per device and shape (on
    an 8-device CPU mesh the tiny config's two saves took 42 s of which most was compiling 392
    slices). Several processes still share the writing of arrays of at least 1 MiB per slice.
    """
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


def make_manager(
    workdir: str | Path, keep: int = 3, async_save: bool = True, cleanup: bool = False
) -> ocp.CheckpointManager:
    """An orbax CheckpointManager on WORKDIR/checkpoints keeping the last `keep` steps, for writing.

    `cleanup` (training) removes what saves cut short by a killed process left behind (orbax's
    temporary folders, never a committed checkpoint). Reads use `read_only_manager`.
    """
    use_array_handler_for_this_run()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max(1, int(keep)),
        create=True,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=cleanup,
    )
    return ocp.CheckpointManager(checkpoints_dir(workdir), options=options)


def read_only_manager(workdir: str | Path) -> ocp.CheckpointManager:
    """An orbax CheckpointManager that only reads WORKDIR/checkpoints: it creates, deletes and
    cleans up nothing (restore, evaluate, export, model convert, the priors' controller)."""
    use_array_handler_for_this_run()
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)  # not "Given directory is read only" and such
    try:
        options = ocp.CheckpointManagerOptions(read_only=True, create=False, max_to_keep=None,
                                               save_interval_steps=0, enable_async_checkpointing=False)
        return ocp.CheckpointManager(checkpoints_dir(workdir), options=options)
    finally:
        absl_logging.set_verbosity(verbosity)


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: dict,
    iterator: Any = None,
    meta: dict | None = None,
) -> None:
    """Start an (asynchronous) save of the train state (its model, opt and ema entries) and the
    data-iterator state at `step`."""
    items: dict[str, Any] = {
        name: ocp.args.StandardSave(state[name]) for name in ARRAY_ITEMS if name in state
    }
    items["meta"] = ocp.args.JsonSave({
        "step": int(step), "devices": jax.device_count(), "format": FORMAT,
        "lmdir_jax": __version__, **(meta or {}),
    })
    if iterator is not None:
        items["data"] = grain.checkpoint.CheckpointSave(iterator)
    manager.save(int(step), args=ocp.args.Composite(**items), force=True)


def warn(message: str) -> None:
    """One `lmdir: warning: ...` line on stderr."""
    sys.stderr.write(f"lmdir: warning: {message}\n")
    sys.stderr.flush()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def unique_path(path: Path) -> Path:
    """`path`, or `path.1`, `path.2`, ... whichever does not exist yet (nothing is replaced)."""
    if not path.exists():
        return path
    k = 1
    while path.with_name(f"{path.name}.{k}").exists():
        k += 1
    return path.with_name(f"{path.name}.{k}")


def sync(name: str) -> None:
    """With several processes, wait until all reach this point (nothing with one)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def set_aside(src: Path, dst: Path) -> Path:
    """Move `src` to `dst` (or `dst.1`, ... when taken) on process 0, all processes waiting; never
    deletes. Returns where it went."""
    dst = unique_path(dst)
    sync(f"lmdir_set_aside_listed_{src.name}")
    if jax.process_index() == 0 and src.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(src), str(dst))
    sync(f"lmdir_set_aside_{src.name}")
    return dst


def _quarantine(manager: ocp.CheckpointManager, step: int) -> Path:
    """Move a step folder shown to be damaged to WORKDIR/checkpoints_corrupt/ (never deleted)."""
    directory = Path(manager.directory)
    dst = set_aside(directory / str(step), corrupt_dir(directory.parent) / str(step))
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


# tensorstore reports a missing, short or undecodable file with these (absl status codes and the
# decoders' own words); PERMISSION_DENIED, RESOURCE_EXHAUSTED and the rest prove nothing.
_DAMAGE_MARKERS = ("NOT_FOUND", "OUT_OF_RANGE", "DATA_LOSS", "Error decoding", "corrupt")


def _read_json(path: Path, step_dir: Path):
    """The JSON in `path`; Damaged when it is missing, empty or does not decode. Other OSErrors
    (a permission problem) pass through: they prove nothing about the file."""
    where = path.relative_to(step_dir)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise Damaged(f"{where} is missing") from None
    except IsADirectoryError:
        raise Damaged(f"{where} is a folder") from None
    try:
        return json.loads(text)
    except (UnicodeDecodeError, ValueError) as e:
        raise Damaged(f"{where} does not decode ({_first_line(e)})") from None


def read_meta(step_dir: str | Path) -> dict:
    """The meta item of a checkpoint step (step, devices, format, lmdir_jax, ...); Damaged when it
    is missing or undecodable."""
    step_dir = Path(step_dir)
    meta = _read_json(step_dir / "meta" / "metadata", step_dir)
    if not isinstance(meta, dict) or "step" not in meta:
        raise Damaged("meta/metadata holds no step")
    return meta


def check_format(meta: dict, step_dir: str | Path) -> None:
    """CheckpointError (one line) when the step's format number is not one this version reads."""
    fmt = meta.get("format", 1)  # (no number: written before it was recorded, format 1)
    if isinstance(fmt, int) and not isinstance(fmt, bool) and 1 <= fmt <= FORMAT:
        return
    writer = meta.get("lmdir_jax", "an unknown version")
    raise CheckpointError(
        f"checkpoint {step_dir} has format {fmt!r} (written by lmdir-jax {writer}); lmdir-jax "
        f"{__version__} reads checkpoint format {FORMAT} and older: use the lmdir-jax that wrote it "
        "(nothing was moved)"
    )


def _array_names(item_dir: Path, step_dir: Path) -> tuple[list[str], bool]:
    """(array names as orbax stores them, uses OCDBT?) from an item's _METADATA."""
    meta = _read_json(item_dir / "_METADATA", step_dir)
    tree = meta.get("tree_metadata") if isinstance(meta, dict) else None
    if not isinstance(tree, dict):
        raise Damaged(f"{(item_dir / '_METADATA').relative_to(step_dir)} holds no tree")
    names = []
    for key, value in tree.items():
        if isinstance(value, dict) and value.get("value_metadata", {}).get("skip_deserialize"):
            continue
        try:
            parts = ast.literal_eval(key)
        except (ValueError, SyntaxError):
            raise Damaged(f"{(item_dir / '_METADATA').relative_to(step_dir)} does not decode") from None
        names.append(".".join(str(p) for p in parts))
    return names, bool(meta.get("use_ocdbt", True))


def _read_arrays(item_dir: Path, step_dir: Path) -> None:
    """Read and decode every array of an orbax item with tensorstore; Damaged when a file is
    missing, short or undecodable; other failures (permissions, memory) pass through."""
    names, ocdbt = _array_names(item_dir, step_dir)
    if ocdbt and not (item_dir / "manifest.ocdbt").is_file():
        raise Damaged(f"{item_dir.name}/manifest.ocdbt is missing")
    context = ts.Context()
    for name in names:
        if ocdbt:
            kvstore = {"driver": "ocdbt", "base": f"file://{item_dir}/", "path": f"{name}/"}
        else:
            kvstore = {"driver": "file", "path": f"{item_dir / name}/"}
        try:
            array = ts.open({"driver": "zarr", "kvstore": kvstore}, open=True, read=True,
                            context=context).result()
            array.read().result()
        except ValueError as e:
            text = str(e)
            if any(m in text for m in _DAMAGE_MARKERS):
                raise Damaged(f"{item_dir.name}/{name}: {_tensorstore_damage(text, step_dir)}") from None
            raise


def _tensorstore_damage(text: str, step_dir: Path) -> str:
    """'truncated: model/d/123 (Requested byte range ...)' from a tensorstore error message."""
    text = text.split(" [tensorstore_spec")[0]
    status = re.match(r"([A-Z_]+): ", text)
    what = {"NOT_FOUND": "missing", "OUT_OF_RANGE": "truncated"}.get(status and status.group(1),
                                                                      "undecodable")
    files = re.findall(r'local file "([^"]+)"', text)
    where = files[-1] if files else ""
    try:
        where = str(Path(where).relative_to(step_dir))
    except ValueError:
        pass
    detail = text.rsplit('": ', 1)[-1] if '": ' in text else ""
    detail = f" ({detail[:120]})" if detail and "local file" not in detail else ""
    return f"{what}: {where}{detail}" if where else f"{what}{detail}"


def find_damage(step_dir: str | Path, items: tuple[str, ...] = ("model", "opt", "meta")) -> str | None:
    """What is damaged in a checkpoint step folder, or None when every file of `items` is present
    and decodes.

    Checked explicitly: the item folders exist, the JSON files (meta, orbax's _METADATA, the grain
    iterator states) decode, every array of the model/opt/ema items reads through tensorstore
    (OCDBT checksums and zstd framing catch truncated and altered files). A permission problem or
    a MemoryError is raised, never reported as damage.
    """
    step_dir = Path(step_dir)
    try:
        if not step_dir.is_dir():
            return "the step folder is missing"
        for item in items:
            item_dir = step_dir / item
            if not item_dir.is_dir():
                return f"item {item} is missing"
            if item == "meta":
                read_meta(step_dir)
            elif item == "data":
                states = sorted(item_dir.glob("*.json"))
                if not states:
                    return "data/ holds no iterator state"
                for f in states:
                    _read_json(f, step_dir)
            elif item in ARRAY_ITEMS:
                _read_arrays(item_dir, step_dir)
    except Damaged as e:
        return str(e)
    return None


def _restore_args(manager, step: int, abstract: dict, items, iterator) -> dict[str, Any]:
    args: dict[str, Any] = {}
    for name in items:
        if name == "data":
            if iterator is not None and _has_item(manager, step, "data"):
                args["data"] = grain.checkpoint.CheckpointRestore(iterator)
        elif name in abstract and (name != "ema" or _has_item(manager, step, "ema")):
            # (EMA switched on after this checkpoint was written: EMA starts from the params.)
            args[name] = ocp.args.StandardRestore(abstract[name])
    return args


def _restore_step(manager, step: int, abstract: dict, items, iterator) -> dict:
    """Restore one step; Damaged when it is shown to be damaged, CheckpointError when it cannot be
    read for another reason, UsageError when it does not fit `abstract`."""
    step_dir = Path(manager.directory) / str(step)
    args = _restore_args(manager, step, abstract, items, iterator)
    names = tuple(["meta", *args])
    try:
        check_format(read_meta(step_dir), step_dir)
        missing = [n for n in args if not _has_item(manager, step, n)]
        if missing:
            raise Damaged(f"item {', '.join(missing)} is missing")
        if "model" in abstract:  # scanned blocks into an unscanned model or back: one clear line
            check_layout(step_dir, abstract["model"])
        for name in args:
            if name in ("model", "ema"):
                check_shapes(manager, step, name, abstract[name])
        restored = manager.restore(step, args=ocp.args.Composite(**args))
    except ShapeMismatch as e:
        raise UsageError(
            f"the checkpoint at step {step} in {manager.directory} does not fit the config ({e}); "
            "use a new --workdir for another model"
        ) from None
    except (Damaged, CheckpointError, UsageError):
        raise
    except MemoryError:
        raise CheckpointError(f"out of memory while reading the checkpoint at step {step} in "
                              f"{manager.directory} (nothing was moved)") from None
    except Exception as e:
        failure = f"{type(e).__name__}: {_first_line(e)}"
        try:
            damage = find_damage(step_dir, names)
        except MemoryError:
            damage = None
        except Exception as check:  # e.g. PermissionError: says what is wrong better than orbax
            failure = f"{type(check).__name__}: {_first_line(check)}"
            damage = None
        if damage is None:
            raise CheckpointError(
                f"cannot read the checkpoint at step {step} in {manager.directory} ({failure}); no "
                "file of it is shown to be damaged, so nothing was moved: fix the cause (permissions, "
                "memory, the orbax version) and rerun"
            ) from None
        raise Damaged(damage) from None
    return {k: restored[k] for k in args if k != "data"}


def restore_newest(
    manager: ocp.CheckpointManager,
    abstract: dict,
    iterator: Any = None,
    items: tuple[str, ...] = ("model", "opt", "ema", "data"),
    set_aside: bool = False,
) -> tuple[tuple[int, dict] | None, list[tuple[int, str, Path | None]]]:
    """((step, state) of the newest usable checkpoint or None, [(step, damage, moved to)] of the
    newer steps shown to be damaged), without a word on stderr.

    Damaged steps stay in place unless `set_aside` (training), which moves them to
    WORKDIR/checkpoints_corrupt/. Anything else stops with an exception, nothing moved.
    """
    damaged: list[tuple[int, str, Path | None]] = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            state = _restore_step(manager, step, abstract, items, iterator)
        except Damaged as e:
            damaged.append((int(step), str(e), _quarantine(manager, step) if set_aside else None))
            continue
        return (int(step), state), damaged
    return None, damaged


def describe_damage(damaged: list[tuple[int, str, Path | None]]) -> str:
    """'step 4 (model/w: ...; moved to ...), step 2 (...)' for messages."""
    return ", ".join(f"step {s} ({why}; " + (f"moved to {dst})" if dst else "left in place)")
                     for s, why, dst in damaged)


def restore_latest(
    manager: ocp.CheckpointManager,
    abstract: dict,
    iterator: Any = None,
    items: tuple[str, ...] = ("model", "opt", "ema", "data"),
    set_aside: bool = False,
) -> tuple[int, dict] | None:
    """Restore the newest usable checkpoint onto the shardings in `abstract`.

    Returns (step, state) or None when there is none. `iterator` (a grain iterator) gets its saved
    state set in place. Steps shown to be damaged are skipped with one warning line (and moved to
    WORKDIR/checkpoints_corrupt/ only when `set_aside`); a readable one that does not fit
    `abstract` is a UsageError; any other failure a CheckpointError. Nothing is written unless
    `set_aside`.
    """
    restored, damaged = restore_newest(manager, abstract, iterator, items, set_aside)
    if damaged:
        then = f"using step {restored[0]}" if restored else "no earlier checkpoint is left"
        warn(f"damaged checkpoint(s) in {manager.directory}: {describe_damage(damaged)}; {then}")
    return restored


def load_config(workdir: str | Path):
    """The resolved config saved by training as WORKDIR/config.json."""
    path = config_file(workdir)
    if not path.is_file():
        raise UsageError(f"no trained run in {workdir} (missing {CONFIG})")
    config = config_from_json(path.read_text())
    model = config.model
    with model.unlocked():
        for k, v in list(model.items()):
            if isinstance(v, list):
                model[k] = tuple(v)
    return config


def load_for_inference(workdir: str | Path, use_ema: bool = True, step: int | None = None):
    """(model, config) from a training workdir: config.json + the newest usable checkpoint.

    Builds the network from the saved config and restores its parameters only (EMA parameters when
    present and `use_ema`), on one device. Used by restore, evaluate and export. Writes nothing:
    a newer step shown to be damaged is skipped with one warning line and left where it is.
    """
    workdir = Path(workdir)
    config = load_config(workdir)
    if not checkpoints_dir(workdir).is_dir():
        raise UsageError(f"no checkpoints in {workdir} (missing {checkpoints_dir(workdir)})")
    model = build_model(config)
    device = jax.devices()[0]
    sharding = jax.sharding.SingleDeviceSharding(device)

    def target(state):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)

    abstract = {"model": target(nnx.state(model))}
    if use_ema:
        abstract["ema"] = target(nnx.state(model, nnx.Param))
    manager = read_only_manager(workdir)
    try:
        if step is not None:
            if step not in manager.all_steps():
                raise UsageError(f"no checkpoint at step {step} in {workdir}")
            try:
                state = _restore_step(manager, step, abstract, ("model", "ema"), None)
            except Damaged as e:
                raise CheckpointError(f"the checkpoint at step {step} in {workdir} is damaged "
                                      f"({e}); nothing was moved") from None
            restored = (step, state)
        else:
            restored, damaged = restore_newest(manager, abstract, items=("model", "ema"))
    finally:
        manager.close()
    if step is None and restored is None:
        if not damaged:
            raise UsageError(f"no checkpoint in {checkpoints_dir(workdir)}")
        raise CheckpointError(f"no readable checkpoint in {checkpoints_dir(workdir)}: "
                              f"{describe_damage(damaged)}")
    if step is None and damaged:
        warn(f"damaged checkpoint(s) in {checkpoints_dir(workdir)}: {describe_damage(damaged)}; "
              f"using step {restored[0]}")
    _, state = restored
    nnx.update(model, state["model"])
    if use_ema and "ema" in state:
        nnx.update(model, state["ema"])
    return model, config
