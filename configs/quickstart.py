"""Quick-start config: multi-task restoration trained on the scikit-image sample photos on a CPU.

Run: lmdir train --config configs/quickstart.py --workdir runs/quickstart
(./scripts/quickstart.sh does this with tiny random priors from `lmdir priors make-tiny`.)
"""

from lmdir_jax.config import base_config


def get_config():
    c = base_config()
    c.name = "quickstart"
    c.data.source = "skimage"
    c.data.patch_size = 64
    c.data.batch_size = 8
    c.model.width = 16
    c.model.blocks = (1, 2, 2, 2)
    c.model.refinement_blocks = 1
    c.model.heads = (1, 2, 4, 8)
    c.model.text_dim = 32
    c.model.prompt_dim = 32
    c.train.steps = 600
    c.train.lr = 1e-3
    c.train.warmup_steps = 30
    c.train.ckpt_every = 100
    c.train.val_every = 200
    c.train.plot_every = 100
    return c
