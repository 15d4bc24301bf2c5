"""lmdir_jax.models"""
