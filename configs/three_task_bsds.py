"""Three-task protocol (noise + rain + haze) on a folder of clean photos: the 2-core CPU-budget run.

Run: lmdir priors build --data ../shared/data/train/bsds --clip CLIP --sd SD --output runs/cache-bsds
     lmdir train --config configs/three_task_bsds.py --workdir runs/three_task_bsds \
       --config.train.steps=7000 --config.priors.clip=CLIP --config.priors.cache=runs/cache-bsds
(CLIP and SD: real weights or `lmdir priors make-tiny DIR`'s DIR/clip and DIR/sd.)

Like configs/three_task.py, but every task is synthesised on the fly from one folder of clean photos
(the BSDS500 training photos beside the repo, `../shared/data/train/bsds`): a denoising source with
sigma 15/25/50, and the same photos with synthetic rain and with synthetic haze. docs/benchmarks.md
("Three tasks on one CPU") has the commands of its CPU-budget run: 7000 steps (sized for about an
hour on 2 CPU cores), then evaluation on CBSD68 sigma 15/25/50, Rain100L and the SOTS-outdoor
sample. The network is a little wider than the quick start's (width 16, blocks 1/1/1/2); the PSNR loss weighs
each example by its relative error so that the mild noise and rain are learnt beside haze
(docs/training.md).
"""

from lmdir_jax.config import base_config
from lmdir_jax.data.config import source_config


def get_config():
    c = base_config()
    c.name = "three_task_bsds"
    c.data.root = "../shared/data/train/bsds"
    c.data.patch_size = 64
    c.data.batch_size = 8
    c.data.num_workers = 2
    c.data.mix_prob = 0.0
    c.data.sources.denoise = source_config(".", 2.0, specs=("noise:15", "noise:25", "noise:50"))
    c.data.sources.derain = source_config(".", 1.5, tasks={"rain": 1.0})
    c.data.sources.dehaze = source_config(".", 1.0, tasks={"haze": 1.0})
    c.model.width = 16
    c.model.blocks = (1, 1, 1, 2)
    c.model.refinement_blocks = 1
    c.model.scan_blocks = False
    c.model.heads = (1, 2, 4, 8)
    c.model.ref_dim = 16
    c.model.text_dim = 32
    c.model.prompt_dim = 32
    # Evaluated blind (the protocol), so half of the examples train without their degradation
    # text: at 0.3 the network dehazed only when told (SOTS sample blind 18.33 dB, told 28.65).
    c.priors.drop_degradation = 0.5
    c.train.steps = 7000  # about an hour on 2 CPU cores (468 ms per step in `lmdir bench train`)
    c.train.lr = 2e-3
    c.train.min_lr_ratio = 0.05
    c.train.loss = "psnr"
    c.train.warmup_steps = 100
    c.train.ckpt_every = 1000
    c.train.val_every = 0
    c.train.plot_every = 1000
    return c
