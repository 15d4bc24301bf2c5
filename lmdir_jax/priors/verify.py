"""Our priors against the PyTorch references on a real photo: `lmdir priors verify` and `embed`.

`verify` loads a checkpoint into our NNX model and into the reference implementation (transformers'
`CLIPModel`, open_clip's `CLIP` / `CustomTextCLIP`, DA-CLIP's controlled tower on open_clip's blocks),
feeds both the same preprocessed
pixels and token ids, and reports max |ours - reference| per output. The references come from the
`verify` extra (torch, transformers, open_clip, diffusers), imported here only.

`embed` writes the projected, unnormalised embeddings CLIP's users compare across tools.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from transformers.utils import logging as tlog

from lmdir_jax.data.io import is_image_file, read_image
from lmdir_jax.errors import UsageError
from lmdir_jax.outputs import atomic_write_bytes
from lmdir_jax.priors import clip_weights
from lmdir_jax.priors.clip import ClipPrior, load_clip
from lmdir_jax.priors.clip_model import openclip_checkpoint, resolve_openclip_config
from lmdir_jax.priors.controller import (
    Controller,
    controlled_embeds,
    frozen_params,
    load_daclip_controller,
)
from lmdir_jax.priors.diffusion import load_sd

TOLERANCE = 1e-4  # float32, per output
DEFAULT_PROMPT = "a photo of a cat sitting on a wooden table"


def _require(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise UsageError(f"verify needs {module} (the reference implementation): "
                         "pip install 'lmdir-jax[verify]'") from None


def kind_of(path: Path) -> str:
    """'sd' (a diffusers folder), 'hf' (a Hugging Face CLIP folder) or 'openclip' (a checkpoint file
    or an OpenCLIP hub folder; DA-CLIP's checkpoint included)."""
    if not path.exists():
        raise UsageError(f"not found: {path}")
    if path.is_dir() and (path / "model_index.json").is_file():
        return "sd"
    if path.is_dir() and (path / "config.json").is_file():
        return "hf"
    return "openclip"


def read_photo(path: str | Path) -> np.ndarray:
    """One RGB photo (H, W, 3) float32 in [0, 1]; a missing or unreadable file is a UsageError."""
    img = read_image(path) if Path(path).is_file() else None
    if img is None:
        raise UsageError(f"not a readable image: {path}")
    return img


def _pixels(clip: ClipPrior, photos: np.ndarray) -> np.ndarray:
    """CLIP's own preprocessing (shorter side to the processor's size, centre crop, mean/std), NHWC."""
    return np.asarray(clip.preprocess(jnp.asarray(photos, jnp.float32)), np.float32)


def _tokens(clip: ClipPrior, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return clip.tokenize(texts, clip.model.config.text.max_positions)


def _diff(ours, ref, mask=None) -> float:
    d = np.abs(np.asarray(ours, np.float32) - np.asarray(ref, np.float32))
    return float(d[mask].max() if mask is not None else d.max())


def _ours(clip: ClipPrior, pixels: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    m = clip.bind(clip.params)
    return {
        "image_embeds": np.asarray(m.image_embeds(jnp.asarray(pixels))),
        "text_embeds": np.asarray(m.text_embeds(ids, mask)),
        "text_states": np.asarray(m.text_states(ids, mask)),
    }


def verify_hf(folder: Path, photo: np.ndarray, prompt: str) -> dict[str, float]:
    """Our CLIP against transformers' PyTorch `CLIPModel` of a Hugging Face folder."""
    torch = _require("torch")
    transformers = _require("transformers")
    from transformers import CLIPModel  # needs torch

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    if not clip_weights.has_torch_weights(folder):
        raise UsageError(f"{folder} has only flax_model.msgpack, which transformers' PyTorch CLIPModel "
                         "does not read: verify a folder with model.safetensors")
    clip = load_clip(folder)
    ref = CLIPModel.from_pretrained(str(folder), torch_dtype=torch.float32).eval()
    pixels = _pixels(clip, photo[None])
    ids, mask = _tokens(clip, [prompt])
    ours = _ours(clip, pixels, ids, mask)
    with torch.no_grad():
        t = ref.text_model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                           attention_mask=torch.from_numpy(mask.astype(np.int64)))
        v = ref.vision_model(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()))
        theirs = {"image_embeds": ref.visual_projection(v.pooler_output).numpy(),
                  "text_embeds": ref.text_projection(t.pooler_output).numpy(),
                  "text_states": t.last_hidden_state.numpy()}
    return {k: _diff(ours[k], theirs[k], mask if k == "text_states" else None) for k in ours}


def _openclip_reference(path: Path, model: str | None, tensors: dict, prefix: str):
    """open_clip's own model of the checkpoint's config, holding its weights (strict)."""
    torch = _require("torch")
    open_clip = _require("open_clip")
    file, found = openclip_checkpoint(path)
    ocfg = dict(resolve_openclip_config(file, model, found))
    sd = {k[len(prefix):]: torch.from_numpy(np.asarray(v)) for k, v in tensors.items() if k.startswith(prefix)}
    custom = any(k.startswith("text.") for k in sd)
    ocfg["custom_text"] = custom
    kwargs = {k: ocfg[k] for k in ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu") if k in ocfg}
    ref = (open_clip.CustomTextCLIP if custom else open_clip.CLIP)(**kwargs).eval()
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k != "attn_mask" and not k.endswith(".attn_mask")]
    if missing:
        raise UsageError(f"{path}: open_clip's model of this config lacks weights for {missing[0]} "
                         f"({len(missing)} in all): is --model the checkpoint's model?")
    return ref, open_clip, torch


def _vision_blocks(visual, x, torch, hints=None, collect=False):
    """open_clip's VisionTransformer forward written out block by block, with DA-CLIP's control:
    `hints` are popped from the end after each block (DA-CLIP's `control.pop()`); with `collect`
    the blocks' outputs are returned (the controller's hidden states, before its zero modules)."""
    x = visual.conv1(x)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype)
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
    x = visual.ln_pre(x)
    batch_first = getattr(visual.transformer, "batch_first", False)
    if not batch_first:
        x = x.permute(1, 0, 2)
    hints = list(hints) if hints is not None else None
    states = []
    for block in visual.transformer.resblocks:
        x = block(x)
        if collect:
            states.append(x if batch_first else x.permute(1, 0, 2))
        if hints is not None:
            h = hints.pop()
            x = x + (h if batch_first else h.permute(1, 0, 2))
    if not batch_first:
        x = x.permute(1, 0, 2)
    pooled = visual.ln_post(x[:, 0]) @ visual.proj
    return pooled, states


