"""Import a released Restormer checkpoint (swz30/Restormer `restormer_arch.py`) as an LMDIR workdir.

The checkpoint is read with `torch.load(..., weights_only=True)` (a .pth is a pickle; a downloaded
one must never run code): top key `params` (Restormer's release format) or a bare state dict.
Restormer names map onto the `model.layout = "restormer"` network:

    patch_embed.proj          -> embed                 down1_2/down2_3/down3_4.body.0 -> downs.0/1/2.conv
    encoder_level{1,2,3}.i    -> encoders.{0,1,2}.blocks.i     latent.i -> latent.blocks.i
    up4_3/up3_2/up2_1.body.0  -> ups.0/1/2.conv        reduce_chan_level{3,2} -> reduces.{0,1}
    decoder_level{3,2,1}.i    -> decoders.{0,1,2}.blocks.i     refinement.i -> refinement.blocks.i
    output                    -> output
  inside a block: norm{1,2}.body.{weight,bias} -> norm{1,2}.{scale,bias}; attn.temperature
  (heads, 1, 1) -> (heads,); attn.qkv/qkv_dwconv/project_out -> attn.qkv/qkv_dw/out;
  ffn.project_in/dwconv/project_out -> ffn.inp/dw/out.

Everything else starts with zero influence: the DATB modulation (`modulation.proj`) and the CATB /
RTB output projections (`attn.out`) are zero, so the network is exactly Restormer until trained;
the prompt and reference encoders keep their seeded initialisation.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from flax import nnx

from lmdir_jax.errors import UsageError
from lmdir_jax.export.convert import _torch_name_and_value
from lmdir_jax.models.stacking import blocks_layout, relayout
from lmdir_jax.train import checkpoints as ckpt
from lmdir_jax.train import mesh as mesh_lib
from lmdir_jax.train import state as state_lib
from lmdir_jax.workdir import config_file, config_to_json

_LEVELS = {"encoder_level1": "encoders.0", "encoder_level2": "encoders.1",
           "encoder_level3": "encoders.2", "latent": "latent", "decoder_level3": "decoders.0",
           "decoder_level2": "decoders.1", "decoder_level1": "decoders.2",
           "refinement": "refinement"}
_BLOCK = {"norm1.body.weight": "norm1.weight", "norm1.body.bias": "norm1.bias",
          "norm2.body.weight": "norm2.weight", "norm2.body.bias": "norm2.bias",
          "attn.temperature": "attn.temperature", "attn.qkv.weight": "attn.qkv.weight",
          "attn.qkv_dwconv.weight": "attn.qkv_dw.weight",
          "attn.project_out.weight": "attn.out.weight", "ffn.project_in.weight": "ffn.inp.weight",
          "ffn.dwconv.weight": "ffn.dw.weight", "ffn.project_out.weight": "ffn.out.weight"}
_OTHER = {"patch_embed.proj.weight": "embed.weight", "patch_embed.proj.bias": "embed.bias",
          "down1_2.body.0.weight": "downs.0.conv.weight",
          "down2_3.body.0.weight": "downs.1.conv.weight",
          "down3_4.body.0.weight": "downs.2.conv.weight",
          "up4_3.body.0.weight": "ups.0.conv.weight", "up3_2.body.0.weight": "ups.1.conv.weight",
          "up2_1.body.0.weight": "ups.2.conv.weight",
          "reduce_chan_level3.weight": "reduces.0.weight",
          "reduce_chan_level2.weight": "reduces.1.weight",
          "output.weight": "output.weight", "output.bias": "output.bias"}
_BLOCK_KEY = re.compile(r"^([a-z_0-9]+)\.(\d+)\.(.+)$")
# Parameters that couple the priors into the backbone: zero = no influence.
_ZEROED = re.compile(r"\.(modulation\.proj|content_attn\.attn\.out|ref_attn\.attn\.out)\.")


def mirror_name(key: str) -> str | None:
    """The PyTorch-mirror name of a Restormer state-dict key, or None when it is not Restormer's."""
    if key in _OTHER:
        return _OTHER[key]
    m = _BLOCK_KEY.match(key)
    if m and m.group(1) in _LEVELS and m.group(3) in _BLOCK:
        return f"{_LEVELS[m.group(1)]}.blocks.{m.group(2)}.{_BLOCK[m.group(3)]}"
    return None


