"""Parameter counts per component and compiled FLOPs of an LMDIR network."""

from __future__ import annotations

from collections import OrderedDict

import jax
import jax.numpy as jnp
from flax import nnx

from lmdir_jax.models.lmdir import LMDIR
from lmdir_jax.models.priors import Priors

BACKBONE = ("embed", "encoders", "downs", "latent", "ups", "reduces", "decoders", "refinement",
            "output")
EXTRAS = {"modulation": "DATB modulation", "content_attn": "CATB cross-attention",
          "ref_attn": "RTB cross-attention"}

PIP = {"prompt": "PIP prompts", "to_feature": "PIP prompt-to-feature"}


def count_params(model: nnx.Module) -> OrderedDict[str, int]:
    """Parameter counts: backbone (without conditioning), prompt encoder, DATB/CATB/RTB extras,
    PIP's prompts and interactions (only with model.prompt_module "pip"), reference encoder, total.
    """
    counts: OrderedDict[str, int] = OrderedDict(
        [("backbone", 0), ("prompt encoder", 0), *[(v, 0) for v in EXTRAS.values()],
         ("reference encoder", 0), ("total", 0)]
    )
    if getattr(model, "skip_prompts", None) is not None:
        counts = OrderedDict([*list(counts.items())[:-2], *[(v, 0) for v in PIP.values()],
                              *list(counts.items())[-2:]])
    for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        n = int(leaf.get_value().size)
        names = [str(p) for p in path]
        extra = next((EXTRAS[p] for p in names if p in EXTRAS), None)
        if names[0] == "skip_prompts":
            key = next((PIP[p] for p in names if p in PIP), PIP["prompt"])
        elif names[0] == "prompt":
            key = "prompt encoder"
        elif names[0] == "reference":
            key = "reference encoder"
        elif extra is not None:
            key = extra
        elif names[0] in BACKBONE:
            key = "backbone"
        else:
            raise ValueError(f"unclassified parameter {'/'.join(names)}")
        counts[key] += n
        counts["total"] += n
    return counts


def example_priors(config_model, batch: int, text_len: int = 8, ref_size: int = 64) -> Priors:
    """Priors with every prior present (random values), for cost measurements."""
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    d = int(config_model.text_dim)
    return Priors(
        deg_states=jax.random.normal(k1, (batch, text_len, d)),
        deg_mask=jnp.ones((batch, text_len), bool),
        scene_states=jax.random.normal(k2, (batch, text_len, d)),
        scene_mask=jnp.ones((batch, text_len), bool),
        reference=jax.random.uniform(k3, (batch, ref_size, ref_size, 3)),
        has_reference=jnp.ones((batch,), bool),
    )


def forward_flops(model: LMDIR, priors: Priors, size: int) -> float:
    """FLOPs of one forward pass at size x size, from XLA's cost analysis of the lowered program."""
    b = priors.has_reference.shape[0]
    lq = jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32)

    @jax.jit
    def fwd(m, x, p):
        return m(x, p)

    cost = fwd.lower(model, lq, priors).cost_analysis()  # as written (no compile)
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))
