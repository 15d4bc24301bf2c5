"""The `Priors` pytree the network consumes, and training-time prior dropout.

A missing prior is *masked*, never faked: a text prior with an all-False mask, or a reference with
`has_reference=False`, must not influence the output whatever its values are.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class Priors:
    """Frozen-model guidance for a batch of B images.

    deg_states:    (B, Td, D) CLIP text states of the degradation description.
    deg_mask:      (B, Td) bool, True where a token is real.
    scene_states:  (B, Ts, D) CLIP text states of the scene caption.
    scene_mask:    (B, Ts) bool.
    reference:     (B, Hr, Wr, 3) float32 in [0, 1], a clean image of the scene (Stable Diffusion).
    has_reference: (B,) bool.
    deg_weights:   (B, T) float32 weights over the degradation kinds (`degradations.label.KINDS`):
                   one-hot, averaged over the kinds of a mixture, all zero when unknown; None =
                   unknown. Read by PIP's prompt module (`model.prompt_module = "pip"`) only.
    """

    deg_states: jax.Array
    deg_mask: jax.Array
    scene_states: jax.Array
    scene_mask: jax.Array
    reference: jax.Array
    has_reference: jax.Array
    deg_weights: jax.Array | None = None

    @classmethod
    def empty(cls, batch: int, text_dim: int, text_len: int = 1, ref_size: int = 8) -> Priors:
        """All priors missing (masked) for a batch: what the network sees without CLIP or SD."""
        return cls(
            deg_states=jnp.zeros((batch, text_len, text_dim), jnp.float32),
            deg_mask=jnp.zeros((batch, text_len), bool),
            scene_states=jnp.zeros((batch, text_len, text_dim), jnp.float32),
            scene_mask=jnp.zeros((batch, text_len), bool),
            reference=jnp.zeros((batch, ref_size, ref_size, 3), jnp.float32),
            has_reference=jnp.zeros((batch,), bool),
        )


def drop_priors(
    priors: Priors, key: jax.Array, p_degradation: float, p_scene: float, p_reference: float
) -> Priors:
    """Mask each prior of each example independently with the given probabilities (training only)."""
    b = priors.has_reference.shape[0]
    k1, k2, k3 = jax.random.split(key, 3)
    keep_d = jax.random.uniform(k1, (b,)) >= p_degradation
    keep_s = jax.random.uniform(k2, (b,)) >= p_scene
    keep_r = jax.random.uniform(k3, (b,)) >= p_reference
    return priors.replace(
        deg_mask=priors.deg_mask & keep_d[:, None],
        scene_mask=priors.scene_mask & keep_s[:, None],
        has_reference=priors.has_reference & keep_r,
        deg_weights=(None if priors.deg_weights is None
                     else priors.deg_weights * keep_d[:, None].astype(priors.deg_weights.dtype)),
    )


def kind_weights(deg_vector: jax.Array) -> jax.Array:
    """PIP's prompt weights (B, T) from label severity vectors (B, T): 1/n on each of the n kinds
    present (one-hot for a single kind, the average for a mixture), zero for a clean image."""
    present = (deg_vector > 0).astype(jnp.float32)
    return present / jnp.maximum(jnp.sum(present, axis=-1, keepdims=True), 1.0)
