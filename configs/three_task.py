"""Three-task all-in-one protocol (noise + rain + haze) on PromptIR's data layout.

Run: lmdir data check --config configs/three_task.py --config.data.root=DIR
     lmdir train --config configs/three_task.py --workdir runs/three_task --config.data.root=DIR
     lmdir evaluate --protocol three-task --root DIR --checkpoint runs/three_task

DIR is PromptIR's data folder as it ships (github.com/va1shn9v/PromptIR, INSTALL.md), with `test/`
beside `Train/` (see docs/datasets.md):
  Train/Denoise/*                     clean BSD400 + WED photos, noised on the fly (sigma 15/25/50)
  Train/Derain/{rainy,gt}             Rain100L train: rainy/rain-N.png <-> gt/norain-N.png
  Train/Dehaze/{synthetic,original}   RESIDE OTS: synthetic/part*/NNNN_A_B.jpg <-> original/NNNN.jpg
  test/denoise/bsd68, test/derain/Rain100L/{input,target}, test/dehaze/{input,target}

Hyper-parameters follow PromptIR's released training code (options.py, train.py, utils/dataset_utils.py):
- patch 128, batch 8 per GPU on 4 GPUs (`--batch_size 8`, `--num_gpus 4`) = global batch 32;
- AdamW at lr 2e-4, linear warm-up for 15 epochs, cosine annealing (PromptIR sets max_epochs=150
  but stops at epoch 120, so its lr ends near 12% of the peak: min_lr_ratio 0.12 here);
- 120 epochs; one epoch = every clean photo 3x at each sigma (5144 x 9 = 46,296), the 200 rainy
  pairs 120x (24,000) and the OTS list once (about 72,100): about 142,400 patches = 4,450 steps of
  32, so 120 epochs = 534,000 steps and the warm-up 66,750 steps;
- source weights in the same proportion as one PromptIR epoch (46.3 : 24.0 : 72.1).
The network is configs/paper.py (PromptIR-scale width 48, blocks 4/6/6/8).
"""

from lmdir_jax.config import load_config
from lmdir_jax.data.config import source_config

STEPS_PER_EPOCH = 4_450


def get_config():
    c = load_config("paper")
    c.name = "three_task"
    c.data.root = "data"
    c.data.protocol = "three-task"
    c.data.patch_size = 128
    c.data.batch_size = 32
    c.data.sources.denoise = source_config(
        "Train/Denoise", 46.3, specs=("noise:15", "noise:25", "noise:50")
    )
    c.data.sources.derain = source_config("Train/Derain", 24.0, text="rain streaks",
                                          degraded_dir="rainy", clean_dir="gt")
    c.data.sources.dehaze = source_config("Train/Dehaze", 72.1, text="haze",
                                          degraded_dir="synthetic", clean_dir="original")
    c.train.lr = 2e-4
    c.train.steps = 120 * STEPS_PER_EPOCH
    c.train.warmup_steps = 15 * STEPS_PER_EPOCH
    c.train.min_lr_ratio = 0.12
    c.train.loss = "l1"
    return c
