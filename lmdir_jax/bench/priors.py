"""`lmdir bench priors`: CLIP texts/s and images/s, Stable Diffusion images/s.

With no --clip/--sd folder it builds tiny random models in a temporary folder (mechanics only:
the numbers mean something with real weights on an accelerator).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from lmdir_jax.bench import priors_reference as ref
from lmdir_jax.errors import UsageError
from lmdir_jax.priors.clip import load_clip
from lmdir_jax.priors.diffusion import benchmark_sd, load_sd, save_tiny_sd
from lmdir_jax.priors.tiny import save_tiny_clip


def register(bsub) -> None:
    """Add `lmdir bench priors`."""
    p = bsub.add_parser("priors", help="CLIP text/image throughput and Stable Diffusion images/s")
    p.add_argument("--clip", metavar="DIR", help="CLIP folder (default: a tiny random one)")
    p.add_argument("--sd", metavar="DIR", help="SD folder (default: a tiny random one)")
    p.add_argument("--no-sd", action="store_true", help="skip the Stable Diffusion measurement")
    p.add_argument("--batch", type=int, default=8, help="texts / images per call (default 8)")
    p.add_argument("--steps", type=int, default=4, help="SD DDIM steps (default 4)")
    p.add_argument("--size", type=int, default=0, help="SD image side (default: the model's own)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls after warm-up (default 3)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--against-torch", action="store_true",
                   help="instead: random full-size ViT-B/32 image embeddings (batch 32) and one SD-1.5 UNet "
                   "step (64x64 latents), ours vs transformers / diffusers on this machine")
    p.add_argument("--cache-memory", metavar="PHOTOS",
                   help="instead: peak RSS of `lmdir priors build` on PHOTOS with a random ViT-L/14-sized "
                   "CLIP and SD-1.5-sized SD (--dtype, --size default 256, --steps)")
    p.set_defaults(func=run)


def _time(fn, repeats: int) -> tuple[float, float]:
    """(first call incl. compilation, mean of `repeats` later calls) in seconds."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return first, (time.perf_counter() - t0) / repeats


def benchmark_clip(clip, batch: int = 8, repeats: int = 3) -> dict:
    """Texts/s of the text tower, images/s of the image tower and of the automatic prior."""
    texts = [f"a photo of a city street number {i} in heavy rain" for i in range(batch)]
    images = np.random.default_rng(0).random((batch, clip.image_size, clip.image_size, 3))
    images = images.astype(np.float32)
    ids, mask = clip.tokenize(texts)

    def text():
        jax.block_until_ready(clip._jit_states(clip.params, ids, mask))

    def image():
        jax.block_until_ready(clip._jit_image_feats(clip.params, images))

    def auto():
        jax.block_until_ready(clip._jit_auto(clip.params, images))

    t_first, t = _time(text, repeats)
    i_first, i = _time(image, repeats)
    a_first, a = _time(auto, repeats)
    return {
        "texts_per_s": batch / t,
        "images_per_s": batch / i,
        "auto_prior_images_per_s": batch / a,
        "first_call_s": {"text": t_first, "image": i_first, "auto": a_first},
        "batch": batch,
        "text_len": clip.max_text_len,
        "text_dim": clip.text_dim,
        "image_size": clip.image_size,
        "platform": jax.devices()[0].platform,
    }


def run(args) -> int:
    """Measure and print the numbers (one block for CLIP, one for SD)."""
    if args.batch < 1 or args.repeats < 1 or args.steps < 1:
        raise UsageError("--batch, --repeats and --steps must be >= 1")
    if args.against_torch or args.cache_memory:
        return run_reference(args)
    with tempfile.TemporaryDirectory() as tmp:
        clip_dir, sd_dir = args.clip, args.sd
        if not clip_dir:
            clip_dir = str(save_tiny_clip(Path(tmp) / "clip"))
        clip = load_clip(clip_dir, dtype=args.dtype)
        r = benchmark_clip(clip, batch=args.batch, repeats=args.repeats)
        print(
            f"CLIP {'tiny' if not args.clip else clip_dir} ({r['platform']}, {args.dtype}, batch "
            f"{r['batch']}, text len {r['text_len']}, width {r['text_dim']}, image {r['image_size']}px): "
            f"{r['texts_per_s']:.1f} texts/s, {r['images_per_s']:.1f} images/s, automatic prior "
            f"{r['auto_prior_images_per_s']:.1f} images/s (first calls "
            f"{r['first_call_s']['text']:.1f}/{r['first_call_s']['image']:.1f}/"
            f"{r['first_call_s']['auto']:.1f} s)"
        )
        if args.no_sd:
            return 0
        if not sd_dir:
            sd_dir = str(save_tiny_sd(Path(tmp) / "sd"))
        sd = load_sd(sd_dir, dtype=args.dtype)
        s = benchmark_sd(sd, batch=args.batch, steps=args.steps, size=args.size or None,
                         repeats=args.repeats)
        print(
            f"SD {'tiny' if not args.sd else sd_dir} ({s['platform']}, {s['dtype']}, batch {s['batch']}, "
            f"{s['steps']} steps, {s['size']}px): {s['images_per_s']:.3f} images/s, "
            f"{s['s_per_step_per_image'] * 1000:.1f} ms per step per image "
            f"(first call {s['first_call_s']:.1f} s)"
        )
    return 0


def run_reference(args) -> int:
    """`--against-torch` / `--cache-memory`: full-size random priors (bench/priors_reference.py)."""
    machine = f"{jax.devices()[0].platform}, {os.cpu_count()} CPU threads"
    if args.against_torch:
        for r in (ref.clip_against_torch(batch=32, repeats=args.repeats),
                  ref.unet_against_torch(latent=64, repeats=args.repeats)):
            print(f"{r['what']} ({machine}, float32): ours {r['ours_s'] * 1000:.0f} ms, PyTorch "
                  f"{r['torch_s'] * 1000:.0f} ms -> {r['speedup']:.2f}x (first calls {r['ours_first_s']:.1f} / "
                  f"{r['torch_first_s']:.1f} s; max |ours - PyTorch| {r['max_diff']:.1e})")
    if args.cache_memory:
        r = ref.cache_memory(args.cache_memory, dtype=args.dtype, sd_size=args.size or 256, steps=args.steps)
        print(f"prior cache with ViT-L/14-sized CLIP + SD-1.5-sized UNet/VAE ({machine}, {r['dtype']}, "
              f"{r['items']} images, SD {r['sd_size']} px, {r['steps']} steps): peak RSS {r['peak_rss_gib']:.2f} GiB "
              f"({r['build_s']:.0f} s)")
    return 0
