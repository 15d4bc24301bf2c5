"""lmdir_jax.priors: frozen CLIP and Stable Diffusion priors and the prior cache.

- `clip.load_clip(path) -> ClipPrior`: text states, zero-shot degradation prior, zero-shot captions,
  on our NNX CLIP (`clip_model`) loaded from Hugging Face, OpenCLIP or DA-CLIP weights (`clip_weights`).
- `diffusion.load_sd(path) -> StableDiffusion`: reference images (text-to-image, image-to-image).
- `cache.build_cache(...)` / `cache.PriorCache(path)`: per-image scene states and references.
- `tiny.save_tiny_clip` / `tiny.save_tiny_tokenizer`: tiny random models in the real layouts.
- `verify.verify` / `verify.embed`: ours against the PyTorch references; embeddings for other tools.

transformers is used for tokenizers and config files; torch, open_clip and diffusers only by
`verify` (and torch to read `.pt` / `.bin` pickles).
"""
