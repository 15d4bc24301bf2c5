"""Query-based prompt encoder: learnable queries read the CLIP text priors.

    deg_tok   = proj_deg(deg_states)          masked by deg_mask
    scene_tok = proj_scene(scene_states)      masked by scene_mask
    qd = deg_queries;      qd = qd + cross_deg(norm_qd(qd), norm_kd(deg_tok), deg_mask)
    qc = content_queries;  qc = qc + cross_scene(norm_qc(qc), norm_ks(scene_tok), scene_mask)
    q = concat(qd, qc);    q = q + self_attn(norm_sa(q), norm_sa(q))
    q = q + mlp_out(gelu(mlp_in(norm_mlp(q))));  q = norm_out(q)
    degradation prompts = q[:, :Nd], content prompts = q[:, Nd:]

A fully-masked prior makes its cross-attention contribute exactly zero, so the prompts then are
functions of the learned queries only; masked token values never reach the output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lmdir_jax.architecture import MLP_EXPANSION
from lmdir_jax.models.attention import MultiHeadAttention
from lmdir_jax.models.initializers import normal
from lmdir_jax.models.layers import gelu, layer_norm, linear
from lmdir_jax.models.priors import Priors


class PromptEncoder(nnx.Module):
    """Text priors -> (degradation prompts (B, Nd, P), content prompts (B, Nc, P)).

    Parameters: deg_queries (Nd, P) and content_queries (Nc, P), init normal(0.02); proj_deg,
    proj_scene (text_dim, P); cross_deg, cross_scene, self_attn: MultiHeadAttention(P, P, heads);
    norms norm_qd, norm_kd, norm_qc, norm_ks, norm_sa, norm_mlp, norm_out (LayerNorm P);
    mlp_in (P, 2P), mlp_out (2P, P).
    """

    def __init__(
        self,
        text_dim: int,
        dim: int,
        heads: int,
        num_deg: int,
        num_content: int,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
    ):
        self.num_deg = num_deg
        self.dtype = dtype
        init = normal(0.02)
        self.deg_queries = nnx.Param(init(rngs.params(), (num_deg, dim), jnp.float32))
        self.content_queries = nnx.Param(init(rngs.params(), (num_content, dim), jnp.float32))
        self.proj_deg = linear(text_dim, dim, rngs=rngs, dtype=dtype)
        self.proj_scene = linear(text_dim, dim, rngs=rngs, dtype=dtype)
        self.norm_qd = layer_norm(dim, rngs=rngs, dtype=dtype)
        self.norm_kd = layer_norm(dim, rngs=rngs, dtype=dtype)
        self.cross_deg = MultiHeadAttention(dim, dim, heads, rngs=rngs, dtype=dtype)
        self.norm_qc = layer_norm(dim, rngs=rngs, dtype=dtype)
        self.norm_ks = layer_norm(dim, rngs=rngs, dtype=dtype)
        self.cross_scene = MultiHeadAttention(dim, dim, heads, rngs=rngs, dtype=dtype)
        self.norm_sa = layer_norm(dim, rngs=rngs, dtype=dtype)
        self.self_attn = MultiHeadAttention(dim, dim, heads, rngs=rngs, dtype=dtype)
        self.norm_mlp = layer_norm(dim, rngs=rngs, dtype=dtype)
        self.mlp_in = linear(dim, MLP_EXPANSION * dim, rngs=rngs, dtype=dtype)
        self.mlp_out = linear(MLP_EXPANSION * dim, dim, rngs=rngs, dtype=dtype)
        self.norm_out = layer_norm(dim, rngs=rngs, dtype=dtype)

    def __call__(self, priors: Priors) -> tuple[jax.Array, jax.Array]:
        """The degradation and content prompts for a batch of priors."""
        b = priors.deg_mask.shape[0]

        def tokens(states, mask, proj, norm):
            states = jnp.where(mask[..., None], states, 0.0).astype(self.dtype)
            return norm(proj(states))

        deg_tok = tokens(priors.deg_states, priors.deg_mask, self.proj_deg, self.norm_kd)
        scene_tok = tokens(priors.scene_states, priors.scene_mask, self.proj_scene, self.norm_ks)
        qd = jnp.broadcast_to(self.deg_queries[...], (b, *self.deg_queries.shape))
        qc = jnp.broadcast_to(self.content_queries[...], (b, *self.content_queries.shape))
        qd = qd + self.cross_deg(self.norm_qd(qd), deg_tok, priors.deg_mask)
        qc = qc + self.cross_scene(self.norm_qc(qc), scene_tok, priors.scene_mask)
        q = jnp.concatenate([qd, qc], axis=1)
        n = self.norm_sa(q)
        q = q + self.self_attn(n, n)
        q = q + self.mlp_out(gelu(self.mlp_in(self.norm_mlp(q))))
        q = self.norm_out(q)
        return q[:, : self.num_deg], q[:, self.num_deg :]
