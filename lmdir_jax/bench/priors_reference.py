"""Full-size priors with random weights: our NNX CLIP and UNet against the PyTorch references on the
same machine (`lmdir bench priors --against-torch`), and the peak memory of building a prior cache
with ViT-L/14-sized CLIP and SD-1.5-sized Stable Diffusion (`--cache-memory`).

The reference models are built by transformers / diffusers with their own random initialisation;
ours are loaded from their state dicts through the same name tables real weights take, so both
compute the same function (the max |difference| is printed beside the times).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmdir_jax.errors import UsageError
from lmdir_jax.priors import clip_model, clip_weights
from lmdir_jax.priors.cache import MANIFEST
from lmdir_jax.priors.clip_model import (
    ClipModel,
    ClipTextConfig,
    config_from_openclip,
    save_clip_model,
)
from lmdir_jax.priors.diffusion import random_params, save_tiny_sd
from lmdir_jax.priors.tiny import save_tiny_tokenizer, tiny_clip_config, write_preprocessor_config
from lmdir_jax.priors.unet import UNet2DConditionModel, UNetConfig
from lmdir_jax.priors.vae import VAEConfig

CLIP_MODEL = "ViT-B-32-quickgelu"  # OpenAI's ViT-B/32, the CLIP of LMDIR's priors
CACHE_CLIP = "ViT-L-14-quickgelu"  # SD 1.5's text tower width, the largest CLIP users pass


def _require_torch():
    try:
        import torch
    except ImportError:
        raise UsageError("--against-torch needs torch, transformers and diffusers: "
                         "pip install 'lmdir-jax[verify]'") from None
    return torch


def _timed(fn, repeats: int) -> tuple[float, float]:
    """(first call, best of `repeats` later calls) in seconds; fn must block until done."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return first, best


def _ours_from_state_dict(build, state_dict) -> tuple[nnx.GraphDef, dict]:
    graphdef, shapes = clip_model.abstract(build)
    tensors = {k: v.detach().float().numpy() for k, v in state_dict.items()}
    params = clip_weights.from_hf(tensors, shapes, source="reference model")
    return graphdef, jax.tree.map(jnp.asarray, params)


def clip_against_torch(batch: int = 32, repeats: int = 3) -> dict:
    """Image embeddings of a random ViT-B/32 CLIP at `batch` x 224 px: ours vs transformers."""
    torch = _require_torch()
    from transformers import CLIPModel  # needs torch

    cfg = config_from_openclip(clip_weights.openclip_config(CLIP_MODEL))
    torch.manual_seed(0)
    ref = CLIPModel(cfg.to_hf()).eval()
    graphdef, params = _ours_from_state_dict(lambda: ClipModel(cfg, rngs=nnx.Rngs(0)), ref.state_dict())
    size = cfg.vision.image_size
    pixels = np.random.default_rng(0).standard_normal((batch, size, size, 3)).astype(np.float32)
    fn = jax.jit(lambda p, x: clip_model.build(graphdef, p).image_embeds(x))
    x_t = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))

    def theirs():
        with torch.inference_mode():
            return ref.visual_projection(ref.vision_model(pixel_values=x_t).pooler_output).numpy()

    ours_first, ours_s = _timed(lambda: jax.block_until_ready(fn(params, pixels)), repeats)
    ref_first, ref_s = _timed(theirs, repeats)
    diff = float(np.abs(np.asarray(fn(params, pixels)) - theirs()).max())
    return {"what": f"CLIP {CLIP_MODEL} image embeddings, batch {batch}", "ours_s": ours_s, "torch_s": ref_s,
            "speedup": ref_s / ours_s, "ours_first_s": ours_first, "torch_first_s": ref_first, "max_diff": diff}


def unet_against_torch(latent: int = 64, repeats: int = 3) -> dict:
    """One guided UNet step (batch 2: unconditional + conditional) of a random SD-1.5-shaped UNet at
    `latent` x `latent` latents, 77 text tokens of width 768: ours vs diffusers."""
    torch = _require_torch()
    from diffusers import UNet2DConditionModel as RefUNet

    cfg = UNetConfig()
    torch.manual_seed(0)
    ref = RefUNet(**{k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")}).eval()
    graphdef, params = _ours_from_state_dict(lambda: UNet2DConditionModel(cfg, rngs=nnx.Rngs(0)), ref.state_dict())
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, latent, latent, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 77, cfg.cross_attention_dim)).astype(np.float32)
    t = np.array([500, 500], np.int32)
    fn = jax.jit(lambda p, x, t, c: nnx.merge(graphdef, p)(x, t, c))
    x_t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    t_t, c_t = torch.from_numpy(t.astype(np.int64)), torch.from_numpy(ctx)

    def theirs():
        with torch.inference_mode():
            return ref(x_t, t_t, encoder_hidden_states=c_t).sample.numpy()

    ours_first, ours_s = _timed(lambda: jax.block_until_ready(fn(params, x, t, ctx)), repeats)
    ref_first, ref_s = _timed(theirs, repeats)
    diff = float(np.abs(np.asarray(fn(params, x, t, ctx)).transpose(0, 3, 1, 2) - theirs()).max())
    return {"what": f"SD-1.5 UNet step, batch 2, {latent}x{latent} latents", "ours_s": ours_s, "torch_s": ref_s,
            "speedup": ref_s / ours_s, "ours_first_s": ours_first, "torch_first_s": ref_first, "max_diff": diff}


