"""DA-CLIP degradation controller for the quick start's tiny CLIP (32-pixel input).

Run: lmdir priors train-controller --clip runs/priors/clip --config configs/controller.py \
         --workdir runs/controller
Patches of 48 pixels are degraded by the grain pipeline; 32-pixel crops of them (native
resolution, CLIP's input size, on the 8-pixel JPEG grid) are what the controller sees. Data
echoing: 16 pipeline batches are pooled and each patch serves 16 steps with other crops, so the
4096 steps need 256 batches; under 2 minutes on a 2-core CPU (docs/priors.md). Train on
photos like the ones it will judge: the quick start passes ../shared/data/train/bsds when present.
For a ViT-B/32 CLIP (224-pixel input) set --config.data.patch_size=256, a smaller batch and
--config.priors.controller_echo=1 (docs/priors.md).
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
    c.priors.controller_echo = 16  # 16 x 16 = 256 steps per pool of 16 pipeline batches
    c.priors.controller_content_batch = 16
    c.train.steps = 4096
    c.train.lr = 3e-3
    c.train.warmup_steps = 20
    c.train.weight_decay = 1e-4
    c.train.log_every = 256
    c.train.ckpt_every = 2048
    c.train.val_every = 0
    c.train.plot_every = 0
    return c
