"""The parts of a diffusers-layout Stable Diffusion folder <-> our NNX UNet, VAE and CLIP text tower.

unet/ and vae/ hold a diffusers config.json and `diffusion_pytorch_model.safetensors` (or its
`.fp16` variant, a sharded index, or `.bin` when torch is installed); text_encoder/ is a transformers
`CLIPTextModel` folder. Our modules carry diffusers' names, so `clip_weights`' name and layout
mapping (PyTorch (out, in) <-> our kernels) reads and writes them both ways, without torch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

import lmdir_jax
from lmdir_jax.errors import UsageError
from lmdir_jax.priors import clip_model, clip_weights
from lmdir_jax.priors.unet import UNet2DConditionModel, UNetConfig
from lmdir_jax.priors.vae import AutoencoderKL, VAEConfig

WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHT_FILES = (WEIGHTS, "diffusion_pytorch_model.fp16.safetensors")
WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
TORCH_BIN = "diffusion_pytorch_model.bin"
FLAX_WEIGHTS = "diffusion_flax_model.msgpack"
# The VAE attention's names before diffusers 0.14 (still in some SD 1.x downloads).
_OLD_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def read_config(folder: Path) -> dict:
    """A part's config.json as a dict (one clear line when missing or unreadable)."""
    f = Path(folder) / "config.json"
    if not f.is_file():
        raise UsageError(f"incomplete Stable Diffusion folder: {f} is missing")
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {f}: {e}") from None


class _Renamed(Mapping):
    """A state dict seen with the VAE attention's current names (old names mapped, 1x1 convolutions
    of the oldest conversions squeezed to linear weights)."""

    def __init__(self, tensors: Mapping):
        self._tensors, self._names = tensors, {}
        for name in tensors:
            parts = name.split(".")
            if len(parts) >= 2 and parts[-2] in _OLD_VAE_ATTENTION:
                self._names[".".join([*parts[:-2], _OLD_VAE_ATTENTION[parts[-2]], parts[-1]])] = name
            else:
                self._names[name] = name

    def __getitem__(self, key: str) -> np.ndarray:
        old = self._names[key]
        a = self._tensors[old]
        return a[:, :, 0, 0] if old != key and a.ndim == 4 else a

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def read_weights(folder: Path) -> Mapping:
    """{diffusers name: float32 array} of a unet/ or vae/ folder, safetensors read lazily; old VAE
    attention names renamed."""
    folder = Path(folder)
    file = next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    if file is not None:
        tensors = clip_weights.LazyTensors([file])
    elif (folder / WEIGHTS_INDEX).is_file():
        tensors = clip_weights.LazyTensors(clip_weights.shards(folder / WEIGHTS_INDEX))
    elif (folder / TORCH_BIN).is_file():
        tensors = clip_weights.read_torch_file(folder / TORCH_BIN)
    elif (folder / FLAX_WEIGHTS).is_file():
        raise UsageError(
            f"{folder} has only {FLAX_WEIGHTS} (diffusers' removed Flax format): save it as safetensors "
            "with diffusers <= 0.39 (e.g. UNet2DConditionModel.from_pretrained(folder, from_flax=True)"
            ".save_pretrained(folder)), or use the PyTorch weights of the same model")
    else:
        raise UsageError(f"no weights in {folder}: expected {WEIGHTS}")
    return _Renamed(tensors)


def _load(module_fn, folder: Path, dtype: str) -> tuple[nnx.GraphDef, Any]:
    graphdef, shapes = clip_model.abstract(module_fn)
    jdtype = getattr(jnp, dtype)
    params = clip_weights.from_hf(read_weights(folder), shapes, source=folder,
                                  convert=lambda a: jnp.asarray(a, jdtype))
    return graphdef, params


def load_unet(folder: str | Path, dtype: str = "float32",
              kernels: str = "auto") -> tuple[UNetConfig, nnx.GraphDef, Any]:
    """A diffusers unet/ folder -> (config, graphdef, params in `dtype`) of our NNX UNet, its attention
    computed by `kernels` (auto / xla / cpu: `priors.attention`)."""
    folder = Path(folder)
    cfg = UNetConfig.from_diffusers(read_config(folder))
    graphdef, params = _load(
        lambda: UNet2DConditionModel(cfg, dtype=getattr(jnp, dtype), kernels=kernels, rngs=nnx.Rngs(0)),
        folder, dtype)
    return cfg, graphdef, params


def load_vae(folder: str | Path, dtype: str = "float32",
             kernels: str = "auto") -> tuple[VAEConfig, nnx.GraphDef, Any]:
    """A diffusers vae/ folder -> (config, graphdef, params in `dtype`) of our NNX VAE."""
    folder = Path(folder)
    cfg = VAEConfig.from_diffusers(read_config(folder))
    graphdef, params = _load(
        lambda: AutoencoderKL(cfg, dtype=getattr(jnp, dtype), kernels=kernels, rngs=nnx.Rngs(0)),
        folder, dtype)
    return cfg, graphdef, params


def save_part(config: UNetConfig | VAEConfig, params: Any, folder: str | Path) -> Path:
    """Write a UNet or VAE as diffusers writes it (config.json + diffusion_pytorch_model.safetensors),
    so diffusers' `from_pretrained` and `load_unet`/`load_vae` both read it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(
        json.dumps({**config.to_diffusers(), "_diffusers_version": "0.39.0",
                    "_lmdir_jax_version": lmdir_jax.__version__}, indent=2) + "\n", encoding="utf-8")
    clip_weights.write_safetensors(clip_weights.to_hf(params), folder / WEIGHTS)
    return folder


class TextEncoder:
    """Our Flax NNX CLIP text tower (`priors.clip_model`) as a pure function of its parameters:
    `encoder(ids, params=p)` -> (last hidden states (B, T, D), pooled (B, D)), like the SD pipelines
    call it (no attention mask: prompts are padded to the tokenizer's length)."""

    def __init__(self, graphdef: Any, config: Any):
        self.graphdef, self.config = graphdef, config

    def __call__(self, ids: Any, params: Any) -> Any:
        return clip_model.build(self.graphdef, params)(ids)


def load_text_encoder(folder: Path, dtype: str = "float32") -> tuple[TextEncoder, Any]:
    """Load SD's text_encoder/ (a transformers CLIPTextModel folder, safetensors or .bin) into our NNX
    CLIP text tower -> (encoder, params in `dtype`)."""
    if not (Path(folder) / "config.json").is_file():
        raise UsageError(f"incomplete Stable Diffusion folder: {folder}/config.json is missing")
    module, config = clip_model.load_text_encoder(folder, dtype)
    graphdef, state = nnx.split(module)
    return TextEncoder(graphdef, config), nnx.to_pure_dict(state)  # read in `dtype` already