def write_random_clip(folder: Path, name: str = CACHE_CLIP, seed: int = 0) -> Path:
    """A random CLIP of OpenCLIP's `name` shape in the Hugging Face layout, with the tiny tokenizer
    (its special ids; the embedding keeps CLIP's 49,408 rows)."""
    tiny = tiny_clip_config().text
    cfg = config_from_openclip(clip_weights.openclip_config(name))
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(
        cfg.text, bos_token_id=tiny.bos_token_id, eos_token_id=tiny.eos_token_id, pad_token_id=tiny.pad_token_id))
    graphdef, shapes = clip_model.abstract(lambda: ClipModel(cfg, rngs=nnx.Rngs(0)))
    model = clip_model.build(graphdef, random_params(shapes, seed))
    save_clip_model(model, folder)
    write_preprocessor_config(folder, cfg.vision.image_size)
    save_tiny_tokenizer(folder)
    return folder


def write_cache_models(root: str | Path) -> None:
    """ROOT/clip (random ViT-L/14-sized CLIP) and ROOT/sd (SD-1.5-sized UNet and VAE, 12-layer text
    tower of width 768), both in the layouts real weights come in."""
    tiny = tiny_clip_config().text
    text = ClipTextConfig(vocab_size=tiny.vocab_size, hidden_size=768, intermediate_size=3072, num_layers=12,
                          num_heads=12, projection_dim=768, bos_token_id=tiny.bos_token_id,
                          eos_token_id=tiny.eos_token_id, pad_token_id=tiny.pad_token_id)
    write_random_clip(Path(root) / "clip")
    save_tiny_sd(Path(root) / "sd", unet=UNetConfig(), vae=VAEConfig(), text=text)


def _run_measured(cmd: list[str], log: Path) -> tuple[int, float]:
    """(exit status, peak RSS in GiB) of one child process and the children it waited for.

    The models are written by a child of their own first, so this process stays small: a forked
    child's peak would otherwise count the parent's pages it shares until it executes."""
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss / 2**20


def cache_memory(data: str, dtype: str = "bfloat16", items: int = 2, sd_size: int = 256,
                 steps: int = 2) -> dict:
    """Peak RSS of `lmdir priors build` (a child process) with a random ViT-L/14-sized CLIP and an
    SD-1.5-sized UNet, VAE and 12-layer text tower, on `items` images of `data`."""
    if not Path(data).is_dir():
        raise UsageError(f"--cache-memory needs a folder of training photos: {data} not found")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        code, _ = _run_measured([sys.executable, "-c", "import sys; from lmdir_jax.bench.priors_reference "
                                 "import write_cache_models; write_cache_models(sys.argv[1])", str(root)],
                                root / "write.log")
        if code:
            raise UsageError(f"writing the random models failed ({code}): see {root / 'write.log'}")
        written = time.perf_counter() - t0
        cmd = [sys.executable, "-m", "lmdir_jax.cli", "priors", "build", "--data", str(data),
               "--clip", str(root / "clip"), "--sd", str(root / "sd"), "--output", str(root / "cache"),
               "--max-items", str(items), "--batch", "1", "--steps", str(steps), "--sd-size", str(sd_size),
               "--dtype", dtype]
        t0 = time.perf_counter()
        code, peak = _run_measured(cmd, root / "build.log")
        seconds = time.perf_counter() - t0
        if code:
            tail = (root / "build.log").read_text(errors="replace").strip().splitlines()[-1:]
            raise UsageError(f"priors build failed ({code}): {tail}")
        manifest = json.loads((root / "cache" / MANIFEST).read_text())
    return {"peak_rss_gib": peak, "dtype": dtype, "items": items, "sd_size": sd_size,
            "steps": steps, "build_s": seconds, "write_models_s": written, "manifest_dtype": manifest.get("dtype")}
