"""The paper-scale network in Restormer's layout, for released Restormer checkpoints.

Restormer's sizes (width 48, blocks 4/6/6/8, 4 refinement blocks, heads 1/2/4/8, FFN 2.66), its
layout (level-1 decoder, refinement and output at 2C) and its bias-free patch embedding and output
conv. Its deraining/deblurring models use LayerNorm "WithBias" (the default here); its denoising
models use "BiasFree": add --config.model.layernorm=bias_free.
Run: lmdir import restormer deraining.pth --config restormer --output runs/restormer-derain
"""

from lmdir_jax.config import base_config


def get_config():
    c = base_config()
    c.name = "restormer"
    c.data.patch_size = 128
    c.data.batch_size = 8
    c.model.width = 48
    c.model.blocks = (4, 6, 6, 8)
    c.model.refinement_blocks = 4
    c.model.heads = (1, 2, 4, 8)
    c.model.ffn_expansion = 2.66
    c.model.text_dim = 512
    c.model.prompt_dim = 128
    c.model.num_deg_queries = 8
    c.model.num_content_queries = 8
    c.model.ref_tokens = 64
    c.priors.max_text_len = 77
    c.priors.ref_size = 128
    c.train.lr = 3e-5  # fine-tuning from Restormer's weights
    c.model.layout = "restormer"
    c.model.layernorm = "with_bias"
    c.model.embed_bias = False
    c.model.output_bias = False
    c.model.dtype = "float32"
    return c
