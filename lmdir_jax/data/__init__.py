"""lmdir_jax.data"""
