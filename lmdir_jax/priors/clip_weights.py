"""CLIP weights on disk <-> our NNX CLIP's parameters: pure mappings of names and layouts.

Our modules carry transformers' attribute names, so a parameter path such as
`('vision_model', 'encoder', 'layers', 0, 'self_attn', 'q_proj', 'kernel')` is the Hugging Face name
`vision_model.encoder.layers.0.self_attn.q_proj.weight` with PyTorch's layout: linear weights
(out, in) are our kernels transposed, convolutions (out, in, kh, kw) our (kh, kw, in, out), layer-norm
`weight` our `scale`, embedding `weight` our `embedding`. Every mapping here works both ways, so the
same table reads released weights and writes files the reference libraries load.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lmdir_jax.errors import UsageError
from lmdir_jax.outputs import atomic_write_bytes

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
FLAX_MSGPACK = "flax_model.msgpack"
# Buffers some checkpoints carry that are not weights.
_IGNORED = ("position_ids",)


def flatten(tree: dict, prefix: tuple = ()) -> list[tuple[tuple, object]]:
    """[(path, leaf)] of a nested dict, paths as tuples of keys."""
    out = []
    for k, v in tree.items():
        if isinstance(v, dict):
            out += flatten(v, (*prefix, k))
        else:
            out.append(((*prefix, k), v))
    return out


def unflatten(flat: dict) -> dict:
    """The nested dict of {path tuple: leaf}."""
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


def _conv_like(shape) -> bool:
    return len(shape) == 4


def hf_name(path: tuple, prefix: str = "") -> str:
    """The Hugging Face (PyTorch) name of one of our parameter paths."""
    *head, leaf = (str(k) for k in path)
    leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
    return prefix + ".".join([*head, leaf])


def to_torch_layout(path: tuple, value) -> np.ndarray:
    """Our array at `path` in PyTorch's layout."""
    a = np.asarray(value, np.float32)
    if path[-1] == "kernel":
        return a.transpose(3, 2, 0, 1) if _conv_like(a.shape) else a.T
    return a


def from_torch_layout(path: tuple, value) -> np.ndarray:
    """A PyTorch array in our layout at `path`."""
    a = np.asarray(value)
    if path[-1] == "kernel":
        return a.transpose(2, 3, 1, 0) if _conv_like(a.shape) else a.T
    return a


def to_hf(params: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """{Hugging Face name: float32 array in PyTorch layout} of our pure parameter dict."""
    return {hf_name(p, prefix): np.array(to_torch_layout(p, v), np.float32, order="C") for p, v in flatten(params)}


def from_hf(tensors: dict, shapes: dict, prefix: str = "", source: object = "checkpoint") -> dict:
    """Our pure parameter dict (float32) from {Hugging Face name: array}; `shapes` is the model's
    pure dict of ShapeDtypeStructs. A missing weight or a shape that differs is a UsageError naming
    the first one and the count; names the model does not have are ignored."""
    out, missing, wrong = {}, [], []
    for path, spec in flatten(shapes):
        name = hf_name(path, prefix)
        if name not in tensors:
            missing.append(name)
            continue
        a = from_torch_layout(path, tensors[name])
        if tuple(a.shape) != tuple(spec.shape):
            wrong.append(f"{name} {tuple(a.shape)} != {tuple(spec.shape)}")
            continue
        out[path] = np.asarray(a, np.float32)
    if missing:
        raise UsageError(f"{source}: {len(missing)} weights missing (first: {missing[0]})")
    if wrong:
        raise UsageError(f"{source}: {len(wrong)} weights of another shape (first: {wrong[0]})")
    return unflatten(out)


def has_torch_weights(folder: Path) -> bool:
    return any((folder / f).is_file() for f in (SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN))


def has_flax_weights(folder: Path) -> bool:
    return (folder / FLAX_MSGPACK).is_file()


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a .safetensors file as float32 numpy arrays (bf16/fp16 files included)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="flax") as f:
            return {k: np.asarray(f.get_tensor(k), np.float32) for k in f.keys()}  # noqa: SIM118
    except (OSError, ValueError, RuntimeError) as e:
        raise UsageError(f"cannot read {path}: {e}") from None


