"""Loading the parts of a diffusers-layout Stable Diffusion folder into Flax modules and params.

diffusers 0.39's Flax `from_pretrained(from_pt=True)` only reads `diffusion_pytorch_model.bin` and
needs torch, while current SD downloads ship `.safetensors`; this module reads Flax msgpack weights,
PyTorch safetensors (converted without torch) or `.bin` (converted by diffusers, needs torch), and
casts the parameters to the requested dtype (diffusers' own `to_bf16` is broken on current jax).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Any

from lmdir_jax.errors import UsageError

FLAX_WEIGHTS = "diffusion_flax_model.msgpack"
PT_SAFETENSORS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
PT_BIN = "diffusion_pytorch_model.bin"


@contextlib.contextmanager
def quiet_hf():
    """Silence the 'Flax classes are deprecated' warnings of diffusers/transformers while loading."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    old_d, old_t = dlog.get_verbosity(), tlog.get_verbosity()
    dlog.set_verbosity(logging.ERROR)
    tlog.set_verbosity(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        dlog.set_verbosity(old_d)
        tlog.set_verbosity(old_t)


def cast_floats(params: Any, dtype: Any) -> Any:
    """Cast every floating-point leaf of a params pytree to `dtype` (integer leaves untouched)."""
    import jax
    import jax.numpy as jnp

    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params
    )


def check_complete(params: Any, expected: Any, source: Any) -> Any:
    """`params` restricted to the keys of `expected` (the model's parameter shapes); a UsageError
    naming the first missing weight when `source` (a weights file or folder) lacks some.

    Needed wherever weights are read without a random initialisation to fall back on (transformers'
    `_do_init=False`, the safetensors conversion): a missing weight would otherwise surface as a
    KeyError deep inside the first call."""
    from flax.traverse_util import flatten_dict, unflatten_dict

    want, got = flatten_dict(expected), flatten_dict(params)
    missing = sorted("/".join(map(str, k)) for k in want if k not in got)
    if missing:
        raise UsageError(f"{source} does not match its config.json: {len(missing)} weights missing "
                         f"(first: {missing[0]})")
    return unflatten_dict({k: got[k] for k in want})


def from_pretrained(cls: type, folder: Path, *, from_pt: bool, **kwargs: Any) -> tuple[Any, Any]:
    """(model, params) of a transformers Flax model class from a local folder.

    Flax weights are read with `_do_init=False`: as they are, without first drawing (and
    compiling the draw of) a random set that they replace: 13.6 s for even the tiny test CLIP on a
    CPU, 0.2 s this way. transformers' PyTorch converter needs those random parameters, so PyTorch
    weights take the slow path."""
    if from_pt:
        model = cls.from_pretrained(str(folder), from_pt=True, **kwargs)
        return model, model.params
    model, params = cls.from_pretrained(str(folder), _do_init=False, **kwargs)
    return model, check_complete(params, model.params_shape_tree, folder)


class _AsTorch:
    """A numpy array seen through the one method diffusers' converter calls (`.numpy()`)."""

    def __init__(self, array: Any):
        self._array = array

    def numpy(self) -> Any:
        return self._array


class _ShapesOnly:
    """Stands in for a diffusers Flax model whose `init_weights` the converter calls for shapes."""

    def __init__(self, shapes: Any):
        self._shapes = shapes

    def init_weights(self, rng: Any) -> Any:
        return self._shapes


def _read_safetensors(file: Path) -> dict[str, Any]:
    """Read a safetensors file as float32 numpy arrays (bf16 too, which numpy cannot hold)."""
    import numpy as np
    from safetensors import safe_open

    out = {}
    with safe_open(str(file), framework="flax") as f:
        for key in f.keys():
            out[key] = np.asarray(f.get_tensor(key).astype("float32"))
    return out


def load_diffusers_model(cls: type, folder: Path, dtype: Any) -> tuple[Any, Any]:
    """Load a diffusers Flax model class (UNet, VAE) from `folder` -> (module, params in `dtype`).

    Prefers Flax msgpack weights; otherwise converts PyTorch safetensors (no torch needed) or `.bin`.
    """
    import jax
    from diffusers.models.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

    if not (folder / "config.json").is_file():
        raise UsageError(f"incomplete Stable Diffusion folder: {folder}/config.json is missing")
    with quiet_hf():
        if (folder / FLAX_WEIGHTS).is_file():
            model, params = cls.from_pretrained(str(folder), dtype=dtype)
        elif any((folder / n).is_file() for n in PT_SAFETENSORS):
            file = next(folder / n for n in PT_SAFETENSORS if (folder / n).is_file())
            model = cls.from_config(cls.load_config(str(folder)), dtype=dtype)
            expected = jax.eval_shape(model.init_weights, jax.random.PRNGKey(0))
            state = {k: _AsTorch(v) for k, v in _read_safetensors(file).items()}
            # The converter only needs the parameter shapes: skip its (slow, eager) random init.
            params = check_complete(
                convert_pytorch_state_dict_to_flax(state, _ShapesOnly(expected)), expected, file)
        elif (folder / PT_BIN).is_file():
            try:
                model, params = cls.from_pretrained(str(folder), dtype=dtype, from_pt=True)
            except OSError as e:  # diffusers raises EnvironmentError when torch is missing
                raise UsageError(f"cannot read {folder / PT_BIN}: {e}") from e
        else:
            raise UsageError(
                f"no weights in {folder}: expected {FLAX_WEIGHTS} or {PT_SAFETENSORS[0]}"
            )
    return model, cast_floats(params, dtype)


class TextEncoder:
    """Our Flax NNX CLIP text tower (`priors.clip_model`) as a pure function of its parameters:
    `encoder(ids, params=p)` -> (last hidden states (B, T, D), pooled (B, D)), like the SD pipelines
    call it (no attention mask: prompts are padded to the tokenizer's length)."""

    def __init__(self, graphdef: Any, config: Any):
        self.graphdef, self.config = graphdef, config

    def __call__(self, ids: Any, params: Any) -> Any:
        from lmdir_jax.priors.clip_model import build

        return build(self.graphdef, params)(ids)


def load_text_encoder(folder: Path, dtype: Any) -> tuple[TextEncoder, Any]:
    """Load SD's text_encoder/ (a transformers CLIPTextModel folder, safetensors or .bin) into our NNX
    CLIP text tower -> (encoder, params in `dtype`)."""
    import jax.numpy as jnp
    from flax import nnx

    from lmdir_jax.priors import clip_model

    if not (folder / "config.json").is_file():
        raise UsageError(f"incomplete Stable Diffusion folder: {folder}/config.json is missing")
    module, config = clip_model.load_text_encoder(folder, jnp.dtype(dtype).name)
    graphdef, state = nnx.split(module)
    return TextEncoder(graphdef, config), cast_floats(nnx.to_pure_dict(state), dtype)
