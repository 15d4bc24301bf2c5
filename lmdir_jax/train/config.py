"""Defaults of the `train` config section (owned by lmdir_jax/train)."""

import ml_collections

from lmdir_jax.axes import EMBED, FSDP, HEADS, LAYERS, MLP

# Logical axis names of the model's parameters -> mesh axes (None = replicated): FSDP shards the
# kernels' output dimension ('mlp'); stacked blocks, kernel inputs and heads are replicated.
DEFAULT_AXIS_RULES = ((LAYERS, None), (EMBED, None), (MLP, FSDP), (HEADS, None))


def default_config() -> ml_collections.ConfigDict:
    """Optimisation, mesh, checkpoints, logging."""
    c = ml_collections.ConfigDict()
    c.steps = 1000
    # Steps of the warm-up + cosine schedule; 0 = `steps`. Training in chunks (a notebook raising
    # `steps` call by call) sets it to the whole run: every chunk then follows one schedule and,
    # in one process, reuses one compiled step.
    c.schedule_steps = 0
    c.lr = 2e-4
    c.warmup_steps = 50
    c.min_lr_ratio = 0.01
    c.weight_decay = 1e-4
    c.clip_norm = 1.0
    c.loss = "l1"  # "l1", or "psnr" (minus per-example PSNR: balances tasks of unequal error size)
    # Weight of PIP's orthogonality regulariser (model.prompt_module="pip"): PIP trains with
    # 0.002 x its 0.01-scaled cosine loss, i.e. 2e-5 x models.pip.orthogonality.
    c.pip_orthogonality = 2e-5
    c.ema_decay = 0.0  # 0 = no EMA parameters
    # How the train state is created (`train.state.init_state`): "jit" (one sharded program: no
    # host holds a whole parameter; compiling it takes over a minute for the paper config),
    # "eager" (drawn on the host, then placed; seconds), or "auto": jit only with several
    # processes on accelerators.
    c.state_creation = "auto"
    c.mesh_data = -1  # -1 = all devices (divided by mesh_fsdp)
    c.mesh_fsdp = 1
    # Logical axis names of the model's parameters -> mesh axes ('data', 'fsdp' or None =
    # replicated); a dimension its mesh axes do not divide is replicated.
    c.axis_rules = DEFAULT_AXIS_RULES
    c.log_every = 10
    c.ckpt_every = 100
    c.keep_checkpoints = 3
    c.val_every = 200
    c.plot_every = 200  # and at the end; 0: at the end only; -1: never
    # Resume even when model / data-order / seed keys differ from WORKDIR/config.json.
    c.allow_config_change = False
    c.init_timeout_s = 300  # multi-process start-up: seconds to wait for the coordinator
    return c
