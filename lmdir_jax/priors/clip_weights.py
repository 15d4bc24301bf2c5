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
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax.serialization import msgpack_restore
from safetensors.numpy import save

from lmdir_jax.errors import UsageError
from lmdir_jax.outputs import atomic_write_bytes

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
FLAX_MSGPACK = "flax_model.msgpack"


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


def from_hf(tensors: Mapping, shapes: dict, prefix: str = "", source: object = "checkpoint",
            convert=None) -> dict:
    """Our pure parameter dict (float32) from {Hugging Face name: array}; `shapes` is the model's
    pure dict of ShapeDtypeStructs. A missing weight or a shape that differs is a UsageError naming
    the first one and the count; names the model does not have are ignored. `convert(array)` is
    applied to each weight as it is read (e.g. `jnp.asarray` to a dtype, so a lazily read file never
    stands whole in host memory beside the parameters)."""
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
        out[path] = convert(a) if convert is not None else np.asarray(a, np.float32)
    if missing:
        raise UsageError(f"{source}: {len(missing)} weights missing (first: {missing[0]})")
    if wrong:
        raise UsageError(f"{source}: {len(wrong)} weights of another shape (first: {wrong[0]})")
    return unflatten(out)


# safetensors' dtype names -> numpy dtypes.
SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
MAX_HEADER = 100 << 20  # the safetensors format's own limit on the JSON header


class SafetensorsFile:
    """One .safetensors file: its header, and each tensor read on request with plain reads.

    safetensors' own reader maps the file: mapped pages count in the process's resident memory until
    the file is closed, so loading a 3.4 GB float32 UNet into bf16 parameters would hold the whole file
    beside them. Reading one tensor at a time into its own buffer holds one tensor."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                head = f.read(8)
                n = int.from_bytes(head, "little") if len(head) == 8 else -1
                if n < 2 or n > min(MAX_HEADER, size - 8):
                    raise ValueError("not a safetensors file (bad header length)")
                header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UsageError(f"cannot read {self.path}: damaged header ({e})") from None
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read {self.path}: {e}") from None
        if not isinstance(header, dict):
            raise UsageError(f"cannot read {self.path}: damaged header")
        header.pop("__metadata__", None)
        self._base, data = 8 + n, size - 8 - n
        self._tensors: dict[str, tuple[Any, tuple[int, ...], int, int]] = {}
        for key, info in header.items():
            try:
                dtype = np.dtype(SAFETENSORS_DTYPES[info["dtype"]])
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise UsageError(f"cannot read {key} from {self.path}: unknown dtype or damaged entry") from None
            if not 0 <= begin <= end <= data or end - begin != dtype.itemsize * math.prod(shape):
                raise UsageError(f"cannot read {key} from {self.path}: offsets outside the file (truncated?)")
            self._tensors[key] = (dtype, shape, begin, end)

    def keys(self) -> list[str]:
        """The tensor names, in the header's order."""
        return list(self._tensors)

    def read(self, key: str) -> np.ndarray:
        """One tensor as a numpy array of its stored dtype."""
        dtype, shape, begin, end = self._tensors[key]
        buf = np.empty(end - begin, np.uint8)
        try:
            with open(self.path, "rb") as f:
                f.seek(self._base + begin)
                view, done = memoryview(buf), 0
                while done < len(buf):
                    got = f.readinto(view[done:])
                    if not got:
                        raise ValueError("file ends early (truncated?)")
                    done += got
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read {key} from {self.path}: {e}") from None
        return buf.view(dtype).reshape(shape)


class LazyTensors(Mapping):
    """The tensors of one or more .safetensors files, each read (as float32) only when asked for:
    loading a model holds one file tensor at a time beside the parameters, not the whole file."""

    def __init__(self, paths: list[Path]):
        self._files = [SafetensorsFile(p) for p in paths]
        self._where = {k: f for f in self._files for k in f.keys()}  # noqa: SIM118

    def __getitem__(self, key: str) -> np.ndarray:
        return np.asarray(self._where[key].read(key), np.float32)

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def has_torch_weights(folder: Path) -> bool:
    """Whether a Hugging Face folder holds PyTorch-layout weights (safetensors or a pickle)."""
    return any((folder / f).is_file() for f in (SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN))


