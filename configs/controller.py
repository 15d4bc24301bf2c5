"""DA-CLIP degradation controller for the quick start's tiny CLIP (32-pixel input).

Run: lmdir priors train-controller --clip runs/priors/clip --config configs/controller.py \
         --workdir runs/controller
Patches of 48 pixels are degraded by the grain pipeline; one 32-pixel crop of each (native
resolution, CLIP's input size) is what the controller sees. For a ViT-B/32 CLIP (224-pixel input)
set --config.data.patch_size=256 and a smaller batch (docs/priors.md).
"""

from lmdir_jax.config import base_config


def get_config():
    c = base_config()
    c.name = "controller"
    c.data.source = "skimage"
    c.data.patch_size = 48
    c.data.batch_size = 64
    c.data.tasks.update(dict(noise=1.0, rain=1.0, haze=1.0, blur=1.0, jpeg=1.0, lowlight=1.0,
                             downsample=1.0, snow=0.0))
    c.data.mix_prob = 0.2
    c.data.max_kinds = 2
    c.priors.max_text_len = 16
    c.train.steps = 400
    c.train.lr = 2e-3
    c.train.warmup_steps = 20
    c.train.weight_decay = 1e-4
    c.train.log_every = 20
    c.train.ckpt_every = 100
    c.train.val_every = 0
    c.train.plot_every = 0
    return c