def verify_openclip(path: Path, model: str | None, photo: np.ndarray, prompt: str,
                    tokenizer: str | None = None) -> dict[str, float]:
    """Our CLIP (and for DA-CLIP our controller) against open_clip's model of the checkpoint."""
    _require("torch")
    file, _ = openclip_checkpoint(path)
    tensors = clip_weights.read_checkpoint_file(file)
    prefix = clip_weights.openclip_prefix(tensors)
    daclip = clip_weights.is_daclip(tensors)
    clip = load_clip(path, model=model, tokenizer=tokenizer)
    ref, open_clip, torch = _openclip_reference(path, model, tensors, prefix + ("clip." if daclip else ""))
    pixels = _pixels(clip, photo[None])
    ids, mask = _tokens(clip, [prompt])
    ours = _ours(clip, pixels, ids, mask)
    ref_ids = open_clip.tokenize([prompt], context_length=clip.model.config.text.max_positions)
    x = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        theirs = {"image_embeds": ref.encode_image(x).numpy(), "text_embeds": ref.encode_text(ref_ids).numpy()}
    out = {k: _diff(ours[k], theirs[k]) for k in theirs}
    out["tokens"] = float(np.abs(ids[0, : int(mask.sum())] - ref_ids.numpy()[0, : int(mask.sum())]).max())
    if daclip:
        ctrl = load_daclip_controller(file, clip, tensors=tensors)
        deg, image = daclip_embeddings(ctrl.controller, clip, pixels)
        rdeg, rimage = _daclip_reference(ref, tensors, prefix, x, torch)
        out["degradation_embeds"] = _diff(deg, rdeg)
        out["controlled_image_embeds"] = _diff(image, rimage)
    return out


