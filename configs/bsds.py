"""Train on a folder of clean photographs, e.g. the BSDS500 training images (noise + rain + haze + more).

Run: lmdir train --config configs/bsds.py --workdir runs/bsds \
       --config.data.source=../shared/data/train/bsds
"""

from lmdir_jax.config import base_config


def get_config():
    c = base_config()
    c.name = "bsds"
    c.data.source = "../shared/data/train/bsds"
    c.data.patch_size = 96
    c.data.batch_size = 8
    c.data.num_workers = 2
    c.model.width = 24
    c.model.blocks = (2, 2, 2, 4)
    c.model.refinement_blocks = 2
    c.model.heads = (1, 2, 4, 8)
    c.model.text_dim = 32
    c.model.prompt_dim = 64
    c.train.steps = 20_000
    c.train.lr = 5e-4
    c.train.warmup_steps = 500
    c.train.ema_decay = 0.999
    c.train.ckpt_every = 1000
    c.train.val_every = 1000
    c.train.plot_every = 1000
    return c
