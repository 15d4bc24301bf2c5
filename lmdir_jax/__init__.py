"""lmdir-jax: all-in-one image restoration guided by frozen large-model priors (JAX/Flax NNX)."""

__version__ = "0.1.0"
