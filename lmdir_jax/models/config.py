"""Defaults of the `model` config section (owned by lmdir_jax/models)."""

import ml_collections


def default_config() -> ml_collections.ConfigDict:
    """LMDIR network size; the paper-scale numbers are in configs/paper.py."""
    c = ml_collections.ConfigDict()
    c.width = 16
    c.blocks = (1, 1, 1, 1)  # transformer blocks per U-Net level (level 1 = full resolution)
    c.refinement_blocks = 1
    c.heads = (1, 2, 4, 8)
    c.ffn_expansion = 2.66
    c.text_dim = 32  # width of the CLIP text states fed to the prompt encoder
    c.prompt_dim = 32  # width of the query-based prompt encoder
    c.prompt_heads = 4  # heads of the prompt encoder's attention (prompt_dim % prompt_heads == 0)
    c.num_deg_queries = 4
    c.num_content_queries = 4
    # Prompt module: "lmdir" (the query prompt encoder feeding DATB and CATB), "pip" (PIP's
    # prompt-in-prompt on the decoder skips, docs/pip.md) or "none".
    c.prompt_module = "lmdir"
    c.pip_kinds = 8  # T degradation-aware prompts: one per kind of degradations.label.KINDS
    c.pip_prompt_dims = (16, 32, 64)  # PIP prompt width per skip level 1, 2, 3
    c.pip_prompt_sizes = (16, 8, 4)  # side of the basic restoration prompt per level 1, 2, 3
    c.pip_heads = 4  # heads of the top-k prompt-to-feature attention (PIP: the level-3 heads)
    c.pip_prompt_heads = 2  # heads of the prompt-to-prompt attention
    c.catb_levels = (3, 4)  # levels (1..4) whose blocks get content cross-attention
    c.rtb_levels = (3, 4)  # levels whose blocks get reference cross-attention
    c.ref_tokens = 16  # reference tokens after pooling to a sqrt x sqrt grid (a perfect square)
    c.ref_dim = 32  # width of the reference encoder and its tokens
    c.zero_init_output = True  # residual output conv starts at zero: the untrained model is identity
    c.dtype = "float32"  # compute dtype: float32 or bfloat16
    # "lmdir": level-1 decoder, refinement and output at width C after a 1x1 reduce conv;
    # "restormer": they run at 2C without the reduce conv (Restormer's layout, for its checkpoints).
    c.layout = "lmdir"
    c.layernorm = "with_bias"  # backbone block LayerNorm: "with_bias" or "bias_free" (Restormer)
    c.embed_bias = True  # bias of the 3x3 patch-embedding conv (Restormer: False)
    c.output_bias = True  # bias of the 3x3 output conv (Restormer: False)
    # Kernels: "xla" (lax convolutions and products), "cpu" (the XLA:CPU forms of
    # models/backend_cpu.py), "auto" ("cpu" on CPUs, else "xla"); set by models/backend.py. The
    # parameters a seed draws do not depend on it.
    c.kernels = "auto"
    # Each level's blocks as one nnx.scan over stacked parameters (compile time independent of
    # depth); False: a Python loop over blocks/0, blocks/1, ... (models/stacking.py converts).
    c.scan_blocks = True
    # How scanned blocks compile (the parameters are the same): "loop" (one block, compile time
    # independent of depth), "unrolled" (faster steps on XLA:CPU, longer compile), "auto"
    # ("unrolled" on CPUs, else "loop"). models/backend.py.
    c.scan_unroll = "auto"
    c.remat = "none"  # "block": recompute each block's activations in the backward pass
    return c