def read_torch_file(path: Path) -> dict[str, np.ndarray]:
    """A PyTorch pickle (state dict, or DA-CLIP's {'state_dict': ...}) as float32 numpy arrays; needs
    torch (one clear line when it is missing)."""
    try:
        import torch
    except ImportError:
        raise UsageError(f"{path} is a PyTorch pickle: install torch (pip install 'lmdir-jax[verify]') "
                         "or convert it to .safetensors") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable pickle is the same data problem
        raise UsageError(f"cannot read {path}: {e}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise UsageError(f"{path} holds no state dict")
    return {k: v.detach().to(torch.float32).numpy() for k, v in obj.items() if hasattr(v, "detach")}


def read_checkpoint_file(path: Path) -> dict[str, np.ndarray]:
    """A state dict in one file: .safetensors, or a PyTorch pickle (.pt, .pth, .bin)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    return read_torch_file(path)


def read_tensors(folder: Path) -> dict[str, np.ndarray]:
    """The weights of a Hugging Face folder: model.safetensors, its sharded index, or
    pytorch_model.bin (with torch)."""
    folder = Path(folder)
    if (folder / SAFETENSORS).is_file():
        return read_safetensors(folder / SAFETENSORS)
    if (folder / SAFETENSORS_INDEX).is_file():
        try:
            index = json.loads((folder / SAFETENSORS_INDEX).read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise UsageError(f"cannot read {folder / SAFETENSORS_INDEX}: {e}") from None
        out: dict[str, np.ndarray] = {}
        for shard in sorted(set(index.values())):
            out.update(read_safetensors(folder / shard))
        return out
    if (folder / TORCH_BIN).is_file():
        return read_torch_file(folder / TORCH_BIN)
    if has_flax_weights(folder):
        raise UsageError(f"{folder} has only {FLAX_MSGPACK}, which is read for whole CLIP models only: "
                         "save it as model.safetensors (transformers 4.x: CLIPTextModel.from_pretrained("
                         "folder, from_flax=True).save_pretrained(folder))")
    raise UsageError(f"{folder} has no weights ({SAFETENSORS} or {TORCH_BIN})")


def read_flax_msgpack(folder: Path, shapes: dict) -> dict:
    """Our pure parameter dict from a transformers Flax checkpoint (flax_model.msgpack): the Flax
    names are ours, with layer indices as strings."""
    from flax.serialization import msgpack_restore

    path = Path(folder) / FLAX_MSGPACK
    try:
        raw = msgpack_restore(path.read_bytes())
    except Exception as e:  # noqa: BLE001 - a corrupt msgpack is a data problem
        raise UsageError(f"cannot read {path}: {e}") from None
    flat = {tuple(str(k) for k in p): v for p, v in flatten(raw)}
    out, missing, wrong = {}, [], []
    for p, spec in flatten(shapes):
        key = tuple(str(k) for k in p)
        if key not in flat:
            missing.append("/".join(key))
        elif tuple(np.shape(flat[key])) != tuple(spec.shape):
            wrong.append("/".join(key))
        else:
            out[p] = np.asarray(flat[key], np.float32)
    if missing:
        raise UsageError(f"{folder}: {len(missing)} weights missing (first: {missing[0]})")
    if wrong:
        raise UsageError(f"{folder}: {len(wrong)} weights of another shape (first: {wrong[0]})")
    return unflatten(out)


def write_safetensors(tensors: dict[str, np.ndarray], path: Path) -> None:
    """Write float32 tensors as a .safetensors file with transformers' metadata, atomically."""
    from safetensors.numpy import save

    data = save({k: np.array(v, np.float32, order="C") for k, v in tensors.items()}, metadata={"format": "pt"})
    atomic_write_bytes(Path(path), data)
