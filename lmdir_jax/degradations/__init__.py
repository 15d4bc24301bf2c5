"""lmdir_jax.degradations"""
