"""Flax NNX LMDIR -> PyTorch state dict + config, written as a self-contained export folder.

An export folder holds:
  model.safetensors  the PyTorch state dict of `lmdir_jax.export.torch_model.LMDIRTorch` (float32)
  config.json        {"format", "version", "model": <model config>, "priors": {text_dim,
                     max_text_len, ref_size}, "input": layout notes, "source": where it came from}
  README.md          how to load and run it

Name mapping: the Flax path of the unscanned layout (`models.stacking.unstack_blocks`) joined with
'.' is the PyTorch name, with the leaf renamed
(conv/linear `kernel` -> `weight`, LayerNorm `scale` -> `weight`). Conv kernels HWIO -> OIHW
(depth-wise kernels (kh, kw, 1, C) -> (C, 1, kh, kw) by the same transpose), linear kernels
(in, out) -> (out, in); everything else is copied.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from lmdir_jax.errors import UsageError
from lmdir_jax.export import check
from lmdir_jax.export.folder import CONFIG_FILE, EXPORT_FILES, README_FILE, WEIGHTS_FILE
from lmdir_jax.models.stacking import unstack_blocks
from lmdir_jax.train.checkpoints import load_for_inference

FORMAT = "lmdir-torch"
VERSION = 1

README_TEXT = """# LMDIR exported to PyTorch

Exported by `lmdir export torch` from {source}.

```python
import torch
from lmdir_jax.export.torch_model import load   # needs only torch, numpy, safetensors

model = load("{name}")                  # this folder: config.json + model.safetensors
lq = torch.rand(1, 256, 256, 3)          # NHWC float32 in [0, 1], any height and width
with torch.no_grad():
    restored = model(lq)                 # (1, 256, 256, 3)
    # optional priors (a missing prior is masked):
    # model(lq, deg_states=..., deg_mask=..., scene_states=..., scene_mask=...,
    #       reference=..., has_reference=...)
```

Priors: CLIP text states (B, T, {text_dim}) with T <= {max_text_len} plus bool masks (B, T);
reference image (B, {ref_size}, {ref_size}, 3) in [0, 1] with has_reference (B,).
"""


def _torch_name_and_value(path: tuple[str, ...], value: np.ndarray) -> tuple[str, np.ndarray]:
    leaf = path[-1]
    value = np.asarray(value, dtype=np.float32)
    if leaf == "kernel":
        if value.ndim == 4:  # conv HWIO -> OIHW
            value = value.transpose(3, 2, 0, 1)
        elif value.ndim == 2:  # linear (in, out) -> (out, in)
            value = value.T
        else:
            raise ValueError(f"unexpected kernel rank {value.ndim} at {'.'.join(path)}")
        leaf = "weight"
    elif leaf == "scale":  # LayerNorm
        leaf = "weight"
    return ".".join((*path[:-1], leaf)), np.ascontiguousarray(value)


def flax_to_torch_state(params: dict) -> dict[str, np.ndarray]:
    """A PyTorch state dict (numpy float32 values) from `nnx.to_pure_dict(nnx.state(model, Param))`.

    Scanned block stacks are unstacked first (`models.stacking.unstack_blocks`): the same state
    dict whether the model was scanned or not.
    """
    params = unstack_blocks(params)
    out: dict[str, np.ndarray] = {}

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, (*path, str(k)))
        else:
            name, value = _torch_name_and_value(path, node)
            out[name] = value

    walk(params, ())
    return out


def model_config_dict(config_model) -> dict:
    """The `model` config section as plain JSON types (tuples -> lists)."""

    def plain(v):
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        return v

    return {k: plain(v) for k, v in config_model.to_dict().items()}


def export_metadata(config, source: str) -> dict:
    """The config.json of an export: model config and how the priors are shaped."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "name": str(config.get("name", "")),
        "model": model_config_dict(config.model),
        "priors": {
            "text_dim": int(config.model.text_dim),
            "max_text_len": int(config.priors.max_text_len),
            "ref_size": int(config.priors.ref_size),
        },
        "input": "lq NHWC float32 in [0, 1]; output NHWC float32",
        "source": source,
    }


def refuse_overlap(workdir: str | Path, output: str | Path) -> None:
    """UsageError when `output` is, contains or is inside the checkpoint `workdir` (an export
    with --force must never delete or overwrite the training run)."""
    wd, out = Path(workdir).resolve(), Path(output).resolve()
    if out == wd or wd in out.parents or out in wd.parents:
        raise UsageError(f"output {output} overlaps the checkpoint folder {workdir}; "
                         "choose an output outside the training run")


