"""One jitted, sharded train step: priors -> prior dropout -> loss (L1 or PSNR) -> AdamW update
(+ EMA).

Degradation prior: the batch's label text is tokenized on the host (`deg_ids`, `deg_tmask`) and the
frozen CLIP text tower runs inside the step on `clip_params` (an argument that is never
differentiated); with `priors.auto_ratio > 0` that fraction of examples is told what the
automatic mode would tell it instead (the most likely vocabulary entry's text, by zero-shot CLIP
or the attached controller; drawn with its probabilities under `priors.auto_sample`), and with `priors.wrong_degradation > 0` that fraction is told a
wrong kind's noun (`mislead`). Without CLIP the degradation and scene priors are masked.
The labels' kind weights (`deg_vector`) enter as `Priors.deg_weights` (PIP's prompt weights), and
with `model.prompt_module = "pip"` the loss adds `train.pip_orthogonality` times PIP's
orthogonality regulariser on its degradation prompts.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lmdir_jax.degradations.label import KIND_INDEX, KINDS
from lmdir_jax.models.priors import Priors, drop_priors, kind_weights
from lmdir_jax.priors.clip import drawn_states
from lmdir_jax.train.state import TrainSetup, learning_rate_schedule, schedule_length


def step_key(seed: int, step: jax.Array) -> jax.Array:
    """The PRNG key of a step, a pure function of (seed, step): resumed runs draw the same."""
    return jax.random.fold_in(jax.random.key(int(seed)), step)


def vocabulary_kinds(vocab: list[tuple[str, str]]) -> np.ndarray:
    """(K, len(KINDS)) float32: row k is 1 at the kind vocabulary entry k names (all zero for 'clean'
    or a kind `degradations.label` does not know)."""
    rows = np.zeros((len(vocab), len(KINDS)), np.float32)
    for k, (name, _) in enumerate(vocab):
        if name in KIND_INDEX:
            rows[k, KIND_INDEX[name]] = 1.0
    return rows


def mislead(
    deg_states: jax.Array,
    deg_mask: jax.Array,
    deg_vector: jax.Array,
    bank: tuple[jax.Array, jax.Array, np.ndarray],
    key: jax.Array,
    ratio: float,
) -> tuple[jax.Array, jax.Array]:
    """Tell a `ratio` of the examples a wrong degradation: the conditioning text of a vocabulary
    entry that names none of the example's kinds (`deg_vector` (B, len(KINDS)) > 0), 'no
    degradation' included for a degraded example, never for a clean one.

    An automatic mode's controller is sometimes wrong on real photos (rain named haze); a network
    that never saw a wrong text follows it and dehazes a rainy photo. Trained with some, it learns
    to check the text against the pixels. `bank` is (states (K, T, D), mask (K, T), kinds (K,
    len(KINDS)) from `vocabulary_kinds`); T must equal the batch's text length.
    """
    states, mask, kinds = bank
    b = deg_states.shape[0]
    present = (deg_vector > 0).astype(jnp.float32)  # (B, KINDS)
    names_kind = jnp.asarray(kinds.sum(-1) > 0)  # (K,) False for 'clean'
    overlap = present @ jnp.asarray(kinds).T  # (B, K)
    degraded = jnp.any(present > 0, axis=-1)
    wrong = (overlap == 0) & (names_kind[None] | degraded[:, None])
    k_use, k_pick = jax.random.split(key)
    pick = jax.random.categorical(k_pick, jnp.where(wrong, 0.0, -jnp.inf), axis=-1)  # (B,)
    use = (jax.random.uniform(k_use, (b,)) < ratio) & jnp.any(wrong, axis=-1)
    deg_states = jnp.where(use[:, None, None], states[pick].astype(deg_states.dtype), deg_states)
    deg_mask = jnp.where(use[:, None], mask[pick], deg_mask)
    return deg_states, deg_mask


def build_priors(config, batch: dict, clip: Any, clip_params: Any, key: jax.Array) -> Priors:
    """The Priors of a device batch (before dropout); see the module docstring."""
    lq = batch["lq"]
    b = lq.shape[0]
    d = int(config.model.text_dim)
    ref = int(config.priors.ref_size)
    if clip is not None and "deg_ids" in batch:
        deg_mask = batch["deg_tmask"]
        deg_states = clip.text_states(clip_params, batch["deg_ids"], deg_mask)
        ratio = float(config.priors.auto_ratio)
        if ratio > 0:
            weights, auto_states, auto_mask = clip.auto_degradation_fn(clip_params, lq)
            if config.priors.get("auto_sample", False):
                _, states, masks = clip.degradation_bank()
                auto_states, auto_mask = drawn_states(weights, states, masks, jax.random.fold_in(key, 2))
            use_auto = jax.random.uniform(key, (b,)) < ratio
            deg_states = jnp.where(use_auto[:, None, None], auto_states, deg_states)
            deg_mask = jnp.where(use_auto[:, None], auto_mask, deg_mask)
        wrong = float(config.priors.get("wrong_degradation", 0.0))
        if wrong > 0 and "deg_vector" in batch:
            _, states, masks = clip.degradation_bank()
            bank = (states, masks, vocabulary_kinds(clip.degradation_vocab))
            deg_states, deg_mask = mislead(deg_states, deg_mask, batch["deg_vector"], bank,
                                           jax.random.fold_in(key, 1), wrong)
    else:
        deg_states = jnp.zeros((b, 1, d), jnp.float32)
        deg_mask = jnp.zeros((b, 1), bool)
    if "scene_states" in batch:
        scene_states, scene_mask = batch["scene_states"], batch["scene_mask"].astype(bool)
    else:
        scene_states = jnp.zeros((b, 1, d), jnp.float32)
        scene_mask = jnp.zeros((b, 1), bool)
    if "reference" in batch:
        reference, has_reference = batch["reference"], batch["has_reference"].astype(bool)
    else:
        reference = jnp.zeros((b, ref, ref, 3), jnp.float32)
        has_reference = jnp.zeros((b,), bool)
    return Priors(
        deg_states=deg_states.astype(jnp.float32),
        deg_mask=deg_mask.astype(bool),
        scene_states=scene_states.astype(jnp.float32),
        scene_mask=scene_mask,
        reference=reference.astype(jnp.float32),
        has_reference=has_reference,
        deg_weights=kind_weights(batch["deg_vector"]) if "deg_vector" in batch else None,
    )


def l1_loss(restored: jax.Array, gt: jax.Array) -> jax.Array:
    """Mean absolute error in float32."""
    return jnp.mean(jnp.abs(restored.astype(jnp.float32) - gt.astype(jnp.float32)))


def psnr_loss(restored: jax.Array, gt: jax.Array) -> jax.Array:
    """Minus the mean per-example PSNR (dB, peak 1), as HINet trains; float32.

    Every example counts by its relative error, so in multi-task batches the mild degradations
    (noise, rain) weigh as much as the ones with large absolute errors (haze, low light).
    """
    diff = restored.astype(jnp.float32) - gt.astype(jnp.float32)
    mse = jnp.mean(jnp.square(diff), axis=tuple(range(1, diff.ndim)))
    return jnp.mean(10.0 * jnp.log10(mse + 1e-8))


LOSSES = {"l1": l1_loss, "psnr": psnr_loss}


def example_losses(name: str, restored: jax.Array, gt: jax.Array) -> jax.Array:
    """The (B,) per-example values whose mean is loss `name` (mean |error|, or minus PSNR)."""
    diff = restored.astype(jnp.float32) - gt.astype(jnp.float32)
    axes = tuple(range(1, diff.ndim))
    if name == "psnr":
        return 10.0 * jnp.log10(jnp.mean(jnp.square(diff), axis=axes) + 1e-8)
    return jnp.mean(jnp.abs(diff), axis=axes)


def pop_source_losses(fetched: list[dict], names: list[str]) -> dict[str, float]:
    """Remove the per-example losses (and the host's source ids) from fetched step metrics; return
    {'loss/<source>': mean loss} for a mixture ({} for a single source).

    `source_id` holds this host's examples, the first rows of the global batch on process 0 (the
    one that logs), so with several hosts the per-source means are over process 0's examples.
    """
    sums, counts = np.zeros(len(names)), np.zeros(len(names))
    for m in fetched:
        losses = m.pop("example_loss", None)
        ids = m.pop("source_id", None)
        if losses is None or ids is None or not names:
            continue
        ids = np.asarray(ids)
        np.add.at(sums, ids, np.asarray(losses, np.float64)[: len(ids)])
        np.add.at(counts, ids, 1.0)
    return {f"loss/{n}": float(sums[i] / counts[i]) for i, n in enumerate(names) if counts[i] > 0}


def make_train_step(config, setup: TrainSetup, clip: Any = None) -> Callable:
    """`step(state, batch, clip_params) -> (state, metrics)`, jitted with the state donated.

    The metrics (replicated) include `example_loss` (B,), the per-example values whose mean is
    `loss`, which the loop turns into per-source losses (see `pop_source_losses`).
    """
    pc = config.priors
    ema_decay = float(config.train.ema_decay)
    if config.train.loss not in LOSSES:
        raise ValueError(f"train.loss must be one of {sorted(LOSSES)}, got {config.train.loss!r}")
    loss_of = LOSSES[config.train.loss]
    schedule = learning_rate_schedule(config.train)
    orthogonality = (float(config.train.get("pip_orthogonality", 0.0))
                     if str(config.model.get("prompt_module", "lmdir")) == "pip" else 0.0)
    if clip is not None and (float(pc.auto_ratio) > 0 or float(pc.get("wrong_degradation", 0)) > 0):
        clip.degradation_bank()  # computed eagerly once; enters the step as a constant

    def train_step(state: dict, batch: dict, clip_params: Any):
        model = nnx.merge(setup.model_graphdef, state["model"])
        opt = nnx.merge(setup.opt_graphdef, state["opt"])
        step = opt.step[...]
        k_auto, k_drop = jax.random.split(step_key(config.seed, step))
        priors = build_priors(config, batch, clip, jax.lax.stop_gradient(clip_params), k_auto)
        priors = drop_priors(
            priors, k_drop, pc.drop_degradation, pc.drop_scene, pc.drop_reference
        )

        def loss_fn(m):
            restored = m(batch["lq"], priors)
            loss = loss_of(restored, batch["gt"])
            if orthogonality:
                loss = loss + orthogonality * m.regulariser()
            return loss, restored

        (loss, restored), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        opt.update(model, grads)
        new = {"model": nnx.state(model), "opt": nnx.state(opt)}
        if "ema" in state:
            params = nnx.state(model, nnx.Param)
            new["ema"] = jax.tree.map(
                lambda e, p: e * ema_decay + p.astype(e.dtype) * (1.0 - ema_decay),
                state["ema"],
                params,
            )
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(step),
        }
        metrics["example_loss"] = jax.lax.stop_gradient(
            example_losses(config.train.loss, restored, batch["gt"])
        )
        return new, metrics

    replicated = jax.sharding.NamedSharding(setup.mesh, jax.sharding.PartitionSpec())
    return jax.jit(train_step, donate_argnums=(0,), out_shardings=(setup.shardings, replicated))


_REUSABLE: dict = {}  # the last (key, jitted step) of this process; see reusable_train_step


def reusable_train_step(config, setup: TrainSetup, clip: Any = None) -> Callable:
    """`make_train_step`, kept for the next `train()` of this process.

    A notebook trains in chunks: each `train()` raises `train.steps` and resumes. With the same
    config (apart from `train.steps`, when `train.schedule_steps` fixes the schedule) on the same
    devices, the chunk reuses the jitted step, so it is neither traced nor compiled again. The key
    is the whole config, so any other change (model, priors, loss, CLIP folder) gets a new step.
    """
    cfg = config.to_dict()
    if int(config.train.get("schedule_steps", 0) or 0) > 0:
        cfg["train"].pop("steps", None)
    cfg["train"]["schedule_length"] = schedule_length(config.train)
    key = (json.dumps(cfg, sort_keys=True, default=str),
           tuple(d.id for d in setup.mesh.devices.flat), tuple(setup.mesh.shape.items()))
    if key not in _REUSABLE:
        _REUSABLE.clear()  # one entry: a step holds its CLIP and graph definitions alive
        _REUSABLE[key] = make_train_step(config, setup, clip)
    return _REUSABLE[key]


def host_tokens(clip: Any, deg_text: np.ndarray) -> dict:
    """Tokenize the batch's degradation texts on the host: {'deg_ids', 'deg_tmask'}."""
    ids, mask = clip.tokenize([str(t) for t in deg_text])
    return {"deg_ids": ids, "deg_tmask": mask}
