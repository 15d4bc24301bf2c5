"""Graph exports of the PyTorch mirror: `torch.export` programs and ONNX files with dynamic sizes.

Importable without JAX (torch only; onnx / onnxruntime for the ONNX parts). The mirror's forward
takes optional keyword priors; a graph has a fixed signature, so `PRIOR_SETS` names the three
signatures an export can have:

    none   lq
    text   lq, deg_states, deg_mask, scene_states, scene_mask
    all    lq, deg_states, deg_mask, scene_states, scene_mask, reference, has_reference

Dynamic: batch, height and width of `lq` (height and width >= MIN_SIZE: torch.export guards on
the 1/8-resolution level being larger than one pixel), the text length (>= 2; CLIP always emits
BOS and EOS). The reference keeps the export's `ref_size` (its batch is dynamic).
A PIP model (`prompt_module` "pip") takes `deg_weights` (B, T) after the priors of the text and all
sets; without it (the none set) the degradation is unknown (zero weights).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lmdir_jax.export.torch_model import LMDIRTorch

TEXT = ("deg_states", "deg_mask", "scene_states", "scene_mask")
PRIOR_SETS = {
    "none": ("lq",),
    "text": ("lq", *TEXT),
    "all": ("lq", *TEXT, "reference", "has_reference"),
}
MIN_SIZE = 9
MAX_SIZE = 16384
MAX_BATCH = 1024
OPSET = 18


class Positional(nn.Module):
    """The mirror with a fixed positional signature (`PRIOR_SETS[priors]`), for graph exports."""

    def __init__(self, model: LMDIRTorch, priors: str = "all"):
        super().__init__()
        if priors not in PRIOR_SETS:
            raise ValueError(f"priors must be one of {', '.join(PRIOR_SETS)}, got {priors!r}")
        self.model = model
        self.names = input_names(model, priors)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Inputs in the order of `self.names`; returns the restored NHWC batch."""
        kwargs = dict(zip(self.names, inputs, strict=True))
        return self.model(**kwargs)


def input_names(model: LMDIRTorch, priors: str) -> tuple[str, ...]:
    """The graph inputs of `model` for a prior set: `PRIOR_SETS[priors]`, plus `deg_weights` for a
    PIP model when the set has priors."""
    names = PRIOR_SETS[priors]
    if getattr(model, "prompt_module", "lmdir") == "pip" and priors != "none":
        names = (*names, "deg_weights")
    return names


def dynamic_shapes(names: tuple[str, ...]) -> dict:
    """torch.export dynamic dims for the inputs `names` (batch, height, width, text length)."""
    from torch.export import Dim

    batch = Dim("batch", min=1, max=MAX_BATCH)
    height = Dim("height", min=MIN_SIZE, max=MAX_SIZE)
    width = Dim("width", min=MIN_SIZE, max=MAX_SIZE)
    deg_len, scene_len = Dim("deg_len", min=2, max=4096), Dim("scene_len", min=2, max=4096)
    spec = {
        "lq": {0: batch, 1: height, 2: width},
        "deg_states": {0: batch, 1: deg_len}, "deg_mask": {0: batch, 1: deg_len},
        "scene_states": {0: batch, 1: scene_len}, "scene_mask": {0: batch, 1: scene_len},
        "reference": {0: batch}, "has_reference": {0: batch}, "deg_weights": {0: batch},
    }
    return {"inputs": tuple(spec[n] for n in names)}


def example_inputs(model: LMDIRTorch, names: tuple[str, ...], ref_size: int, *, batch: int = 2,
                   height: int = 37, width: int = 45, text_len: int = 5,
                   seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Seeded example tensors for tracing (sizes away from 0, 1 and multiples of 8)."""
    g = torch.Generator().manual_seed(seed)
    d = model.text_dim
    tensors = {
        "lq": torch.rand(batch, height, width, 3, generator=g),
        "deg_states": torch.randn(batch, text_len, d, generator=g),
        "deg_mask": torch.ones(batch, text_len, dtype=torch.bool),
        "scene_states": torch.randn(batch, text_len + 1, d, generator=g),
        "scene_mask": torch.ones(batch, text_len + 1, dtype=torch.bool),
        "reference": torch.rand(batch, ref_size, ref_size, 3, generator=g),
        "has_reference": torch.ones(batch, dtype=torch.bool),
        "deg_weights": torch.softmax(torch.randn(batch, max(1, getattr(model, "num_kinds", 0)),
                                                 generator=g), dim=-1),
    }
    return tuple(tensors[n] for n in names)


@contextlib.contextmanager
def _size_oblivious():
    """Trace size checks as for sizes >= 2 (no guard on a dynamic size being 1)."""
    import torch.fx.experimental._config as fx_config

    # The CPU conv backend choice (mkldnn / nnpack) depends on the sizes and would guard on them.
    with (fx_config.patch(backed_size_oblivious=True), torch.backends.mkldnn.flags(enabled=False),
          torch.backends.nnpack.flags(enabled=False)):
        yield


def export_program(model: LMDIRTorch, priors: str = "all", ref_size: int = 32):
    """A `torch.export.ExportedProgram` of the mirror with dynamic batch, height, width, text."""
    wrapped = Positional(model.eval(), priors)
    args = example_inputs(model, wrapped.names, ref_size)
    with _size_oblivious(), torch.no_grad():
        return torch.export.export(wrapped, args, dynamic_shapes=dynamic_shapes(wrapped.names))


def export_onnx(model: LMDIRTorch, path: str | Path, priors: str = "all",
                ref_size: int = 32) -> Path:
    """Write the mirror as an ONNX file (torch.onnx dynamo exporter), named inputs and `restored`."""
    wrapped = Positional(model.eval(), priors)
    args = example_inputs(model, wrapped.names, ref_size)
    path = Path(path)
    with _size_oblivious(), torch.no_grad():
        program = torch.onnx.export(
            wrapped, args, dynamo=True, dynamic_shapes=dynamic_shapes(wrapped.names),
            input_names=list(wrapped.names), output_names=["restored"], opset_version=OPSET,
            verbose=False,
        )
    program.save(str(path))
    return path


def run_onnx(path: str | Path, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """Run an exported ONNX file with ONNX Runtime (CPU) on the inputs it declares."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: np.ascontiguousarray(inputs[i.name]) for i in session.get_inputs()}
    return session.run(["restored"], feed)[0]
