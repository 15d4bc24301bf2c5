"""Quick-start config: multi-task restoration trained on the scikit-image sample photos on a CPU.

Run: lmdir train --config configs/quickstart.py --workdir runs/quickstart
(./scripts/quickstart.sh does this with tiny random priors from `lmdir priors make-tiny`.)
"""

from lmdir_jax.config import base_config


def get_config():
    c = base_config()
    c.name = "quickstart"
    c.data.source = "skimage"
    # Sized for a 2-core CPU: about 1 s per step (see docs/benchmarks.md).
    c.data.patch_size = 48
    c.data.batch_size = 8
    c.model.width = 8
    c.model.blocks = (1, 1, 1, 1)
    c.model.ref_dim = 16
    c.model.refinement_blocks = 1
    c.model.heads = (1, 2, 4, 8)
    c.model.text_dim = 32
    c.model.prompt_dim = 32
    c.train.steps = 360
    c.train.lr = 2e-3
    c.train.warmup_steps = 20
    c.train.ckpt_every = 60
    c.train.val_every = 0  # the quick start evaluates after training instead
    c.train.plot_every = 60
    return c
