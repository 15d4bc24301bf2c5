"""Five-task all-in-one protocol: three_task.py + GoPro motion blur + LOL low light.

Run: lmdir data check --config configs/five_task.py --config.data.root=DIR
     lmdir train --config configs/five_task.py --workdir runs/five_task --config.data.root=DIR
     lmdir evaluate --protocol five-task --root DIR --checkpoint runs/five_task

DIR holds PromptIR's layout (configs/three_task.py) plus AdaIR's (its INSTALL.md; see
docs/datasets.md):
  Train/Deblur/{blur,sharp}    GoPro train pairs matched by relative path, e.g. blur/GOPR0372_07_00_
                               000047.png <-> sharp/GOPR0372_07_00_000047.png (or input/ + target/)
  Train/Enhance/{low,gt}       LOL v1 our485 (low/N.png <-> gt/N.png; high/ also works)
  test/deblur/gopro/{input,target}   GoPro test
  test/enhance/lol/{input,target}    LOL eval15 (test/lowlight/... also works)

The five-task protocol comes from IDR (Zhang et al., CVPR 2023) and InstructIR (Conde et al.,
ECCV 2024); neither ships a PromptIR-style sampling list. InstructIR subsamples haze to 2,000 OTS
images "to avoid imbalance w.r.t the other tasks" (Sec. 4.1), so the five sources get equal
weights here; the optimisation is three_task.py's (PromptIR's patch 128, batch 32, AdamW 2e-4,
15-epoch warm-up, 120 epochs of 4,450 steps).
"""

from lmdir_jax.config import load_config
from lmdir_jax.data.config import source_config


def get_config():
    c = load_config("three_task")
    c.name = "five_task"
    c.data.protocol = "five-task"
    for name in ("denoise", "derain", "dehaze"):
        c.data.sources[name].weight = 1.0
    c.data.sources.deblur = source_config("Train/Deblur", 1.0, text="motion blur")
    c.data.sources.lowlight = source_config("Train/Enhance", 1.0, text="underexposure")
    return c