def read_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
    """The Restormer state dict of a .pth (float32 numpy), read without running pickled code."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or a pickle that needs code to load
        first = (str(e).strip().splitlines() or [""])[0][:120]
        raise UsageError(f"{path} is not a readable weights-only PyTorch checkpoint ({first})") \
            from None
    if isinstance(obj, dict) and isinstance(obj.get("params"), dict):
        obj = obj["params"]
    if not isinstance(obj, dict) or not obj:
        raise UsageError(f"{path} holds no state dict (expected Restormer's {{'params': ...}})")
    out = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise UsageError(f"{path} is not a Restormer state dict: key {k!r} is not a tensor")
        out[str(k)] = v.detach().float().cpu().numpy()
    return out


def restormer_params(state: dict[str, np.ndarray], model, source: str) -> dict:
    """Flax parameters (pure dict) of `model` with the Restormer `state` in its backbone and the
    conditioning zeroed. Raises UsageError naming the first key that does not fit."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    scanned = blocks_layout(params) == "scanned"
    params = relayout(params, scanned=False)  # one tensor per block, as in the .pth
    leaves: dict[str, tuple[dict, str, np.ndarray]] = {}

    def walk(node, path):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, (*path, str(k)))
            else:
                name, tv = _torch_name_and_value((*path, str(k)), np.asarray(v))
                leaves[name] = (node, k, tv)

    walk(params, ())
    filled = set()
    for key, value in state.items():
        name = mirror_name(key)
        if name is None:
            raise UsageError(f"{source} is not a Restormer state dict: key {key!r} does not fit "
                             "Restormer's module names")
        if name not in leaves:
            raise UsageError(f"{source}: checkpoint tensor {key!r} has no place in the config "
                             "(depth, layout, LayerNorm or bias mismatch: check model.blocks, "
                             "refinement_blocks, layout=restormer, layernorm, embed/output_bias)")
        node, leaf, want = leaves[name]
        if key.endswith("attn.temperature"):
            value = value.reshape(-1)
        if value.shape != want.shape:
            raise UsageError(f"{source}: width mismatch at {key!r}: checkpoint {tuple(value.shape)}"
                             f", config {tuple(want.shape)} (check model.width, heads, "
                             "ffn_expansion)")
        if value.ndim == 4:  # OIHW -> HWIO
            value = value.transpose(2, 3, 1, 0)
        elif value.ndim == 2:
            value = value.T
        node[leaf] = np.ascontiguousarray(value, np.float32)
        filled.add(name)
    backbone = [n for n in leaves if mirror_name_of_backbone(n)]
    missing = [n for n in backbone if n not in filled]
    if missing:
        raise UsageError(f"{source}: the config's backbone tensor {missing[0]} is not in the "
                         "checkpoint (depth, LayerNorm or bias mismatch)")
    for name, (node, leaf, _) in leaves.items():
        if _ZEROED.search(name):
            node[leaf] = np.zeros_like(np.asarray(node[leaf]))
    return relayout(params, scanned=scanned)


def mirror_name_of_backbone(name: str) -> bool:
    """Whether a mirror parameter name belongs to Restormer's backbone (filled from the .pth)."""
    targets = set(_OTHER.values())
    if name in targets:
        return True
    m = re.match(r"^(encoders\.\d|latent|decoders\.\d|refinement)\.blocks\.\d+\.(.+)$", name)
    return bool(m) and m.group(2) in set(_BLOCK.values())


def import_restormer(checkpoint: str | Path, config, output: str | Path) -> Path:
    """Write a training workdir (config.json + orbax checkpoint at step 0, EMA = params) whose
    backbone holds a Restormer checkpoint's weights. Returns the workdir."""
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UsageError(f"output {output} exists and is not empty")
    if str(config.model.get("layout", "lmdir")) != "restormer":
        raise UsageError("a Restormer checkpoint needs --config.model.layout=restormer "
                         "(e.g. --config restormer)")
    state = read_checkpoint(checkpoint)
    model = state_lib.build_model(config)
    params = restormer_params(state, model, str(checkpoint))
    nnx.update(model, params)
    output.mkdir(parents=True, exist_ok=True)
    config_file(output).write_text(config_to_json(config))
    setup = state_lib.make_setup(config, mesh_lib.mesh_from_config(config))
    train_state = state_lib.init_state(config, setup, model_fn=lambda: model)
    manager = ckpt.make_manager(output, async_save=False)
    ckpt.save(manager, 0, train_state, meta={"imported_from": str(Path(checkpoint).resolve())})
    manager.wait_until_finished()
    manager.close()
    return output
