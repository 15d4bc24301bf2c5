"""Quick-start config: multi-task restoration trained on the scikit-image sample photos on a CPU.

Run: lmdir train --config configs/quickstart.py --workdir runs/quickstart
(./scripts/quickstart.sh does this with tiny random priors from `lmdir priors make-tiny` and a
controller trained first, adding --config.priors.controller=DIR --config.priors.auto_ratio=0.25:
a quarter of the examples are told the controller's choice, as the automatic mode tells it.)

Sized for a 2-core CPU: 1500 steps in about 5 minutes, the whole quick start in under 10
(docs/benchmarks.md).
Multi-task: noise, rain, haze, blur, low light and JPEG, alone or mixed. The PSNR loss weighs every
example by its relative error, so the mild tasks (noise, rain) are learnt beside the ones with large
absolute errors (haze, low light): with L1 the same run learns little but haze and low light.
"""

from lmdir_jax.config import base_config


def get_config():
    c = base_config()
    c.name = "quickstart"
    c.data.source = "skimage"
    c.data.patch_size = 48
    c.data.batch_size = 8
    # The evaluated tasks (CBSD68 noise, Rain100L rain) weigh more; no down-sampling or snow here.
    c.data.tasks.update(dict(noise=3.0, rain=2.0, haze=1.0, blur=1.0, jpeg=1.0, lowlight=0.5,
                             downsample=0.0, snow=0.0))
    c.data.mix_prob = 0.2
    c.model.width = 8
    c.model.blocks = (1, 1, 1, 1)
    c.model.ref_dim = 16
    c.model.refinement_blocks = 1
    # One block per level: scanning saves no compile time here. The README's numbers are from this
    # unscanned layout.
    c.model.scan_blocks = False
    c.model.heads = (1, 2, 4, 8)
    c.model.text_dim = 32
    c.model.prompt_dim = 32
    # Blind restoration matters here: the quick start's CLIP is a tiny random one.
    c.priors.drop_degradation = 0.3
    c.train.steps = 1500
    c.train.lr = 2e-3
    c.train.loss = "psnr"
    c.train.warmup_steps = 20
    c.train.ckpt_every = 250
    c.train.val_every = 0  # the quick start evaluates after training instead
    c.train.plot_every = 250
    return c