def torch_mirror(model, config_model):
    """The PyTorch mirror (`LMDIRTorch`, eval mode) holding an nnx model's parameters."""
    import torch

    from lmdir_jax.export.torch_model import LMDIRTorch  # torch: an optional dependency

    state = flax_to_torch_state(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    tm = LMDIRTorch(model_config_dict(config_model))
    tm.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()}, strict=True)
    return tm.eval()


def check_export_folder(output_dir: str | Path, force: bool) -> None:
    """UsageError unless `output_dir` is absent, empty, or (with `force`) a previous export: --force
    replaces an export's own files and never deletes anything else."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UsageError(f"output {output_dir} exists and is not a folder")
    entries = sorted(p.name for p in output_dir.iterdir()) if output_dir.is_dir() else []
    if entries and not force:
        raise UsageError(f"output {output_dir} exists and is not empty (use --force to overwrite)")
    foreign = [name for name in entries if name not in EXPORT_FILES]
    if foreign:
        raise UsageError(f"output {output_dir} holds files an export does not write ({', '.join(foreign[:3])}"
                         f"{', ...' if len(foreign) > 3 else ''}): --force only replaces a previous "
                         "export; choose an empty or new folder")


def _prepare_output(output_dir: Path, force: bool) -> None:
    check_export_folder(output_dir, force)
    for name in EXPORT_FILES:  # a previous export's files (check_export_folder allowed no others)
        (output_dir / name).unlink(missing_ok=True)
    output_dir.mkdir(parents=True, exist_ok=True)


def export_torch(
    workdir_or_model,
    output_dir: str | Path,
    *,
    config=None,
    force: bool = False,
    use_ema: bool = True,
    source: str | None = None,
) -> Path:
    """Write a PyTorch export (model.safetensors, config.json, README.md) to `output_dir`.

    `workdir_or_model` is a training workdir (loaded with `load_for_inference`, EMA parameters when
    `use_ema`) or an `LMDIR` nnx module together with its full `config` (and optionally a `source`
    description for config.json). A non-empty output folder
    is refused unless `force`. Returns the output folder. Needs no torch.
    """
    if isinstance(workdir_or_model, str | Path):
        workdir = Path(workdir_or_model)
        if not workdir.is_dir():
            raise UsageError(f"checkpoint folder not found: {workdir}")
        refuse_overlap(workdir, output_dir)
        model, config = load_for_inference(workdir, use_ema=use_ema)
        source = f"training workdir {workdir.resolve()}" + (" (EMA parameters)" if use_ema else "")
    else:
        if config is None:
            raise ValueError("export_torch(model, ...) needs config= (the run's full config)")
        model, source = workdir_or_model, source or "an in-memory model"
    output_dir = Path(output_dir)
    _prepare_output(output_dir, force)
    state = flax_to_torch_state(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    save_file(state, str(output_dir / WEIGHTS_FILE), metadata={"format": FORMAT})
    meta = export_metadata(config, source)
    (output_dir / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    (output_dir / README_FILE).write_text(
        README_TEXT.format(source=source, name=output_dir.name, **meta["priors"])
    )
    return output_dir


def self_check(model, config, output_dir: str | Path, *, seed: int = 0) -> float:
    """Load the export with PyTorch and return max |JAX - PyTorch| on a random input with priors.

    A bfloat16-compute model is compared through its float32 twin (same parameters).
    """
    from lmdir_jax.export.torch_model import load  # torch: an optional dependency

    torch_model = load(output_dir)
    inputs = check.random_inputs(int(config.model.text_dim), batch=2, height=37, width=45,
                                 ref_size=int(config.priors.ref_size), seed=seed,
                                 kinds=check.pip_kinds(config.model))
    return check.max_abs_diff(check.float32_twin(model, config.model), torch_model, inputs)


def onnx_self_check(model, config, path: str | Path, priors: str, *, seed: int = 0) -> float:
    """max |JAX - ONNX Runtime| on a random 2x37x45 input with the priors the file takes."""
    from lmdir_jax.export import graph  # torch: an optional dependency

    on = {"none": {"deg": False, "scene": False, "ref": False}, "text": {"ref": False},
          "all": {}}[priors]
    kinds = 0 if priors == "none" else check.pip_kinds(config.model)
    inputs = check.random_inputs(int(config.model.text_dim), batch=2, height=37, width=45,
                                 ref_size=int(config.priors.ref_size), seed=seed, kinds=kinds, **on)
    a = check.run_jax(check.float32_twin(model, config.model), inputs)
    b = graph.run_onnx(path, inputs)
    return float(np.max(np.abs(a - b)))
