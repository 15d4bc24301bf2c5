"""Run the JAX network and its PyTorch mirror on the same random input and compare the outputs.

Used by the export self-check, the tests and `lmdir bench compare-torch`. Inputs are numpy arrays
so that both frameworks see bit-identical data.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmdir_jax.models import build_model
from lmdir_jax.models.priors import Priors


def random_inputs(
    text_dim: int,
    *,
    batch: int = 2,
    height: int = 37,
    width: int = 45,
    text_len: int = 5,
    ref_size: int = 16,
    seed: int = 0,
    deg: bool = True,
    scene: bool = True,
    ref: bool = True,
    kinds: int = 0,
) -> dict[str, np.ndarray]:
    """A random low-quality batch with priors (numpy, float32 / bool), seeded.

    With `kinds` > 0 it has PIP's `deg_weights` (B, kinds) too: one-hot for the first example, the
    average of two kinds for the others (a mixture).

    Priors switched off are all masked; switched-on priors are real for every example except that
    the last example of a batch > 1 has a partly masked text and no reference, so both the masked
    and the unmasked paths run in one call.
    """
    rng = np.random.default_rng(seed)
    inputs = {"lq": rng.random((batch, height, width, 3), dtype=np.float32)}
    for name, on in (("deg", deg), ("scene", scene)):
        states = rng.standard_normal((batch, text_len, text_dim), dtype=np.float32)
        mask = np.full((batch, text_len), on)
        if on and batch > 1:
            mask[-1, text_len // 2 + 1:] = False
        inputs[f"{name}_states"], inputs[f"{name}_mask"] = states, mask
    inputs["reference"] = rng.random((batch, ref_size, ref_size, 3), dtype=np.float32)
    has_ref = np.full((batch,), ref)
    if ref and batch > 1:
        has_ref[-1] = False
    inputs["has_reference"] = has_ref
    if kinds > 0:
        weights = np.zeros((batch, kinds), np.float32)
        picks = rng.permutation(kinds)
        weights[0, picks[0]] = 1.0
        weights[1:, picks[:2]] = 1.0 / min(2, kinds)
        inputs["deg_weights"] = weights
    return inputs


def pip_kinds(config_model) -> int:
    """T of a PIP model (`model.pip_kinds`), 0 for any other prompt module."""
    return int(config_model.get("pip_kinds", 0)) if config_model.get("prompt_module") == "pip" else 0


@functools.cache
def _jitted_forward():
    @functools.partial(jax.jit, static_argnums=0)
    def forward(graphdef, state, lq, priors):
        return nnx.merge(graphdef, state)(lq, priors)

    return forward


def run_jax(model, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The Flax model's output on `inputs` (numpy), jitted (one compile per model and shape)."""
    priors = Priors(**{k: jnp.asarray(v) for k, v in inputs.items() if k != "lq"})
    graphdef, state = nnx.split(model)
    return np.asarray(_jitted_forward()(graphdef, state, jnp.asarray(inputs["lq"]), priors))


def run_torch(model, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The PyTorch mirror's output on `inputs` (numpy), without gradients."""
    import torch

    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inputs.items()}
    with torch.no_grad():
        return model(**tensors).numpy()


def float32_twin(model, config_model):
    """`model` itself when it computes in float32, else a float32-compute copy with its params.

    A bfloat16 JAX model cannot match a float32 PyTorch model to 1e-4; the twin can.
    """
    if str(config_model.dtype) == "float32":
        return model
    cm = config_model.copy_and_resolve_references()
    with cm.unlocked():
        cm.dtype = "float32"
    with nnx.use_eager_sharding(False):
        twin = build_model(cm, 0)
    nnx.update(twin, nnx.state(model, nnx.Param))
    return twin


def max_abs_diff(jax_model, torch_model, inputs: dict[str, np.ndarray]) -> float:
    """max |JAX - PyTorch| over the restored images of `inputs`."""
    a = run_jax(jax_model, inputs)
    b = run_torch(torch_model, inputs)
    if a.shape != b.shape:
        raise AssertionError(f"output shapes differ: JAX {a.shape}, PyTorch {b.shape}")
    return float(np.max(np.abs(a - b)))