def _daclip_reference(ref, tensors: dict, prefix: str, x, torch):
    """DA-CLIP's `encode_image(control=True)` on open_clip's blocks: the controller (a copy of the
    visual tower holding `visual_control.*`) and its zero modules steer the frozen tower."""
    control = copy.deepcopy(ref.visual)
    p = prefix + "visual_control."
    sd = {k[len(p):].replace("transformer.transformer.", "transformer."): torch.from_numpy(np.asarray(v))
          for k, v in tensors.items() if k.startswith(p) and ".zero_modules." not in k}
    control.load_state_dict(sd, strict=False)
    zeros = []
    for i in range(len(control.transformer.resblocks)):
        z = torch.nn.Linear(control.proj.shape[0], control.proj.shape[0])
        z.weight.data = torch.from_numpy(np.asarray(tensors[f"{p}transformer.zero_modules.{i}.weight"]))
        z.bias.data = torch.from_numpy(np.asarray(tensors[f"{p}transformer.zero_modules.{i}.bias"]))
        zeros.append(z)
    with torch.no_grad():
        deg, states = _vision_blocks(control, x, torch, collect=True)
        hints = [z(s) for z, s in zip(zeros, states, strict=True)]
        image, _ = _vision_blocks(ref.visual, x, torch, hints=hints)
    return deg.numpy(), image.numpy()


def daclip_embeddings(controller: Controller, clip: ClipPrior, pixels) -> tuple[np.ndarray, np.ndarray]:
    """(degradation embedding, controlled image embedding), projected and unnormalised, of
    normalised NHWC pixels: DA-CLIP's `encode_image(control=True)`."""
    deg, hints = controller.embed(jnp.asarray(pixels))
    image = controlled_embeds(frozen_params(clip), jnp.asarray(pixels), controller.shape, hints)
    return np.asarray(deg), np.asarray(image)


def verify(path: str | Path, model: str | None = None, image: str | Path | None = None,
           prompt: str = DEFAULT_PROMPT, tokenizer: str | None = None) -> dict[str, float]:
    """max |ours - reference| per output of the checkpoint at `path` on the photo `image`."""
    if image is None:
        raise UsageError("give a photo to compare on with --image PHOTO (any RGB JPEG/PNG)")
    photo = read_photo(image)
    path = Path(path)
    kind = kind_of(path)
    if kind == "sd":
        return verify_sd(path, photo, prompt)
    if kind == "hf":
        return verify_hf(path, photo, prompt)
    return verify_openclip(path, model, photo, prompt, tokenizer)


def _square(photo: np.ndarray, size: int) -> np.ndarray:
    """The photo's centre square resized to size x size (area interpolation), in [0, 1]."""
    import cv2

    h, w = photo.shape[:2]
    s = min(h, w)
    crop = photo[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    return np.clip(cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA), 0.0, 1.0)


