"""Paper-scale LMDIR: width 48, blocks 4/6/6/8, 4 refinement blocks, heads 1/2/4/8, FFN 2.66.

Text width 512 (CLIP ViT-B); use --config.model.text_dim=768 with CLIP ViT-L/14.
Run: lmdir train --config configs/paper.py --workdir runs/paper \
       --config.data.source=PATH/TO/CLEAN --config.priors.clip=PATH/TO/CLIP --config.priors.cache=CACHE
"""

from lmdir_jax.config import base_config


def get_config():
    c = base_config()
    c.name = "paper"
    c.data.patch_size = 128
    c.data.batch_size = 32
    c.data.num_workers = 8
    c.model.width = 48
    c.model.blocks = (4, 6, 6, 8)
    c.model.refinement_blocks = 4
    c.model.heads = (1, 2, 4, 8)
    c.model.ffn_expansion = 2.66
    c.model.text_dim = 512
    c.model.prompt_dim = 128
    c.model.num_deg_queries = 8
    c.model.num_content_queries = 8
    c.model.ref_tokens = 64
    c.model.dtype = "bfloat16"
    c.priors.max_text_len = 77
    c.priors.ref_size = 128
    c.train.steps = 300_000
    c.train.lr = 2e-4
    c.train.warmup_steps = 2000
    c.train.ema_decay = 0.999
    c.train.ckpt_every = 5000
    c.train.val_every = 5000
    c.train.plot_every = 5000
    return c
