"""The LMDIR architecture's constants and level table, importable with the standard library only.

The Flax network (`lmdir_jax.models`) and its PyTorch mirror (`lmdir_jax.export.torch_model`) both
read these, so the two cannot drift apart. `stages(model_config)` accepts the `model` config section
as an ml_collections ConfigDict or as the plain dict of an export's config.json.
"""

from __future__ import annotations

import dataclasses
from typing import Any

MULTIPLE = 8  # inputs are reflect-padded to a multiple of 8: three 2x down-samplings
LN_EPS = 1e-5  # every LayerNorm (two-pass variance, with scale and bias)
L2_EPS = 1e-12  # MDTA's L2 normalisation of q and k (as torch.nn.functional.normalize)
MASKED_LOGIT = -1e9  # attention logit of a masked key
MLP_EXPANSION = 2  # hidden width of the prompt encoder's MLP, in multiples of prompt_dim
NUM_LEVELS = 4  # U-Net levels; level 4 is the latent (bottleneck)


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stack of transformer blocks: where its parameters live and what its blocks are.

    name:   parameter path of the stack ("encoders.0", "latent", "decoders.2", "refinement").
    level:  U-Net level 1..4 (refinement counts as level 1).
    width:  channels C_l = width * 2**(level-1).
    heads:  MDTA and cross-attention heads.
    blocks: number of blocks.
    catb, rtb: whether the blocks have content / reference cross-attention.
    """

    name: str
    level: int
    width: int
    heads: int
    blocks: int
    catb: bool
    rtb: bool


def level_widths(model_config: Any) -> list[int]:
    """Channels per level: [C, 2C, 4C, 8C] for `model.width` C."""
    width = int(model_config["width"])
    return [width * 2**i for i in range(NUM_LEVELS)]


LAYOUTS = ("lmdir", "restormer")


def layout(model_config: Any) -> str:
    """`model.layout`: "lmdir" (level-1 decoder, refinement and output at C after a 1x1 reduce)
    or "restormer" (they run at 2C without that reduce). Raises ValueError for anything else."""
    c = model_config
    name = str(c["layout"]) if "layout" in c else "lmdir"
    if name not in LAYOUTS:
        raise ValueError(f"model.layout must be 'lmdir' or 'restormer', got {name!r}")
    return name


PROMPT_MODULES = ("lmdir", "pip", "none")
PIP_TOPK = ((1, 2), (2, 3), (3, 4), (4, 5))  # PIP's top-k fractions k/C of the skip attention


def prompt_module(model_config: Any) -> str:
    """`model.prompt_module`: "lmdir" (query prompt encoder feeding DATB/CATB), "pip" (PIP's
    prompt-in-prompt on the decoder skips) or "none". Raises ValueError for anything else."""
    c = model_config
    name = str(c["prompt_module"]) if "prompt_module" in c else "lmdir"
    if name not in PROMPT_MODULES:
        raise ValueError(f"model.prompt_module must be one of {', '.join(PROMPT_MODULES)}, "
                         f"got {name!r}")
    return name


def pip_topk(channels: int) -> tuple[int, ...]:
    """The k of PIP's four top-k attentions over `channels` keys: int(C/2), int(2C/3), int(3C/4),
    int(4C/5) (each at least 1)."""
    return tuple(max(1, channels * a // b) for a, b in PIP_TOPK)


def top_width(model_config: Any) -> int:
    """Channels of the level-1 decoder, the refinement and the output conv's input."""
    width = int(model_config["width"])
    return 2 * width if layout(model_config) == "restormer" else width


def stages(model_config: Any) -> list[Stage]:
    """The block stacks in forward order: encoders 0-2 (levels 1-3), latent (4), decoders 0-2
    (levels 3, 2, 1), refinement (level 1). Raises ValueError for a malformed level table."""
    c = model_config
    blocks, heads = tuple(c["blocks"]), tuple(c["heads"])
    if len(blocks) != NUM_LEVELS or len(heads) != NUM_LEVELS:
        raise ValueError("model.blocks and model.heads need 4 entries (one per U-Net level)")
    widths = level_widths(c)
    catb, rtb = {int(v) for v in c["catb_levels"]}, {int(v) for v in c["rtb_levels"]}
    if prompt_module(c) != "lmdir":  # content prompts come from the LMDIR prompt encoder only
        catb = set()
    named = ([(f"encoders.{i}", i + 1, int(blocks[i])) for i in range(3)]
             + [("latent", 4, int(blocks[3]))]
             + [(f"decoders.{k}", lvl, int(blocks[lvl - 1])) for k, lvl in enumerate((3, 2, 1))]
             + [("refinement", 1, int(c["refinement_blocks"]))])
    top = {"decoders.2", "refinement"}  # at top_width: 2C in the restormer layout
    return [Stage(name, lvl, top_width(c) if name in top else widths[lvl - 1],
                  int(heads[lvl - 1]), n, lvl in catb, lvl in rtb)
            for name, lvl, n in named]


def ffn_hidden(dim: int, expansion: float) -> int:
    """GDFN hidden width: int(dim * ffn_expansion) (Restormer's rounding down)."""
    return int(dim * expansion)


def padding(height: int, width: int) -> tuple[int, int]:
    """Rows and columns of bottom/right reflect padding that make (height, width) multiples of 8."""
    return (-height) % MULTIPLE, (-width) % MULTIPLE
