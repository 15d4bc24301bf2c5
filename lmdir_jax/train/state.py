"""The train state: model variables, nnx.Optimizer state and optional EMA parameters, sharded.

The state is a plain dict of `nnx.State`s — `{'model', 'opt'[, 'ema']}` — so it is a pytree that a
jitted step can take (and donate) and that orbax can save item by item. The graph definitions that
turn it back into modules live in `TrainSetup`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import optax
from flax import nnx

from lmdir_jax.errors import UsageError
from lmdir_jax.models import build_model as build
from lmdir_jax.train import mesh as mesh_lib


def build_model(config) -> nnx.Module:
    """The LMDIR network of `config.model`, seeded by `config.seed` (no eager sharding)."""
    with nnx.use_eager_sharding(False):
        return build(config.model, int(config.seed))


def axis_rules(config) -> tuple:
    """`train.axis_rules` (logical axis -> mesh axis pairs); the default when the config (an old
    run's config.json) has none."""
    rules = config.train.get("axis_rules", None)
    if rules is None:
        return mesh_lib.DEFAULT_AXIS_RULES
    try:
        return tuple((str(name), None if axis is None else
                      (tuple(axis) if isinstance(axis, list | tuple) else str(axis)))
                     for name, axis in rules)
    except (TypeError, ValueError):
        raise UsageError(f"train.axis_rules must be (logical name, mesh axis or None) pairs, "
                         f"got {rules!r}") from None


def schedule_length(tc) -> int:
    """The steps the learning-rate schedule spans: `train.schedule_steps`, or `train.steps` when
    that is 0 (or absent, in an older run's config)."""
    return int(tc.get("schedule_steps", 0) or 0) or int(tc.steps)


def learning_rate_schedule(tc) -> optax.Schedule:
    """Linear warm-up to `lr`, then cosine decay to `lr * min_lr_ratio` at `schedule_length`."""
    lr = float(tc.lr)
    warmup = int(tc.warmup_steps)
    steps = max(schedule_length(tc), warmup + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=lr,
        warmup_steps=warmup,
        decay_steps=steps,
        end_value=lr * float(tc.min_lr_ratio),
    )


def make_tx(tc) -> optax.GradientTransformation:
    """Gradient clipping by global norm, then AdamW with the warm-up + cosine schedule."""
    return optax.chain(
        optax.clip_by_global_norm(float(tc.clip_norm)),
        optax.adamw(learning_rate_schedule(tc), weight_decay=float(tc.weight_decay)),
    )


@dataclasses.dataclass
class TrainSetup:
    """Everything static about a run: graph definitions, mesh, shardings, abstract state."""

    model_graphdef: Any
    opt_graphdef: Any
    mesh: jax.sharding.Mesh
    shardings: dict
    abstract: dict  # jax.ShapeDtypeStruct leaves carrying the target NamedShardings
    use_ema: bool


def _create(config, model_fn: Callable[[], nnx.Module]) -> tuple[nnx.Module, nnx.Optimizer, dict]:
    """The model, its optimizer and the train state dict. The optimizer state and the EMA copy are
    made by one jitted function even when the model is built eagerly: eagerly, jax compiles a
    zeros program per parameter shape (4 s for the tiny config on a CPU, 1.8 s this way)."""
    tx = make_tx(config.train)
    use_ema = float(config.train.ema_decay) > 0

    @nnx.jit
    def optimizer_and_ema(model: nnx.Module) -> tuple[nnx.Optimizer, nnx.State | None]:
        opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
        return opt, (jax.tree.map(lambda x: x + 0, nnx.state(model, nnx.Param)) if use_ema
                     else None)

    with nnx.use_eager_sharding(False):
        model = model_fn()
        opt, ema = optimizer_and_ema(model)
    state = {"model": nnx.state(model), "opt": nnx.state(opt)}
    if ema is not None:
        state["ema"] = ema
    return model, opt, state


def make_setup(config, mesh, model_fn: Callable[[], nnx.Module] | None = None) -> TrainSetup:
    """Trace the model/optimizer abstractly and derive graphdefs and shardings on `mesh`."""
    model_fn = model_fn or (lambda: build_model(config))
    with nnx.use_eager_sharding(False):
        model, opt, state = nnx.eval_shape(lambda: _create(config, model_fn))
    shardings = mesh_lib.state_shardings(state, mesh, axis_rules(config))
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )
    return TrainSetup(
        model_graphdef=nnx.graphdef(model),
        opt_graphdef=nnx.graphdef(opt),
        mesh=mesh,
        shardings=shardings,
        abstract=abstract,
        use_ema="ema" in state,
    )


STATE_CREATION = ("auto", "jit", "eager")


def creation_in_jit(config, mesh: jax.sharding.Mesh) -> bool:
    """Whether `init_state` creates the state in one jitted program (`train.state_creation`)."""
    mode = str(config.train.get("state_creation", "auto"))
    if mode not in STATE_CREATION:
        raise UsageError(f"train.state_creation must be one of {', '.join(STATE_CREATION)}, got {mode!r}")
    if mode != "auto":
        return mode == "jit"
    return jax.process_count() > 1 and any(d.platform != "cpu" for d in mesh.devices.flat)


def init_state(config, setup: TrainSetup, model_fn: Callable[[], nnx.Module] | None = None,
               in_jit: bool | None = None) -> dict:
    """A freshly initialised train state, created in its sharded layout.

    in_jit=True: the whole creation (parameters, optimizer state, EMA) is one jitted program whose
    outputs have the setup's shardings, so every device computes only its own shards and no
    parameter is ever whole on one host. in_jit=False: built eagerly and then placed
    (`mesh.place_identical`). Both draw the same numbers for a seed (`models.initializers`). The
    default (None) follows `train.state_creation`: "jit", "eager", or "auto", which jits only when
    several processes share the mesh on accelerators. The one creation program is slow to compile
    (the paper config's state: 91 s on a 2-core CPU and 71 s on an H200, against 21 s eagerly on
    the CPU; docs/benchmarks.md), and with one process the whole state is that process's anyway.
    """
    model_fn = model_fn or (lambda: build_model(config))
    if in_jit is None:
        in_jit = creation_in_jit(config, setup.mesh)
    if not in_jit:
        return mesh_lib.place_identical(_create(config, model_fn)[2], setup.shardings)

    def create() -> dict:
        return _create(config, model_fn)[2]

    with jax.set_mesh(setup.mesh):
        return jax.jit(create, out_shardings=setup.shardings)()


def param_count(state: dict) -> int:
    """Number of trainable parameters in a train state."""
    params = nnx.filter_state(state["model"], nnx.Param)
    return int(sum(x.size for x in jax.tree.leaves(params)))
