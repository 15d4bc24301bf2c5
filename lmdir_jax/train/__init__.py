"""lmdir_jax.train"""