def has_flax_weights(folder: Path) -> bool:
    """Whether a Hugging Face folder holds transformers' Flax weights."""
    return (folder / FLAX_MSGPACK).is_file()


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a .safetensors file as float32 numpy arrays (bf16/fp16 files included)."""
    return dict(LazyTensors([path]))


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
        return LazyTensors([folder / SAFETENSORS])
    if (folder / SAFETENSORS_INDEX).is_file():
        return LazyTensors(shards(folder / SAFETENSORS_INDEX))
    if (folder / TORCH_BIN).is_file():
        return read_torch_file(folder / TORCH_BIN)
    if has_flax_weights(folder):
        raise UsageError(f"{folder} has only {FLAX_MSGPACK}, which is read for whole CLIP models only: "
                         "save it as model.safetensors (transformers 4.x: CLIPTextModel.from_pretrained("
                         "folder, from_flax=True).save_pretrained(folder))")
    raise UsageError(f"{folder} has no weights ({SAFETENSORS} or {TORCH_BIN})")


def shards(index_file: Path) -> list[Path]:
    """The shard files a `*.safetensors.index.json` names, beside it."""
    try:
        index = json.loads(Path(index_file).read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"cannot read {index_file}: {e}") from None
    return [Path(index_file).parent / shard for shard in sorted(set(index.values()))]


def read_flax_msgpack(folder: Path, shapes: dict) -> dict:
    """Our pure parameter dict from a transformers Flax checkpoint (flax_model.msgpack): the Flax
    names are ours, with layer indices as strings."""
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
    data = save({k: np.array(v, np.float32, order="C") for k, v in tensors.items()}, metadata={"format": "pt"})
    atomic_write_bytes(Path(path), data)


# --------------------------------------------------------------------------- OpenCLIP

_TEXT_B = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}
_TEXT_L = {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 12}
# OpenCLIP's model configs of the ViTs released CLIP priors use (open_clip/model_configs/*.json;
# read from open_clip itself when it is installed), and DA-CLIP's two.
OPENCLIP_CONFIGS: dict[str, dict] = {
    "ViT-B-32": {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
                 "text_cfg": _TEXT_B},
    "ViT-B-16": {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16},
                 "text_cfg": _TEXT_B},
    "ViT-L-14": {"embed_dim": 768, "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14},
                 "text_cfg": _TEXT_L},
    "ViT-L-14-336": {"embed_dim": 768, "vision_cfg": {"image_size": 336, "layers": 24, "width": 1024,
                                                      "patch_size": 14}, "text_cfg": _TEXT_L},
    "ViT-H-14": {"embed_dim": 1024, "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80,
                                                   "patch_size": 14},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}},
}
OPENCLIP_CONFIGS.update({f"{k}-quickgelu": {**v, "quick_gelu": True} for k, v in list(OPENCLIP_CONFIGS.items())})
OPENCLIP_CONFIGS["daclip_ViT-B-32"] = {**OPENCLIP_CONFIGS["ViT-B-32"], "custom_text": True}
OPENCLIP_CONFIGS["daclip_ViT-L-14"] = {**OPENCLIP_CONFIGS["ViT-L-14"], "custom_text": True}


def openclip_config(model: str | Path) -> dict:
    """An OpenCLIP model config: a model name (ours, or open_clip's when installed) or a JSON file
    (a model config, or an open_clip_config.json with its `model_cfg`)."""
    model = str(model)
    if model.endswith(".json"):
        try:
            d = json.loads(Path(model).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read model config {model}: {e}") from None
        return d.get("model_cfg", d)
    if model in OPENCLIP_CONFIGS:
        return OPENCLIP_CONFIGS[model]
    try:
        import open_clip

        found = open_clip.get_model_config(model)
    except ImportError:
        found = None
    if not found:
        raise UsageError(f"unknown OpenCLIP model {model!r}: give one of {', '.join(OPENCLIP_CONFIGS)} or "
                         "its model-config JSON (--model CONFIG.json)")
    return found


def model_name_in(path: Path) -> str | None:
    """The OpenCLIP model name a checkpoint's file name carries (daclip_ViT-B-32.pt -> daclip_ViT-B-32),
    the longest known one; None when it names none."""
    names = sorted(OPENCLIP_CONFIGS, key=len, reverse=True)
    stem = Path(path).name
    return next((n for n in names if n in stem), None)


def _openclip_tower(prefix: str, tower: str, n: int) -> list[tuple[str, tuple, str]]:
    """(OpenCLIP name, our path, op) of a transformer stack; op: id, T (linear), q/k/v (packed)."""
    out = []
    for i in range(n):
        p, q = f"{prefix}resblocks.{i}.", (tower, "encoder", "layers", i)
        out += [(p + "ln_1.weight", (*q, "layer_norm1", "scale"), "id"), (p + "ln_1.bias", (*q, "layer_norm1", "bias"), "id"),
                (p + "ln_2.weight", (*q, "layer_norm2", "scale"), "id"), (p + "ln_2.bias", (*q, "layer_norm2", "bias"), "id"),
                (p + "attn.out_proj.weight", (*q, "self_attn", "out_proj", "kernel"), "T"),
                (p + "attn.out_proj.bias", (*q, "self_attn", "out_proj", "bias"), "id"),
                (p + "mlp.c_fc.weight", (*q, "mlp", "fc1", "kernel"), "T"), (p + "mlp.c_fc.bias", (*q, "mlp", "fc1", "bias"), "id"),
                (p + "mlp.c_proj.weight", (*q, "mlp", "fc2", "kernel"), "T"),
                (p + "mlp.c_proj.bias", (*q, "mlp", "fc2", "bias"), "id")]
        for j, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out += [(p + "attn.in_proj_weight", (*q, "self_attn", name, "kernel"), f"T{j}"),
                    (p + "attn.in_proj_bias", (*q, "self_attn", name, "bias"), f"{j}")]
    return out


def openclip_vision_table(prefix: str, layers: int, resblocks: str = "transformer.") -> list[tuple[str, tuple, str]]:
    """The vision tower's (OpenCLIP name, our path, op) rows; `prefix` 'visual.' (or DA-CLIP's
    'visual_control.' with `resblocks` 'transformer.transformer.')."""
    v = "vision_model"
    return [
        (prefix + "conv1.weight", (v, "embeddings", "patch_embedding", "kernel"), "conv"),
        (prefix + "class_embedding", (v, "embeddings", "class_embedding"), "id"),
        (prefix + "positional_embedding", (v, "embeddings", "position_embedding", "embedding"), "id"),
        (prefix + "ln_pre.weight", (v, "pre_layrnorm", "scale"), "id"), (prefix + "ln_pre.bias", (v, "pre_layrnorm", "bias"), "id"),
        (prefix + "ln_post.weight", (v, "post_layernorm", "scale"), "id"),
        (prefix + "ln_post.bias", (v, "post_layernorm", "bias"), "id"),
        (prefix + "proj", ("visual_projection", "kernel"), "id"),
        *_openclip_tower(prefix + resblocks, v, layers),
    ]


def openclip_table(cfg: dict, prefix: str = "") -> list[tuple[str, tuple, str]]:
    """(OpenCLIP name, our path, op) of every weight of an OpenCLIP ViT CLIP (`custom_text` models
    keep the text tower under `text.`)."""
    t = prefix + ("text." if cfg.get("custom_text") else "")
    text_layers = int(cfg["text_cfg"].get("layers", 12))
    tm = "text_model"
    return [
        (t + "token_embedding.weight", (tm, "embeddings", "token_embedding", "embedding"), "id"),
        (t + "positional_embedding", (tm, "embeddings", "position_embedding", "embedding"), "id"),
        (t + "ln_final.weight", (tm, "final_layer_norm", "scale"), "id"),
        (t + "ln_final.bias", (tm, "final_layer_norm", "bias"), "id"),
        (t + "text_projection", ("text_projection", "kernel"), "id"),
        (prefix + "logit_scale", ("logit_scale",), "id"),
        *_openclip_tower(t + "transformer.", tm, text_layers),
        *openclip_vision_table(prefix + "visual.", int(cfg["vision_cfg"].get("layers", 12))),
    ]


def _read_op(a: np.ndarray, op: str) -> np.ndarray:
    if op == "id":
        return a
    if op == "T":
        return a.T
    if op == "conv":
        return a.transpose(2, 3, 1, 0)
    j = int(op[-1])
    part = np.split(a, 3, axis=0)[j]
    return part.T if op.startswith("T") else part


def from_table(tensors: dict, table: list, shapes: dict, source: object) -> dict:
    """Our pure parameter dict from a state dict through a (name, path, op) table; missing names or
    other shapes are one UsageError naming the first."""
    want = dict(flatten(shapes))
    out, missing, wrong = {}, [], []
    for name, path, op in table:
        if path not in want:
            continue
        if name not in tensors:
            missing.append(name)
            continue
        a = _read_op(np.asarray(tensors[name], np.float32), op)
        if tuple(a.shape) != tuple(want[path].shape):
            wrong.append(f"{name} {tuple(a.shape)} != {tuple(want[path].shape)}")
            continue
        out[path] = a
    if missing:
        raise UsageError(f"{source}: {len(missing)} weights missing (first: {missing[0]})")
    if wrong:
        raise UsageError(f"{source}: {len(wrong)} weights of another shape (first: {wrong[0]}); "
                         "is --model the checkpoint's model?")
    absent = [p for p in want if p not in out]
    if absent:
        raise UsageError(f"{source}: no weight for {'.'.join(map(str, absent[0]))}")
    return unflatten(out)


def to_table(params: dict, table: list) -> dict[str, np.ndarray]:
    """The state dict of a (name, path, op) table from our pure parameter dict (packed q/k/v
    re-joined)."""
    flat = {p: np.asarray(v, np.float32) for p, v in flatten(params)}
    out: dict[str, np.ndarray] = {}
    packed: dict[str, list] = {}
    for name, path, op in table:
        if path not in flat:
            continue
        a = flat[path]
        if op == "id":
            out[name] = a
        elif op == "T":
            out[name] = a.T
        elif op == "conv":
            out[name] = a.transpose(3, 2, 0, 1)
        else:
            packed.setdefault(name, [None] * 3)[int(op[-1])] = a.T if op.startswith("T") else a
    out.update({k: np.concatenate(v, axis=0) for k, v in packed.items()})
    return {k: np.array(v, np.float32, order="C") for k, v in out.items()}


def openclip_prefix(tensors: dict) -> str:
    """'module.' when a state dict was saved from DistributedDataParallel, else ''."""
    return "module." if tensors and all(k.startswith("module.") for k in tensors) else ""


def is_daclip(tensors: dict) -> bool:
    """Whether a state dict is DA-CLIP's (`clip.*` + `visual_control.*`)."""
    p = openclip_prefix(tensors)
    return any(k.startswith(p + "visual_control.") for k in tensors) and any(k.startswith(p + "clip.") for k in tensors)


# --------------------------------------------------------------------------- DA-CLIP's controller


def daclip_controller_table(layers: int, prefix: str = "") -> list[tuple[str, tuple, str]]:
    """(DA-CLIP name, controller path, op) of DA-CLIP's `visual_control`, its zero modules and its
    logit scale, onto our controller's state (`tower` in transformers' naming with string layer
    indices, `projection`, `zero_links`, `logit_scale`)."""
    rows = []
    for name, path, op in openclip_vision_table(prefix + "visual_control.", layers, "transformer.transformer."):
        if path == ("visual_projection", "kernel"):
            rows.append((name, ("projection",), op))
        else:
            tower_path = tuple(str(k) for k in path[1:])
            rows.append((name, ("tower", *tower_path), op))
    for i in range(layers):
        z = f"{prefix}visual_control.transformer.zero_modules.{i}."
        rows += [(z + "weight", ("zero_links", i, "kernel"), "T"), (z + "bias", ("zero_links", i, "bias"), "id")]
    rows.append((prefix + "logit_scale", ("logit_scale",), "id"))
    return rows
