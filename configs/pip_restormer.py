"""PIP (Li et al. 2023, "Prompt-In-Prompt Learning for Universal Image Restoration") on the
Restormer backbone, trained on the three-task protocol (configs/three_task.py's data and schedule).

The network is configs/restormer.py's Restormer (width 48, blocks 4/6/6/8, 4 refinement blocks,
heads 1/2/4/8, FFN 2.66, Restormer layout, bias-free convs) with `model.prompt_module = "pip"`:
the LMDIR prompt encoder, DATB and CATB are off and PIP's prompt-in-prompt module sits on the three
decoder skips with PIP's released dims (prompt widths 64/128/256 and basic prompt sizes 64/32/16
for levels 1/2/3, top-k prompt-to-feature attention with the level-3 heads (4), prompt-to-prompt
attention with 2 heads) and its orthogonality regulariser (`train.pip_orthogonality`). See
docs/pip.md.
"""

from lmdir_jax.config import load_config


def get_config():
    """PIP-Restormer on the three-task data.

    Run: lmdir train --config configs/pip_restormer.py --workdir runs/pip_restormer \\
             --config.data.root=DIR
         lmdir evaluate --protocol three-task --root DIR --checkpoint runs/pip_restormer
    """
    c = load_config("three_task")
    restormer = load_config("restormer")
    c.name = "pip_restormer"
    c.model = restormer.model
    c.priors.max_text_len = restormer.priors.max_text_len
    c.priors.ref_size = restormer.priors.ref_size
    c.model.prompt_module = "pip"
    c.model.catb_levels = ()
    c.model.rtb_levels = ()
    c.model.pip_kinds = 8
    c.model.pip_prompt_dims = (64, 128, 256)
    c.model.pip_prompt_sizes = (64, 32, 16)
    c.model.pip_heads = 4
    c.model.pip_prompt_heads = 2
    c.train.pip_orthogonality = 2e-5  # PIP: 0.002 x (0.01 x the cosine loss)
    return c
