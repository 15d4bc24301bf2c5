"""CLIP (Radford et al. 2021) in Flax NNX: text tower, vision tower, projections and logit scale.

The modules carry the attribute names of transformers' CLIP (`text_model.encoder.layers.0.self_attn.
q_proj`, `vision_model.pre_layrnorm`, ...), so a parameter's path is its name in a Hugging Face
checkpoint (`clip_weights` maps names and layouts: PyTorch (out, in) weights, OpenCLIP, DA-CLIP).
Both released variants are covered: quick_gelu (OpenAI) or gelu (most OpenCLIP) MLPs, and the
text tower pooled at the first end-of-text token or, for configs that predate it, at
argmax(input_ids).

`load_text_encoder` / `save_text_encoder` read and write a transformers `CLIPTextModel` folder (what a
Stable Diffusion folder holds in text_encoder/); `load_clip_model` / `save_clip_model` a whole
`CLIPModel` folder.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

from lmdir_jax.errors import UsageError
from lmdir_jax.priors import clip_weights

DTYPES = ("float32", "bfloat16", "float16")


def activation(name: str):
    """The MLP activation of a CLIP config: quick_gelu (x * sigmoid(1.702 x)) or gelu (exact or tanh)."""
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    raise UsageError(f"unsupported CLIP activation {name!r} (quick_gelu or gelu)")


@dataclass(frozen=True)
class ClipTextConfig:
    """Shape of a CLIP text tower. `eos_token_id` None pools at argmax(input_ids) (the end-of-text
    token has the largest id in CLIP's vocabulary; configs before transformers 4.31 said 2)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_layers: int = 12
    num_heads: int = 8
    max_positions: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512
    eos_token_id: int | None = 49407
    bos_token_id: int = 49406
    pad_token_id: int = 1

    @property
    def argmax_pooling(self) -> bool:
        """Whether the pooled state is taken at argmax(input_ids) (no usable end-of-text id)."""
        return self.eos_token_id is None or self.eos_token_id == 2

    @classmethod
    def from_hf(cls, d: dict) -> ClipTextConfig:
        """From a transformers `text_config` dict (or a clip_text_model config.json)."""
        c = CLIPTextConfig(**{k: v for k, v in d.items() if k not in ("model_type", "transformers_version")})
        return cls(
            vocab_size=int(c.vocab_size), hidden_size=int(c.hidden_size),
            intermediate_size=int(c.intermediate_size), num_layers=int(c.num_hidden_layers),
            num_heads=int(c.num_attention_heads), max_positions=int(c.max_position_embeddings),
            hidden_act=str(c.hidden_act), layer_norm_eps=float(c.layer_norm_eps),
            projection_dim=int(getattr(c, "projection_dim", 512) or 512),
            eos_token_id=None if c.eos_token_id is None else int(c.eos_token_id),
            bos_token_id=int(c.bos_token_id if c.bos_token_id is not None else 49406),
            pad_token_id=int(c.pad_token_id if c.pad_token_id is not None else 1),
        )

    def to_hf(self) -> dict:
        """The transformers `CLIPTextConfig` keyword arguments of this shape."""
        return dict(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            max_position_embeddings=self.max_positions, hidden_act=self.hidden_act,
            layer_norm_eps=self.layer_norm_eps, projection_dim=self.projection_dim,
            eos_token_id=2 if self.eos_token_id is None else self.eos_token_id,
            bos_token_id=self.bos_token_id, pad_token_id=self.pad_token_id,
        )


@dataclass(frozen=True)
class ClipVisionConfig:
    """Shape of a CLIP vision transformer (ViT: patch convolution, class token, pre/post layer norm)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512

    @classmethod
    def from_hf(cls, d: dict) -> ClipVisionConfig:
        """From a transformers `vision_config` dict."""
        c = CLIPVisionConfig(**{k: v for k, v in d.items() if k not in ("model_type", "transformers_version")})
        if int(c.num_channels) != 3:
            raise UsageError(f"CLIP vision tower with {c.num_channels} input channels (need 3)")
        return cls(
            hidden_size=int(c.hidden_size), intermediate_size=int(c.intermediate_size),
            num_layers=int(c.num_hidden_layers), num_heads=int(c.num_attention_heads),
            image_size=int(c.image_size), patch_size=int(c.patch_size), hidden_act=str(c.hidden_act),
            layer_norm_eps=float(c.layer_norm_eps), projection_dim=int(getattr(c, "projection_dim", 512) or 512),
        )

    def to_hf(self) -> dict:
        """The transformers `CLIPVisionConfig` keyword arguments of this shape."""
        return dict(
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads, image_size=self.image_size,
            patch_size=self.patch_size, hidden_act=self.hidden_act, layer_norm_eps=self.layer_norm_eps,
            projection_dim=self.projection_dim,
        )


@dataclass(frozen=True)
class ClipConfig:
    """A whole CLIP: both towers, the shared embedding width and the initial logit scale (log)."""

    text: ClipTextConfig
    vision: ClipVisionConfig
    projection_dim: int = 512
    logit_scale_init: float = 2.6592

    @classmethod
    def from_hf(cls, d: dict) -> ClipConfig:
        """From a transformers CLIP config.json dict (model_type 'clip')."""
        proj = int(d.get("projection_dim", 512))
        text = dataclasses.replace(ClipTextConfig.from_hf(d.get("text_config") or {}), projection_dim=proj)
        vision = dataclasses.replace(ClipVisionConfig.from_hf(d.get("vision_config") or {}), projection_dim=proj)
        return cls(text, vision, proj, float(d.get("logit_scale_init_value", 2.6592)))

    def to_hf(self):
        """A transformers `CLIPConfig` of this shape (what `save_pretrained` writes as config.json)."""
        return CLIPConfig(text_config=self.text.to_hf(), vision_config=self.vision.to_hf(),
                          projection_dim=self.projection_dim, logit_scale_init_value=self.logit_scale_init)


# --------------------------------------------------------------------------- layers


class ClipAttention(nnx.Module):
    """Multi-head self-attention with separate q/k/v projections (scaled by head_dim ** -0.5)."""

    def __init__(self, dim: int, heads: int, *, dtype, rngs: nnx.Rngs):
        if dim % heads:
            raise UsageError(f"CLIP width {dim} is not a multiple of its {heads} heads")
        self.heads = heads
        lin = lambda: nnx.Linear(dim, dim, dtype=dtype, rngs=rngs)  # noqa: E731
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = lin(), lin(), lin(), lin()

    def __call__(self, x: jax.Array, bias: jax.Array | None = None) -> jax.Array:
        b, n, d = x.shape
        hd = d // self.heads
        q = (self.q_proj(x) * hd**-0.5).reshape(b, n, self.heads, hd)
        k = self.k_proj(x).reshape(b, n, self.heads, hd)
        v = self.v_proj(x).reshape(b, n, self.heads, hd)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
        if bias is not None:
            logits = logits + bias
        w = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return self.out_proj(jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, n, d))


class ClipMlp(nnx.Module):
    """fc1 -> activation -> fc2."""

    def __init__(self, dim: int, hidden: int, act: str, *, dtype, rngs: nnx.Rngs):
        self.act = activation(act)
        self.fc1 = nnx.Linear(dim, hidden, dtype=dtype, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class ClipEncoderLayer(nnx.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, dim: int, hidden: int, heads: int, act: str, eps: float, *, dtype, rngs: nnx.Rngs):
        self.self_attn = ClipAttention(dim, heads, dtype=dtype, rngs=rngs)
        self.layer_norm1 = nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, rngs=rngs)
        self.mlp = ClipMlp(dim, hidden, act, dtype=dtype, rngs=rngs)
        self.layer_norm2 = nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, bias: jax.Array | None = None) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), bias)
        return x + self.mlp(self.layer_norm2(x))


class ClipEncoder(nnx.Module):
    """A stack of `ClipEncoderLayer`s."""

    def __init__(self, n: int, dim: int, hidden: int, heads: int, act: str, eps: float, *, dtype, rngs):
        self.layers = nnx.List([ClipEncoderLayer(dim, hidden, heads, act, eps, dtype=dtype, rngs=rngs)
                                for _ in range(n)])

    def __call__(self, x: jax.Array, bias: jax.Array | None = None, hints=None, collect: bool = False):
        """Output of the stack, and with `collect` the output of each layer; `hints[i]`, when given,
        is added to the output of layer i (DA-CLIP's control)."""
        states = []
        for i, layer in enumerate(self.layers):
            x = layer(x, bias)
            if hints is not None:
                x = x + hints[i]
            if collect:
                states.append(x)
        return x, states


# --------------------------------------------------------------------------- towers


class ClipTextEmbeddings(nnx.Module):
    """Token embedding + learnt absolute position embedding."""

    def __init__(self, cfg: ClipTextConfig, *, dtype, rngs: nnx.Rngs):
        self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.position_embedding = nnx.Embed(cfg.max_positions, cfg.hidden_size, dtype=dtype, rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return self.token_embedding(ids) + self.position_embedding(jnp.arange(ids.shape[-1]))[None]


class ClipTextTransformer(nnx.Module):
    """CLIP's text tower: token + position embeddings, causal pre-LN transformer, final layer norm.

    `__call__(ids (B, T) int32, mask (B, T) bool | None)` -> (last hidden states (B, T, D) after the
    final layer norm, pooled (B, D): the state at the end-of-text token).
    """

    def __init__(self, cfg: ClipTextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.embeddings = ClipTextEmbeddings(cfg, dtype=dtype, rngs=rngs)
        self.encoder = ClipEncoder(cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
                                   cfg.hidden_act, cfg.layer_norm_eps, dtype=dtype, rngs=rngs)
        self.final_layer_norm = nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=dtype,
                                              rngs=rngs)

    def __call__(self, ids: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        ids = jnp.asarray(ids, jnp.int32)
        t = ids.shape[-1]
        if t > self.config.max_positions:
            raise UsageError(f"{t} tokens but this CLIP text tower takes at most {self.config.max_positions}")
        allowed = jnp.tril(jnp.ones((t, t), bool))[None, None]
        if mask is not None:
            allowed = allowed & jnp.asarray(mask, bool)[:, None, None, :]
        bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)
        x, _ = self.encoder(self.embeddings(ids), bias)
        x = self.final_layer_norm(x)
        if self.config.argmax_pooling:
            at = ids.argmax(-1)
        else:
            at = (ids == self.config.eos_token_id).astype(jnp.int32).argmax(-1)
        return x, x[jnp.arange(x.shape[0]), at]


class ClipVisionEmbeddings(nnx.Module):
    """Patch convolution (no bias), class token in front, learnt position embedding."""

    def __init__(self, cfg: ClipVisionConfig, *, dtype, rngs: nnx.Rngs):
        p, d = cfg.patch_size, cfg.hidden_size
        self.patch_embedding = nnx.Conv(3, d, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                                        dtype=dtype, rngs=rngs)
        self.class_embedding = nnx.Param(jax.random.normal(rngs.params(), (d,)) * d**-0.5)
        n = (cfg.image_size // p) ** 2 + 1
        self.position_embedding = nnx.Embed(n, d, dtype=dtype, rngs=rngs)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        x = self.patch_embedding(pixels)
        b, d = x.shape[0], x.shape[-1]
        x = x.reshape(b, -1, d)
        n = x.shape[1] + 1
        if n != self.position_embedding.num_embeddings:
            raise UsageError(f"{x.shape[1]} patches but this CLIP vision tower has "
                             f"{self.position_embedding.num_embeddings - 1} positions")
        cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (b, 1, d))
        return jnp.concatenate([cls, x], axis=1) + self.position_embedding(jnp.arange(n))[None]


class ClipVisionTransformer(nnx.Module):
    """CLIP's ViT on normalised NHWC pixels: patch convolution, class token, position embedding,
    `pre_layrnorm`, pre-LN transformer, `post_layernorm` of the class token (the pooled output)."""

    def __init__(self, cfg: ClipVisionConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.embeddings = ClipVisionEmbeddings(cfg, dtype=dtype, rngs=rngs)
        eps = cfg.layer_norm_eps
        self.pre_layrnorm = nnx.LayerNorm(cfg.hidden_size, epsilon=eps, dtype=dtype, rngs=rngs)
        self.encoder = ClipEncoder(cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
                                   cfg.hidden_act, eps, dtype=dtype, rngs=rngs)
        self.post_layernorm = nnx.LayerNorm(cfg.hidden_size, epsilon=eps, dtype=dtype, rngs=rngs)

    def __call__(self, pixels: jax.Array, hints=None, collect: bool = False):
        """-> (pooled (B, W), per-layer outputs when `collect`, else []); `hints` as in `ClipEncoder`."""
        x = self.pre_layrnorm(self.embeddings(pixels))
        x, states = self.encoder(x, None, hints, collect)
        return self.post_layernorm(x[:, 0]), states


class ClipModel(nnx.Module):
    """Both towers, their bias-free projections into the shared space and the logit scale (log)."""

    def __init__(self, cfg: ClipConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.text_model = ClipTextTransformer(cfg.text, dtype=dtype, rngs=rngs)
        self.vision_model = ClipVisionTransformer(cfg.vision, dtype=dtype, rngs=rngs)
        p = cfg.projection_dim
        self.text_projection = nnx.Linear(cfg.text.hidden_size, p, use_bias=False, dtype=dtype, rngs=rngs)
        self.visual_projection = nnx.Linear(cfg.vision.hidden_size, p, use_bias=False, dtype=dtype, rngs=rngs)
        self.logit_scale = nnx.Param(jnp.asarray(cfg.logit_scale_init, jnp.float32))

    def text_states(self, ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """Last hidden states (B, T, D) of the text tower."""
        return self.text_model(ids, mask)[0]

    def text_embeds(self, ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """Projected, unnormalised text embeddings (B, P)."""
        return self.text_projection(self.text_model(ids, mask)[1])

    def image_embeds(self, pixels: jax.Array) -> jax.Array:
        """Projected, unnormalised image embeddings (B, P) of normalised NHWC pixels."""
        return self.visual_projection(self.vision_model(pixels)[0])


# --------------------------------------------------------------------------- building and files


def _jnp_dtype(dtype: str):
    if dtype not in DTYPES:
        raise UsageError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    return getattr(jnp, dtype)


def abstract(build) -> tuple[nnx.GraphDef, dict]:
    """(graphdef, pure dict of ShapeDtypeStructs) of the module `build()` makes, without allocating it."""
    graphdef, state = nnx.split(nnx.eval_shape(build))
    return graphdef, nnx.to_pure_dict(state)


def cast_floats(params: Any, dtype: Any) -> Any:
    """Cast every floating-point leaf of a params pytree to `dtype` (integer leaves untouched)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def build(graphdef: nnx.GraphDef, params: dict, dtype: Any = None):
    """The module of `graphdef` holding `params` (a pure dict of arrays), floats cast to `dtype` if
    given."""
    params = jax.tree.map(jnp.asarray, params)
    return nnx.merge(graphdef, params if dtype is None else cast_floats(params, dtype))


def _read_config(folder: Path) -> dict:
    f = folder / "config.json"
    if not f.is_file():
        raise UsageError(f"{folder} is not a Hugging Face model folder (no config.json)")
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {f}: {e}") from None


def load_text_encoder(folder: str | Path, dtype: str = "float32") -> tuple[ClipTextTransformer, ClipTextConfig]:
    """A transformers `CLIPTextModel` folder (config.json with model_type 'clip_text_model', weights
    `text_model.*` (transformers 4) or without the prefix (transformers 5) in model.safetensors, or
    pytorch_model.bin when torch is installed) as our text tower. What a Stable Diffusion folder
    holds in text_encoder/."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"text encoder folder not found: {folder}")
    d = _read_config(folder)
    if d.get("model_type") not in ("clip_text_model", "clip"):
        raise UsageError(f"{folder} is not a CLIP text encoder (model_type={d.get('model_type')!r})")
    cfg = ClipTextConfig.from_hf(d.get("text_config", d) if d.get("model_type") == "clip" else d)
    dt = _jnp_dtype(dtype)
    graphdef, shapes = abstract(lambda: ClipTextTransformer(cfg, dtype=dt, rngs=nnx.Rngs(0)))
    tensors = clip_weights.read_tensors(folder)
    prefix = "" if "embeddings.token_embedding.weight" in tensors else "text_model."
    params = clip_weights.from_hf(tensors, shapes, prefix=prefix, source=folder,
                                  convert=lambda a: jnp.asarray(a, dt))
    return build(graphdef, params), cfg


def save_text_encoder(module: ClipTextTransformer, config: ClipTextConfig, folder: str | Path) -> Path:
    """Write `module` as a transformers `CLIPTextModel` folder (config.json + model.safetensors)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf = CLIPTextConfig(**config.to_hf())
    hf.architectures = ["CLIPTextModel"]
    hf.save_pretrained(str(folder))
    clip_weights.write_safetensors(
        clip_weights.to_hf(nnx.to_pure_dict(nnx.state(module)), prefix="text_model."), folder / "model.safetensors")
    return folder


def load_clip_model(folder: str | Path, dtype: str = "float32") -> tuple[ClipModel, ClipConfig]:
    """A transformers `CLIPModel` folder (config.json model_type 'clip'; model.safetensors (sharded or
    not), pytorch_model.bin with torch, or flax_model.msgpack) as our `ClipModel`."""
    folder = Path(folder)
    d = _read_config(folder)
    if d.get("model_type") != "clip":
        raise UsageError(f"{folder} is not a CLIP model (model_type={d.get('model_type')!r}, need 'clip')")
    cfg = ClipConfig.from_hf(d)
    dt = _jnp_dtype(dtype)
    graphdef, shapes = abstract(lambda: ClipModel(cfg, dtype=dt, rngs=nnx.Rngs(0)))
    if clip_weights.has_flax_weights(folder) and not clip_weights.has_torch_weights(folder):
        params = clip_weights.read_flax_msgpack(folder, shapes)
    else:  # cast tensor by tensor: a bf16 model never holds its float32 weights
        params = clip_weights.from_hf(clip_weights.read_tensors(folder), shapes, source=folder,
                                      convert=lambda a: jnp.asarray(a, dt))
    return build(graphdef, params, dt), cfg


def save_clip_model(model: ClipModel, folder: str | Path) -> Path:
    """Write `model` as a transformers `CLIPModel` folder (config.json + model.safetensors)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf = model.config.to_hf()
    hf.architectures = ["CLIPModel"]
    hf.save_pretrained(str(folder))
    tensors = clip_weights.to_hf(nnx.to_pure_dict(nnx.state(model)))
    clip_weights.write_safetensors(tensors, folder / "model.safetensors")
    return folder



# --------------------------------------------------------------------------- OpenCLIP / DA-CLIP

OPENCLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
OPENCLIP_CONFIG = "open_clip_config.json"


def config_from_openclip(d: dict) -> ClipConfig:
    """Our config of an OpenCLIP ViT model config (`embed_dim`, `vision_cfg`, `text_cfg`, `quick_gelu`).
    Layer scale, attention pooling and non-ViT towers are refused with one line."""
    v, t = d.get("vision_cfg") or {}, d.get("text_cfg") or {}
    for key, where in (("layers", "vision_cfg"), ("width", "vision_cfg"), ("patch_size", "vision_cfg"),
                       ("width", "text_cfg"), ("layers", "text_cfg")):
        if key not in (v if where == "vision_cfg" else t):
            raise UsageError(f"OpenCLIP model config without {where}.{key} (a ViT CLIP is needed)")
    if isinstance(v.get("layers"), list | tuple) or "timm_model_name" in v or "hf_model_name" in t:
        raise UsageError("only OpenCLIP ViT models with OpenCLIP's own text tower are supported")
    for cfg, where in ((v, "vision_cfg"), (t, "text_cfg")):
        for key in ("ls_init_value", "attentional_pool", "no_ln_pre", "final_ln_after_pool"):
            if cfg.get(key):
                raise UsageError(f"OpenCLIP {where}.{key} is not supported")
    if t.get("pool_type", "argmax") != "argmax" or v.get("pool_type", "tok") != "tok":
        raise UsageError("only OpenCLIP's default pooling (class token, argmax of the text) is supported")
    act = "quick_gelu" if d.get("quick_gelu") else "gelu"
    size = v.get("image_size", 224)
    size = int(size[0] if isinstance(size, list | tuple) else size)
    embed = int(d["embed_dim"])
    vw, tw = int(v["width"]), int(t["width"])
    text = ClipTextConfig(
        vocab_size=int(t.get("vocab_size", 49408)), hidden_size=tw, intermediate_size=int(tw * float(t.get("mlp_ratio", 4.0))),
        num_layers=int(t["layers"]), num_heads=int(t.get("heads", 8)), max_positions=int(t.get("context_length", 77)),
        hidden_act=act, layer_norm_eps=1e-5, projection_dim=embed, eos_token_id=None, pad_token_id=0,
    )
    vision = ClipVisionConfig(
        hidden_size=vw, intermediate_size=int(vw * float(v.get("mlp_ratio", 4.0))), num_layers=int(v["layers"]),
        num_heads=vw // int(v.get("head_width", 64)), image_size=size, patch_size=int(v["patch_size"]),
        hidden_act=act, layer_norm_eps=1e-5, projection_dim=embed,
    )
    return ClipConfig(text, vision, embed, float(np.log(1 / 0.07)))


def openclip_checkpoint(path: str | Path) -> tuple[Path, dict | None]:
    """(weights file, model config from an open_clip_config.json beside it or None) of an OpenCLIP
    checkpoint file or a Hugging Face hub folder of one."""
    path = Path(path)
    if path.is_dir():
        found = next((path / f for f in OPENCLIP_FILES if (path / f).is_file()), None)
        if found is None:
            raise UsageError(f"{path} holds neither a Hugging Face CLIP (config.json) nor an OpenCLIP "
                             f"checkpoint ({' or '.join(OPENCLIP_FILES)})")
        path = found
    if not path.is_file():
        raise UsageError(f"CLIP checkpoint not found: {path}")
    cfg_file = path.parent / OPENCLIP_CONFIG
    cfg = clip_weights.openclip_config(cfg_file) if cfg_file.is_file() else None
    return path, cfg


def resolve_openclip_config(path: Path, model: str | None, found: dict | None) -> dict:
    """The model config of an OpenCLIP checkpoint: `model` (name or JSON), else the folder's
    open_clip_config.json, else a model name in the file's name; one clear line when none."""
    if model:
        return clip_weights.openclip_config(model)
    if found is not None:
        return found
    name = clip_weights.model_name_in(path)
    if name is None:
        raise UsageError(f"{path}: name its OpenCLIP model with --model (e.g. ViT-B-32, or a model-config JSON)")
    return clip_weights.openclip_config(name)


def load_openclip_model(path: str | Path, model: str | None = None, dtype: str = "float32",
                        tensors: dict | None = None) -> tuple[ClipModel, ClipConfig, dict]:
    """An OpenCLIP state dict (.pt/.bin/.safetensors, a hub folder with open_clip_config.json) or a
    DA-CLIP checkpoint (its frozen `clip.*`) as our `ClipModel`; returns (model, config, the
    OpenCLIP model config)."""
    file, found = openclip_checkpoint(path)
    ocfg = resolve_openclip_config(file, model, found)
    if tensors is None:
        tensors = clip_weights.read_checkpoint_file(file)
    prefix = clip_weights.openclip_prefix(tensors)
    if clip_weights.is_daclip(tensors):
        prefix += "clip."
        ocfg = {**ocfg, "custom_text": any(k.startswith(prefix + "text.") for k in tensors)}
    elif any(k.startswith(prefix + "text.") for k in tensors):
        ocfg = {**ocfg, "custom_text": True}
    cfg = config_from_openclip(ocfg)
    dt = _jnp_dtype(dtype)
    graphdef, shapes = abstract(lambda: ClipModel(cfg, dtype=dt, rngs=nnx.Rngs(0)))
    params = clip_weights.from_table(tensors, clip_weights.openclip_table(ocfg, prefix), shapes, file)
    return build(graphdef, params, dt), cfg, ocfg


def openclip_state_dict(model: ClipModel, custom_text: bool = False, prefix: str = "") -> dict[str, np.ndarray]:
    """OpenCLIP's state dict of our `ClipModel` (for DA-CLIP's layout and tests)."""
    cfg = model.config
    ocfg = {"custom_text": custom_text, "text_cfg": {"layers": cfg.text.num_layers},
            "vision_cfg": {"layers": cfg.vision.num_layers}}
    return clip_weights.to_table(nnx.to_pure_dict(nnx.state(model)), clip_weights.openclip_table(ocfg, prefix))
