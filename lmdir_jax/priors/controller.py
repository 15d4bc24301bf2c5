"""A degradation-aware CLIP controller (DA-CLIP, Luo et al. 2024) in Flax NNX.

The controller is a trainable copy of CLIP's vision tower. Its pooled, projected output is the
*degradation embedding*, compared with the frozen text embeddings of the degradation vocabulary
(`lmdir_jax.degradations.vocabulary()`, "clean" included). After every transformer layer its hidden
states also pass through a zero-initialised linear connection whose output is added to the output
of a layer of the *frozen* tower (DA-CLIP's `ControlTransformer`: the hint of the controller's last
layer enters the frozen tower's first, and so on), steering the frozen tower's *content embedding*
towards the clean scene. Zero-initialised, the controlled tower is
exactly the frozen one.

The vision tower is written here as a pure function of the CLIP vision parameters in transformers'
naming (`vision_forward`, on `tower_params(clip)`), so the frozen tower and its trainable copy share
one implementation, and hints can be injected between layers. The parameters keep the layout of
DA-CLIP's `visual_control` (`clip_weights.controller_from_daclip` maps its released checkpoint).

What the controller looks at: crops of the image at native resolution (`native_crops`), several per
image, whose probabilities are averaged; a downscaled view (`inference.clip_view`) hides noise and
JPEG blocks at CLIP's input size.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmdir_jax.degradations import KINDS
from lmdir_jax.errors import UsageError
from lmdir_jax.outputs import atomic_write_bytes
from lmdir_jax.priors import clip_weights
from lmdir_jax.priors.clip_model import activation, openclip_state_dict
from lmdir_jax.priors.config import CONTROLLER_GRID

SPEC_FILE = "controller.json"


# --------------------------------------------------------------------------- the vision tower


def _layer_norm(x, p, eps):
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def _dense(x, p):
    return x @ p["kernel"] + p["bias"]


@dataclass(frozen=True)
class TowerShape:
    """Static shape of a CLIP vision tower (from the CLIP's vision config)."""

    width: int
    layers: int
    heads: int
    patch: int
    image_size: int
    eps: float
    act: str

    @classmethod
    def of(cls, clip) -> TowerShape:
        v = clip.model.config.vision
        return cls(
            width=int(v.hidden_size), layers=int(v.num_layers), heads=int(v.num_heads),
            patch=int(v.patch_size), image_size=int(v.image_size), eps=float(v.layer_norm_eps),
            act=str(v.hidden_act),
        )


def _attention(x, p, heads):
    b, n, d = x.shape
    hd = d // heads
    q = (_dense(x, p["q_proj"]) * hd**-0.5).reshape(b, n, heads, hd)
    k = _dense(x, p["k_proj"]).reshape(b, n, heads, hd)
    v = _dense(x, p["v_proj"]).reshape(b, n, heads, hd)
    w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k), axis=-1)
    return _dense(jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, n, d), p["out_proj"])


