"""The LMDIR network: a 4-level Restormer-style U-Net of DATB/CATB/RTB blocks guided by priors.

Level l (1..4) has width C * 2**(l-1) and heads[l-1]; level 4 is the latent (bottleneck).

    x = pad(lq)                        reflect-pad H, W at the bottom/right to a multiple of 8
    deg, content = prompt(priors);     cond.deg_pooled = mean(deg, axis=1)
    ref = reference(priors.reference, priors.has_reference)
    e1 = encoders[0](embed(x))                       embed: 3x3 conv 3 -> C
    e2 = encoders[1](downs[0](e1))                   down: 3x3 conv Cl -> Cl/2 (no bias),
    e3 = encoders[2](downs[1](e2))                         then pixel-unshuffle(2) -> 2*Cl
    z  = latent(downs[2](e3))
    d3 = decoders[0](reduces[0](concat(ups[0](z), e3)))   up: 3x3 conv Cl -> 2*Cl (no bias),
    d2 = decoders[1](reduces[1](concat(ups[1](d3), e2)))      then pixel-shuffle(2) -> Cl/2
    d1 = decoders[2](reduces[2](concat(ups[2](d2), e1)))  reduce: 1x1 conv 2*Cl -> Cl (no bias)
    y  = output(refinement(d1))                      output: 3x3 conv C -> 3 (bias)
    restored = crop(x + y)                           float32

Blocks on levels in `catb_levels` get CATB content cross-attention, on `rtb_levels` RTB reference
cross-attention (refinement blocks count as level 1).

`model.prompt_module` picks the prompt module: "lmdir" is the prompt encoder above (DATB, CATB);
"pip" drops it (blocks unmodulated, no CATB) and runs PIP's prompt-in-prompt on each decoder
skip before the concatenation, `skip = skip_prompts[i](skip, priors.deg_weights)` (models/pip.py);
"none" has neither.

`model.layout = "restormer"` is Restormer's layout: there is no reduces[2], and decoders[2],
refinement and output run at 2C on concat(ups[2](d2), e1). With `layernorm = "bias_free"`,
`embed_bias = output_bias = False` and the conditioning at zero it is exactly Restormer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from lmdir_jax import architecture
from lmdir_jax.architecture import MULTIPLE
from lmdir_jax.models.backend import kernels_of, resolve_scan_unroll, select_kernels
from lmdir_jax.models.blocks import BlockStack, remat_policy
from lmdir_jax.models.conditioning import Conditions
from lmdir_jax.models.initializers import lecun_normal
from lmdir_jax.models.layers import compute_dtype, conv, pixel_shuffle, pixel_unshuffle
from lmdir_jax.models.pip import PromptInPrompt
from lmdir_jax.models.priors import Priors
from lmdir_jax.models.prompt import PromptEncoder
from lmdir_jax.models.reference import ReferenceEncoder

__all__ = ["LMDIR", "MULTIPLE", "build_model"]


class Downsample(nnx.Module):
    """3x3 conv Cl -> Cl/2 (no bias), then pixel-unshuffle(2): (B,H,W,Cl) -> (B,H/2,W/2,2Cl)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.conv = conv(dim, dim // 2, 3, use_bias=False, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Halve the resolution, double the width."""
        return pixel_unshuffle(self.conv(x), 2)


class Upsample(nnx.Module):
    """3x3 conv Cl -> 2Cl (no bias), then pixel-shuffle(2): (B,H,W,Cl) -> (B,2H,2W,Cl/2)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.conv = conv(dim, dim * 2, 3, use_bias=False, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Double the resolution, halve the width."""
        return pixel_shuffle(self.conv(x), 2)


class LMDIR(nnx.Module):
    """The LMDIR restoration network (module docstring); params float32, compute in config.dtype.

    Top-level components: embed, encoders, downs, latent, ups, reduces, decoders, refinement,
    output, prompt (prompt_module "lmdir", else None), skip_prompts (prompt_module "pip": one
    PromptInPrompt per decoder skip, levels 3, 2, 1; else None), reference.
    """

    def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        c = config
        stages = {st.name: st for st in architecture.stages(c)}
        dtype = compute_dtype(c.dtype)
        self.dtype = dtype
        self.text_dim = int(c.text_dim)
        width = int(c.width)
        widths = architecture.level_widths(c)
        layout, top = architecture.layout(c), architecture.top_width(c)
        # Keys missing from an old run's config.json: that run's layout (unscanned, no remat).
        scan, remat = bool(c.get("scan_blocks", False)), str(c.get("remat", "none"))
        remat_policy(remat)
        unroll = resolve_scan_unroll(str(c.get("scan_unroll", "auto")))
        self.prompt_module = architecture.prompt_module(c)
        self.num_kinds = int(c.get("pip_kinds", 0))

        def stack(name: str) -> BlockStack:
            st = stages[name]
            return BlockStack(
                st.blocks,
                scan=scan,
                remat=remat,
                unroll=unroll,
                dim=st.width,
                heads=st.heads,
                expansion=float(c.ffn_expansion),
                prompt_dim=int(c.prompt_dim),
                ref_dim=int(c.ref_dim),
                catb=st.catb,
                rtb=st.rtb,
                rngs=rngs,
                dtype=dtype,
                layernorm=str(c.get("layernorm", "with_bias")),
                modulated=self.prompt_module == "lmdir",
            )

        # eager_sharding off: parameters are created unsharded and only carry logical axis names;
        # the training code creates them in place on its mesh (train/state.py, `train.axis_rules`).
        with nnx.use_eager_sharding(False):
            self.prompt = PromptEncoder(
                int(c.text_dim), int(c.prompt_dim), int(c.prompt_heads),
                int(c.num_deg_queries), int(c.num_content_queries), rngs=rngs, dtype=dtype,
            ) if self.prompt_module == "lmdir" else None
            self.reference = ReferenceEncoder(int(c.ref_dim), int(c.ref_tokens), rngs=rngs,
                                              dtype=dtype)
            self.embed = conv(3, width, 3, use_bias=bool(c.get("embed_bias", True)), rngs=rngs,
                              dtype=dtype)
            self.encoders = nnx.List([stack(f"encoders.{i}") for i in range(3)])
            self.downs = nnx.List([Downsample(widths[i], rngs=rngs, dtype=dtype) for i in range(3)])
            self.latent = stack("latent")
            self.ups = nnx.List([Upsample(widths[i], rngs=rngs, dtype=dtype) for i in (3, 2, 1)])
            self.reduces = nnx.List(
                [conv(2 * widths[i], widths[i], 1, use_bias=False, rngs=rngs, dtype=dtype)
                 for i in ((2, 1) if layout == "restormer" else (2, 1, 0))]
            )
            self.decoders = nnx.List([stack(f"decoders.{k}") for k in range(3)])
            self.refinement = stack("refinement")
            self.skip_prompts = nnx.List([
                PromptInPrompt(widths[lvl - 1], int(c.pip_prompt_dims[lvl - 1]),
                               int(c.pip_prompt_sizes[lvl - 1]), self.num_kinds,
                               heads=int(c.pip_heads), prompt_heads=int(c.pip_prompt_heads),
                               expansion=float(c.ffn_expansion), rngs=rngs, dtype=dtype)
                for lvl in (3, 2, 1)
            ]) if self.prompt_module == "pip" else None
            out_init = (nnx.initializers.zeros_init() if c.zero_init_output
                        else lecun_normal)
            self.output = conv(top, 3, 3, use_bias=bool(c.get("output_bias", True)), rngs=rngs,
                               dtype=dtype, kernel_init=out_init)
        select_kernels(self, kernels_of(c))  # the one backend choice (models/backend.py)

    def conditions(self, priors: Priors) -> Conditions:
        """Run the prompt and reference encoders once per batch."""
        b = priors.has_reference.shape[0]
        if self.prompt is None:  # unmodulated blocks without CATB: nothing reads these
            deg_pooled, content = jnp.zeros((b, 1), self.dtype), jnp.zeros((b, 1, 1), self.dtype)
        else:
            deg, content = self.prompt(priors)
            deg_pooled = jnp.mean(deg, axis=1)
        ref = self.reference(priors.reference, priors.has_reference)
        return Conditions(
            deg_pooled=deg_pooled,
            content=content,
            ref_tokens=ref,
            has_reference=priors.has_reference.astype(bool),
        )

    def __call__(self, lq: jax.Array, priors: Priors) -> jax.Array:
        """Restore lq (B, H, W, 3) in [0, 1] (any H, W) given the priors; float32 output."""
        if lq.ndim != 4 or lq.shape[-1] != 3:
            raise ValueError(f"lq must be (B, H, W, 3), got {lq.shape}")
        b, h, w, _ = lq.shape
        ph, pw = architecture.padding(h, w)
        lq32 = lq.astype(jnp.float32)
        x_in = jnp.pad(lq32, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="reflect")
        cond = self.conditions(priors)

        x = self.embed(x_in.astype(self.dtype))
        skips = []
        for enc, down in zip(self.encoders, self.downs, strict=True):
            x = enc(x, cond)
            skips.append(x)
            x = down(x)
        x = self.latent(x, cond)
        for i, (up, dec, skip) in enumerate(zip(self.ups, self.decoders, skips[::-1],
                                                strict=True)):
            if self.skip_prompts is not None:
                skip = self.skip_prompts[i](skip, self.degradation_weights(priors))
            x = jnp.concatenate([up(x), skip], axis=-1)
            if i < len(self.reduces):  # the restormer layout has no level-1 reduce
                x = self.reduces[i](x)
            x = dec(x, cond)
        x = self.refinement(x, cond)
        restored = x_in + self.output(x).astype(jnp.float32)
        return restored[:, :h, :w, :]


    def degradation_weights(self, priors: Priors) -> jax.Array:
        """PIP's (B, T) prompt weights: `priors.deg_weights`, zeros when absent (unknown)."""
        if priors.deg_weights is None:
            return jnp.zeros((priors.has_reference.shape[0], self.num_kinds), jnp.float32)
        if priors.deg_weights.shape[-1] != self.num_kinds:
            raise ValueError(f"deg_weights has {priors.deg_weights.shape[-1]} kinds, the model "
                             f"{self.num_kinds} (model.pip_kinds)")
        return priors.deg_weights

    def regulariser(self) -> jax.Array:
        """PIP's orthogonality regulariser summed over the skip levels (0 without PIP)."""
        if self.skip_prompts is None:
            return jnp.zeros((), jnp.float32)
        return sum(p.regulariser() for p in self.skip_prompts)


def build_model(config_model: ml_collections.ConfigDict, seed: int) -> LMDIR:
    """A freshly initialised LMDIR from the `model` config section and an integer seed."""
    return LMDIR(config_model, rngs=nnx.Rngs(seed))