def verify_sd(folder: Path, photo: np.ndarray, prompt: str, timestep: int = 500) -> dict[str, float]:
    """Our Stable Diffusion against diffusers' PyTorch `UNet2DConditionModel` and `AutoencoderKL` and
    transformers' `CLIPTextModel` of a diffusers folder, at the UNet's own resolution: text states,
    VAE encode (latent mean) and decode, and the UNet's prediction at `timestep` of the photo's
    latent noised with a seeded draw, conditioned on the prompt."""
    torch = _require("torch")
    _require("diffusers")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.utils import logging as dlog
    from transformers import CLIPTextModel  # needs torch

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    sd = load_sd(folder)
    x = _square(photo, sd.default_size)[None] * 2.0 - 1.0  # (1, S, S, 3) in [-1, 1]
    ids = sd.encode_prompts([prompt])
    text = CLIPTextModel.from_pretrained(str(folder / "text_encoder"), torch_dtype=torch.float32).eval()
    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"), torch_dtype=torch.float32).eval()
    vae = AutoencoderKL.from_pretrained(str(folder / "vae"), torch_dtype=torch.float32).eval()
    p = sd.params
    states = np.asarray(sd.text_encoder(jnp.asarray(ids), params=p["text"])[0])
    mean = np.asarray(sd.vae(p["vae"]).encode(jnp.asarray(x)))
    noise = np.random.default_rng(0).standard_normal(mean.shape).astype(np.float32)
    t = np.array([timestep], np.int32)
    latents = np.asarray(sd.scheduler.add_noise(jnp.asarray(mean * sd.vae_config.scaling_factor),
                                                jnp.asarray(noise), jnp.asarray(t)))
    ours = {
        "text_states": states,
        "vae_encode": mean,
        "vae_decode": np.asarray(sd.vae(p["vae"]).decode(jnp.asarray(mean))),
        "unet": np.asarray(sd.unet(p["unet"])(jnp.asarray(latents), jnp.asarray(t), jnp.asarray(states))),
    }
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
    nhwc = lambda a: a.numpy().transpose(0, 2, 3, 1)  # noqa: E731
    with torch.no_grad():
        theirs = {
            "text_states": text(input_ids=torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy(),
            "vae_encode": nhwc(vae.encode(nchw(x)).latent_dist.mean),
            "vae_decode": nhwc(vae.decode(nchw(mean)).sample),
            "unet": nhwc(unet(nchw(latents), torch.from_numpy(t.astype(np.int64)),
                              encoder_hidden_states=torch.from_numpy(np.array(states))).sample),
        }
    return {k: _diff(ours[k], theirs[k]) for k in ours}


def list_images(items: list[str]) -> list[Path]:
    """The image files named (folders: their images), in file-name order."""
    found: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found += [f for f in p.iterdir() if f.is_file() and is_image_file(f)]
        elif p.is_file():
            found.append(p)
        else:
            raise UsageError(f"image not found: {p}")
    if not found:
        raise UsageError("no images given")
    return sorted(found, key=lambda f: (f.name, str(f)))


def embed(path: str | Path, texts: list[str], images: list[Path], model: str | None = None,
          tokenizer: str | None = None) -> dict[str, np.ndarray]:
    """{'image': (N, P), 'text': (M, P)} float32 projected, unnormalised embeddings; for DA-CLIP's
    checkpoint also 'degradation' (N, P), and 'image' is its controlled tower's."""
    path = Path(path)
    if kind_of(path) == "sd":
        raise UsageError(f"{path} is a Stable Diffusion folder: embed takes a CLIP")
    clip = load_clip(path, model=model, tokenizer=tokenizer)
    out: dict[str, np.ndarray] = {}
    if texts:
        ids, mask = _tokens(clip, texts)
        out["text"] = np.asarray(clip.bind(clip.params).text_embeds(ids, mask), np.float32)
    else:
        out["text"] = np.zeros((0, clip.projection_dim), np.float32)
    pixels = np.concatenate([_pixels(clip, read_photo(f)[None]) for f in images])
    controller = None
    if path.is_file():
        tensors = clip_weights.read_checkpoint_file(path)
        if clip_weights.is_daclip(tensors):
            controller = load_daclip_controller(path, clip, tensors=tensors).controller
    if controller is not None:
        deg, image = daclip_embeddings(controller, clip, pixels)
        out["image"], out["degradation"] = image.astype(np.float32), deg.astype(np.float32)
    else:
        out["image"] = np.asarray(clip.bind(clip.params).image_embeds(jnp.asarray(pixels)), np.float32)
    return out


def write_npz(arrays: dict[str, np.ndarray], path: Path) -> Path:
    """Write float32 arrays as one .npz, atomically."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v, np.float32) for k, v in arrays.items()})
    return atomic_write_bytes(path, buf.getvalue())