def vision_forward(vp: dict, pixels: jax.Array, shape: TowerShape, hints=None, collect: bool = False):
    """CLIP's vision transformer on normalised NHWC pixels -> (pooled (B, W), per-layer states).

    `vp` is `tower_params(clip)` (the `vision_model` parameters, layer indices as strings). `hints[i]` (B, N, W), when
    given, is added to the output of layer i (DA-CLIP's control); with `collect` the output of each
    layer is returned (the controller's hidden states), else an empty list.
    """
    emb = vp["embeddings"]
    x = jax.lax.conv_general_dilated(
        pixels.astype(jnp.float32), emb["patch_embedding"]["kernel"], (shape.patch, shape.patch),
        "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    b = x.shape[0]
    x = x.reshape(b, -1, shape.width)
    cls = jnp.broadcast_to(emb["class_embedding"], (b, 1, shape.width))
    x = jnp.concatenate([cls, x], axis=1) + emb["position_embedding"]["embedding"][None]
    x = _layer_norm(x, vp["pre_layrnorm"], shape.eps)
    act = activation(shape.act)
    states = []
    for i in range(shape.layers):
        p = vp["encoder"]["layers"][str(i)]
        x = x + _attention(_layer_norm(x, p["layer_norm1"], shape.eps), p["self_attn"], shape.heads)
        h = _layer_norm(x, p["layer_norm2"], shape.eps)
        x = x + _dense(act(_dense(h, p["mlp"]["fc1"])), p["mlp"]["fc2"])
        if hints is not None:
            x = x + hints[i]
        if collect:
            states.append(x)
    return _layer_norm(x[:, 0], vp["post_layernorm"], shape.eps), states


def _normalize(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True).clip(1e-6)


# --------------------------------------------------------------------------- the NNX controller


class Controller(nnx.Module):
    """Trainable copy of a CLIP vision tower + zero-initialised connections into the frozen tower.

    `controller(pixels, frozen)` -> (degradation embedding (B, P), content embedding (B, P)), both
    L2-normalised; `frozen` is `{'vision_model': ..., 'visual_projection': ...}` of the frozen CLIP.
    `logit_scale` (log) starts at CLIP's (at least 100) and is trained with the rest.
    """

    def __init__(self, vision_params: dict, projection: Any, shape: TowerShape, logit_scale: float,
                 *, rngs: nnx.Rngs, reverse: bool = True):
        self.shape = shape
        # DA-CLIP's wiring (the frozen layer i gets the hint of controller layer L-1-i); False: layer
        # i gets layer i's (controllers trained before the DA-CLIP layout was read, spec without
        # "wiring").
        self.reverse = bool(reverse)
        self.tower = nnx.data(jax.tree.map(lambda a: nnx.Param(jnp.array(a, jnp.float32)), vision_params))
        self.projection = nnx.Param(jnp.array(projection, jnp.float32))
        zeros = nnx.initializers.zeros_init()
        self.zero_links = nnx.List([
            nnx.Linear(shape.width, shape.width, kernel_init=zeros, bias_init=zeros, rngs=rngs)
            for _ in range(shape.layers)
        ])
        # At least 100 (CLIP's trained value): a random tiny CLIP's vocabulary embeddings can be
        # nearly parallel, and a small scale would cap the logit gaps between them.
        self.logit_scale = nnx.Param(jnp.asarray(np.log(max(logit_scale, 100.0)), jnp.float32))

    @classmethod
    def from_clip(cls, clip, seed: int = 0, reverse: bool = True) -> Controller:
        """A controller initialised from `clip` (a `ClipPrior`): the copy equals the frozen tower."""
        return cls(
            tower_params(clip), clip.params["visual_projection"]["kernel"], TowerShape.of(clip),
            clip.logit_scale, rngs=nnx.Rngs(seed), reverse=reverse,
        )

    def embed(self, pixels: jax.Array) -> tuple[jax.Array, list]:
        """(degradation embedding (B, P), projected and unnormalised; per-layer control hints in
        the frozen tower's layer order)."""
        tower = jax.tree.map(lambda v: v[...], self.tower, is_leaf=lambda x: isinstance(x, nnx.Variable))
        pooled, states = vision_forward(tower, pixels, self.shape, collect=True)
        hints = [link(s) for link, s in zip(self.zero_links, states, strict=True)]
        return pooled @ self.projection[...], hints[::-1] if self.reverse else hints

    def hints(self, pixels: jax.Array) -> tuple[jax.Array, list]:
        """(degradation embedding (B, P) normalised, per-layer control hints)."""
        deg, hints = self.embed(pixels)
        return _normalize(deg), hints

    def __call__(self, pixels: jax.Array, frozen: dict) -> tuple[jax.Array, jax.Array]:
        deg, hints = self.hints(pixels)
        return deg, controlled_features(frozen, pixels, self.shape, hints)


def controlled_embeds(frozen: dict, pixels: jax.Array, shape: TowerShape, hints=None) -> jax.Array:
    """Projected, unnormalised embedding (B, P) of the frozen tower (under control when `hints`)."""
    pooled, _ = vision_forward(frozen["vision_model"], pixels, shape, hints=hints)
    return pooled @ frozen["visual_projection"]["kernel"]


def controlled_features(frozen: dict, pixels: jax.Array, shape: TowerShape, hints=None) -> jax.Array:
    """L2-normalised projected embedding (B, P) of the frozen tower (under control when `hints`)."""
    return _normalize(controlled_embeds(frozen, pixels, shape, hints))


def _str_keys(tree):
    return {str(k): _str_keys(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def tower_params(clip) -> dict:
    """The vision tower's parameters of a `ClipPrior` as `vision_forward` reads them."""
    return _str_keys(clip.params["vision_model"])


def frozen_params(clip) -> dict:
    """The frozen image-tower parameters a controller needs, from a `ClipPrior`."""
    return {"vision_model": tower_params(clip), "visual_projection": clip.params["visual_projection"]}


def label_targets(deg_vector: np.ndarray, names: list[str]) -> np.ndarray:
    """(B, K) target distribution over the vocabulary `names` from (B, len(KINDS)) severities:
    uniform over the kinds present (multi-label), all mass on 'clean' when none is."""
    deg_vector = np.asarray(deg_vector)
    t = np.zeros((deg_vector.shape[0], len(names)), np.float32)
    for j, kind in enumerate(KINDS):
        if kind in names:
            t[:, names.index(kind)] = deg_vector[:, j] > 0
    none = t.sum(1) == 0
    if "clean" in names:
        t[none, names.index("clean")] = 1.0
    return t / np.maximum(t.sum(1, keepdims=True), 1.0)


# --------------------------------------------------------------------------- native-resolution views


# Crops start at CROP_OFFSET plus a multiple of CROP_GRID in the image (training: in the patch,
# where the synthetic degradations start). JPEG's 8 x 8 blocks then fall on the same pixels of every
# crop, with their edges in the middle of the tiny CLIP's 8-pixel patches, where one patch sees
# the step across an edge (docs/priors.md: JPEG named right on 79 % of CBSD68 photos, 73 % with
# the edges between patches, fewer at random positions).
CROP_GRID = 8
CROP_OFFSET = 4
GRID = CONTROLLER_GRID  # crops per side an image is judged by (`priors.controller_grid`)


def crop_starts(length: int, size: int, n: int, align: int = 1, offset: int = 0) -> list[int]:
    """`n` evenly spread start offsets, `offset` plus multiples of `align`, of windows of `size`
    in [0, length) (one when too short)."""
    room = length - size
    if room < offset:
        return [max(0, room // 2)]
    last = offset + ((room - offset) // align) * align
    if n <= 1:
        return [offset + ((room // 2 - offset) // align) * align if room // 2 >= offset else offset]
    return sorted({min(last, offset + max(0, int(round((v - offset) / align))) * align)
                   for v in np.linspace(0, room, n)})


def native_crops(image: np.ndarray, size: int, grid: int = 3) -> np.ndarray:
    """Up to grid x grid `size` x `size` crops of `image` at native resolution, on a regular grid,
    each starting on the `CROP_GRID`.

    An image smaller than `size` is padded by reflection first (never resized).
    """
    img = np.asarray(image[..., :3], np.float32)
    h, w = img.shape[:2]
    if h < size or w < size:
        img = np.pad(img, ((0, max(0, size - h)), (0, max(0, size - w)), (0, 0)), mode="symmetric")
        h, w = img.shape[:2]
    return np.stack([img[y : y + size, x : x + size] for y in crop_starts(h, size, grid, CROP_GRID, CROP_OFFSET)
                     for x in crop_starts(w, size, grid, CROP_GRID, CROP_OFFSET)])


def normalize_pixels(images, mean, std) -> jax.Array:
    """CLIP normalisation of NHWC images in [0, 1] (no resizing: crops already have CLIP's size)."""
    return (jnp.clip(jnp.asarray(images, jnp.float32), 0.0, 1.0) - jnp.asarray(mean)) / jnp.asarray(std)


# --------------------------------------------------------------------------- a trained controller


def controller_spec(clip) -> dict:
    """What a controller is tied to: its CLIP's widths, tower shape and degradation vocabulary."""
    shape = TowerShape.of(clip)
    return {
        "text_dim": clip.text_dim,
        "projection_dim": clip.projection_dim,
        "vision_width": shape.width,
        "vision_layers": shape.layers,
        "image_size": shape.image_size,
        "vocabulary": [list(v) for v in clip.degradation_vocab],
        "max_text_len": clip.max_text_len,  # tokens per vocabulary text in its training
        "wiring": "daclip",  # Controller.reverse
    }


def check_spec(workdir: Path, spec: dict, clip) -> None:
    """UsageError (one line) when the controller in `workdir` was trained for another CLIP."""
    mine = controller_spec(clip)
    for key in ("text_dim", "projection_dim", "vision_width", "vision_layers", "image_size"):
        if int(spec.get(key, -1)) != mine[key]:
            raise UsageError(
                f"controller {workdir} was trained for another CLIP ({key} {spec.get(key)} != {mine[key]})"
            )
    if [list(v) for v in spec.get("vocabulary", [])] != mine["vocabulary"]:
        raise UsageError(f"controller {workdir} was trained on another degradation vocabulary")


def _kind_probabilities(controller: Controller, pixels: jax.Array, bank: jax.Array, mask: jax.Array) -> jax.Array:
    """(N, K) softmax over the vocabulary of normalised CLIP-sized pixels; `mask` (K,) is 0 for the
    kinds the controller learnt and -inf for the rest."""
    deg, _ = controller.hints(pixels)
    return jax.nn.softmax(jnp.exp(controller.logit_scale[...]) * deg @ bank.T + mask, axis=-1)


class DegradationAssessor:
    """A trained controller with its frozen CLIP: degradation probabilities and controlled features.

    `probabilities(image)` averages the softmax over the vocabulary of `grid` x `grid` native crops
    (default `GRID`);
    `content_features(images)` is the controlled frozen tower's embedding (CLIP-sized views).
    """

    def __init__(self, controller: Controller, clip, grid: int = GRID, max_text_len: int | None = None,
                 kinds: list[str] | None = None):
        self.controller, self.clip, self.grid = controller, clip, int(grid)
        self.names = [n for n, _ in clip.degradation_vocab]
        # The vocabulary's text features as in training (tokenised to the controller's length).
        self.bank = clip.degradation_features(max_text_len)
        # Only the kinds it learnt (controller.json `kinds`; all when not recorded) get probability:
        # an untrained kind's text feature may nearly equal a trained one's (with the quick start's
        # random tiny CLIP, rain and downsample: cosine 0.998) and would take half its mass.
        learnt = set(self.names if not kinds else kinds)
        self.kinds = [n for n in self.names if n in learnt]
        self.logit_mask = jnp.asarray([0.0 if n in learnt else -jnp.inf for n in self.names], jnp.float32)
        self.frozen = frozen_params(clip)
        graphdef, state = nnx.split(controller)

        def probs(state, frozen, bank, mask, pixels):
            return _kind_probabilities(nnx.merge(graphdef, state), pixels, bank, mask)

        def content(state, frozen, pixels):
            m = nnx.merge(graphdef, state)
            return m(pixels, frozen)[1]

        self._graphdef = graphdef
        self._state = state
        self._probs = jax.jit(probs)
        self._content = jax.jit(content)

    def crop_probabilities(self, crops: np.ndarray) -> np.ndarray:
        """(N, K) vocabulary probabilities of N CLIP-sized crops."""
        pixels = normalize_pixels(crops, self.clip.mean, self.clip.std)
        return np.asarray(self._probs(self._state, self.frozen, self.bank, self.logit_mask, pixels))

    def weights_fn(self, images: jax.Array) -> jax.Array:
        """Pure (jittable) (B, K) probabilities of NHWC images in [0, 1]: the mean over their
        non-overlapping CLIP-sized tiles at native resolution (images smaller than CLIP's input are
        resized up). Used inside the training step (`priors.auto_ratio`). The controller compares
        with the text features it was trained with (`self.bank`)."""
        bank = self.bank
        s = self.clip.image_size
        b, h, w, _ = images.shape
        if h < s or w < s:
            images = jax.image.resize(images, (b, max(h, s), max(w, s), 3), "bilinear")
            b, h, w, _ = images.shape
        ny, nx = h // s, w // s
        tiles = images[:, : ny * s, : nx * s].reshape(b, ny, s, nx, s, 3).transpose(0, 1, 3, 2, 4, 5)
        pixels = normalize_pixels(tiles.reshape(b * ny * nx, s, s, 3), self.clip.mean, self.clip.std)
        p = _kind_probabilities(nnx.merge(self._graphdef, self._state), pixels, bank, self.logit_mask)
        return p.reshape(b, ny * nx, -1).mean(1)

    def probabilities(self, image: np.ndarray) -> np.ndarray:
        """(K,) vocabulary probabilities of one HxWx3 image (mean over native crops)."""
        return self.crop_probabilities(native_crops(image, self.clip.image_size, self.grid)).mean(0)

    def content_features(self, images: np.ndarray) -> np.ndarray:
        """(B, P) controlled content embeddings of CLIP-sized NHWC images in [0, 1]."""
        pixels = normalize_pixels(images, self.clip.mean, self.clip.std)
        return np.asarray(self._content(self._state, self.frozen, pixels))


# --------------------------------------------------------------------------- DA-CLIP's layout


def _check_tower(source: Path, tensors: dict, prefix: str, clip) -> None:
    shape = TowerShape.of(clip)
    n = len({k[len(prefix):].split(".")[3] for k in tensors
             if k.startswith(prefix + "visual_control.transformer.zero_modules.")})
    conv = tensors.get(prefix + "visual_control.conv1.weight")
    if conv is None or n == 0:
        raise UsageError(f"{source} is not a DA-CLIP checkpoint (no visual_control.* with zero modules)")
    if n != shape.layers or conv.shape[0] != shape.width or conv.shape[-1] != shape.patch:
        raise UsageError(f"DA-CLIP checkpoint {source} has a {n}-layer, width {conv.shape[0]}, patch "
                         f"{conv.shape[-1]} controller; this CLIP's tower has {shape.layers} layers, width "
                         f"{shape.width}, patch {shape.patch}: load the CLIP from the same checkpoint")


def load_daclip_controller(path: str | Path, clip, grid: int = GRID, tensors: dict | None = None) -> DegradationAssessor:
    """DA-CLIP's checkpoint (`{'state_dict': ...}` with `clip.*`, `visual_control.*` and its zero
    modules, `logit_scale`; optional `module.` prefix, as DA-CLIP's release daclip_ViT-B-32.pt) as our
    controller beside `clip` (the CLIP loaded from the same checkpoint)."""
    path = Path(path)
    if tensors is None:
        tensors = clip_weights.read_checkpoint_file(path)
    prefix = clip_weights.openclip_prefix(tensors)
    _check_tower(path, tensors, prefix, clip)
    controller = Controller.from_clip(clip, reverse=True)
    shapes = nnx.to_pure_dict(nnx.state(controller))
    table = clip_weights.daclip_controller_table(TowerShape.of(clip).layers, prefix)
    params = clip_weights.from_table(tensors, table, shapes, path)
    nnx.update(controller, jax.tree.map(jnp.asarray, params))
    return DegradationAssessor(controller, clip, grid=grid)


def daclip_state_dict(controller: Controller, clip) -> dict[str, np.ndarray]:
    """DA-CLIP's state dict of a controller and its frozen CLIP: `clip.*` (OpenCLIP layout, text
    under `clip.text.*`), `visual.*` (DA-CLIP registers the frozen tower twice), `visual_control.*`
    with its zero modules, and `logit_scale` (the controller's)."""
    if not controller.reverse:
        raise UsageError("this controller was trained with the in-order wiring, which DA-CLIP's layout "
                         "cannot hold: retrain it with `lmdir priors train-controller`")
    out = openclip_state_dict(clip.bind(clip.params), custom_text=True, prefix="clip.")
    out.update({k[len("clip."):]: v for k, v in out.items() if k.startswith("clip.visual.")})
    table = clip_weights.daclip_controller_table(controller.shape.layers)
    out.update(clip_weights.to_table(nnx.to_pure_dict(nnx.state(controller)), table))
    return out


def save_daclip(controller: Controller, clip, path: str | Path) -> Path:
    """Write a controller with its frozen CLIP in DA-CLIP's checkpoint layout: a PyTorch file
    `{'state_dict': ...}` (.pt, needs torch) or the flat state dict as .safetensors."""
    path = Path(path)
    tensors = daclip_state_dict(controller, clip)
    if path.suffix == ".safetensors":
        clip_weights.write_safetensors(tensors, path)
        return path
    try:
        import torch
    except ImportError:
        raise UsageError(f"writing {path.name} (a PyTorch file) needs torch: install it, or write "
                         ".safetensors") from None
    buf = io.BytesIO()
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in tensors.items()}}, buf)
    atomic_write_bytes(path, buf.getvalue())
    return path
