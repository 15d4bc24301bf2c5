"""lmdir_jax.export"""
