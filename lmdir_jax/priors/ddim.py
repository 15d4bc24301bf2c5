"""DDIM (Song et al. 2021, eta = 0) from a diffusers scheduler config: the noise schedule, the
timesteps of an n-step run, adding noise, and one denoising step; epsilon or v prediction.

Any SD scheduler config works (SD 1.5 ships PNDM's, SD 2.x DDIM's): only the schedule values are
read (betas, `set_alpha_to_one`, `steps_offset`, `timestep_spacing`, `prediction_type`,
`clip_sample`), as diffusers' `DDIMScheduler` reads them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lmdir_jax.errors import UsageError

SCHEDULER_CONFIG = "scheduler_config.json"


@dataclass(frozen=True)
class DDIMConfig:
    """The values of a diffusers scheduler_config.json that DDIM uses."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    set_alpha_to_one: bool = False
    steps_offset: int = 1
    timestep_spacing: str = "leading"
    prediction_type: str = "epsilon"
    clip_sample: bool = False
    clip_sample_range: float = 1.0

    @classmethod
    def from_diffusers(cls, d: dict) -> DDIMConfig:
        """From a scheduler_config.json dict; one clear line for schedules DDIM here does not have."""
        cfg = cls(**{k: d[k] for k in cls.__dataclass_fields__ if d.get(k) is not None})
        if d.get("trained_betas") is not None:
            raise UsageError("unsupported scheduler config: trained_betas (give beta_start/beta_end)")
        if cfg.beta_schedule not in ("linear", "scaled_linear"):
            raise UsageError(f"unsupported beta_schedule {cfg.beta_schedule!r} (linear or scaled_linear)")
        if cfg.prediction_type not in ("epsilon", "v_prediction"):
            raise UsageError(f"unsupported prediction_type {cfg.prediction_type!r} (epsilon or v_prediction)")
        if cfg.timestep_spacing not in ("leading", "trailing", "linspace"):
            raise UsageError(f"unsupported timestep_spacing {cfg.timestep_spacing!r}")
        return cfg

    def to_diffusers(self) -> dict:
        """A scheduler_config.json diffusers' `DDIMScheduler` reads."""
        return {"_class_name": "DDIMScheduler", **self.__dict__}


def load_ddim(folder: str | Path) -> DDIMConfig:
    """The DDIM config of a scheduler/ folder (its scheduler_config.json)."""
    f = Path(folder) / SCHEDULER_CONFIG
    try:
        return DDIMConfig.from_diffusers(json.loads(f.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as e:
        raise UsageError(f"cannot read {f}: {e}") from None


class DDIM:
    """Deterministic DDIM sampling on a schedule; every method is traceable (use inside jit)."""

    def __init__(self, cfg: DDIMConfig):
        self.config = cfg
        n = cfg.num_train_timesteps
        if cfg.beta_schedule == "linear":
            betas = np.linspace(cfg.beta_start, cfg.beta_end, n, dtype=np.float32)
        else:
            betas = np.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=np.float32) ** 2
        ac = np.cumprod(1.0 - betas, dtype=np.float32)  # float32 throughout, as diffusers computes it
        self.alphas_cumprod = ac
        self.final_alpha_cumprod = np.float32(1.0 if cfg.set_alpha_to_one else ac[0])

    def timesteps(self, steps: int) -> np.ndarray:
        """The `steps` timesteps of a run, from noisiest to cleanest (int32)."""
        cfg, n = self.config, self.config.num_train_timesteps
        if cfg.timestep_spacing == "linspace":
            t = np.linspace(0, n - 1, steps).round()[::-1]
        elif cfg.timestep_spacing == "leading":
            t = (np.arange(0, steps) * (n // steps)).round()[::-1] + cfg.steps_offset
        else:
            t = np.round(np.arange(n, 0, -n / steps)) - 1
        return t.astype(np.int32)

    def add_noise(self, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise, t per batch element (B,)."""
        a = jnp.asarray(self.alphas_cumprod)[t].reshape(-1, *([1] * (x0.ndim - 1)))
        return jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise

    def step(self, model_output: jax.Array, t: jax.Array, x: jax.Array, steps: int) -> jax.Array:
        """x_{t-1} from x_t and the network's output at scalar timestep t, in a `steps`-step run."""
        cfg = self.config
        prev = t - cfg.num_train_timesteps // steps
        ac = jnp.asarray(self.alphas_cumprod)
        a_t = ac[t]
        a_prev = jnp.where(prev >= 0, ac[jnp.maximum(prev, 0)], self.final_alpha_cumprod)
        b_t = 1.0 - a_t
        if cfg.prediction_type == "epsilon":
            x0 = (x - jnp.sqrt(b_t) * model_output) / jnp.sqrt(a_t)
            eps = model_output
        else:  # v_prediction
            x0 = jnp.sqrt(a_t) * x - jnp.sqrt(b_t) * model_output
            eps = jnp.sqrt(a_t) * model_output + jnp.sqrt(b_t) * x
        if cfg.clip_sample:
            x0 = jnp.clip(x0, -cfg.clip_sample_range, cfg.clip_sample_range)
            eps = (x - jnp.sqrt(a_t) * x0) / jnp.sqrt(b_t)
        return jnp.sqrt(a_prev) * x0 + jnp.sqrt(1.0 - a_prev) * eps
