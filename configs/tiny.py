"""Tiny config for tests: < 100 k parameters, 32-pixel patches, a few steps.

Run: lmdir train --config configs/tiny.py --workdir /tmp/lmdir-tiny
"""

from lmdir_jax.config import base_config


def get_config():
    c = base_config()
    c.name = "tiny"
    c.data.patch_size = 32
    c.data.batch_size = 8
    c.model.width = 4
    c.model.blocks = (1, 1, 1, 1)
    c.model.refinement_blocks = 1
    c.model.heads = (1, 1, 2, 2)
    c.model.text_dim = 32
    c.model.prompt_dim = 16
    c.model.num_deg_queries = 2
    c.model.num_content_queries = 2
    c.model.prompt_heads = 2
    c.model.ref_tokens = 4
    c.model.ref_dim = 8
    c.priors.max_text_len = 16
    c.priors.ref_size = 32
    c.train.steps = 4
    c.train.warmup_steps = 1
    c.train.log_every = 1
    c.train.ckpt_every = 2
    c.train.val_every = 0
    c.train.plot_every = 0
    return c
