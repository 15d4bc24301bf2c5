"""lmdir_jax.priors: frozen CLIP and Stable Diffusion priors and the prior cache.

- `clip.load_clip(path) -> ClipPrior`: text states, zero-shot degradation prior, zero-shot captions.
- `diffusion.load_sd(path) -> StableDiffusion`: reference images (text-to-image, image-to-image).
- `cache.build_cache(...)` / `cache.PriorCache(path)`: per-image scene states and references.
- `tiny.save_tiny_clip` / `tiny.save_tiny_tokenizer`: tiny random models in the real layouts.

transformers / diffusers are imported only inside these modules.
"""
