"""Defaults of the `priors` config section (owned by lmdir_jax/priors)."""

import ml_collections


def default_config() -> ml_collections.ConfigDict:
    """Where the frozen models and the prior cache are, and how priors are used in training."""
    c = ml_collections.ConfigDict()
    c.clip = ""  # local Hugging Face CLIP folder ('' = no CLIP: degradation/scene priors masked)
    c.sd = ""  # local diffusers Stable Diffusion folder (only for `lmdir priors build`)
    c.cache = ""  # prior cache folder built by `lmdir priors build`
    c.max_text_len = 32  # CLIP tokens per text (<= 77)
    c.ref_size = 64  # side of the reference image fed to the network
    # Training: probability of using the automatic (CLIP zero-shot) degradation prior instead of
    # the synthesis label's text (teacher forcing).
    c.auto_ratio = 0.0
    # Training-time prior dropout: each prior is masked with this probability.
    c.drop_degradation = 0.1
    c.drop_scene = 0.1
    c.drop_reference = 0.2
    return c
