"""lmdir_jax.priors"""
