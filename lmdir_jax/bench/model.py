"""`lmdir bench model`: forward and forward+backward time per batch and peak memory."""

from __future__ import annotations

import resource
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx
from tqdm import tqdm

from lmdir_jax.config import load_config
from lmdir_jax.errors import UsageError
from lmdir_jax.models.lmdir import build_model
from lmdir_jax.models.summary import count_params, example_priors


def register(bsub) -> None:
    """Add `lmdir bench model`."""
    p = bsub.add_parser("model", help="LMDIR forward / forward+backward speed and memory")
    p.add_argument("--config", required=True, help="config name (configs/NAME.py) or path")
    p.add_argument("--size", type=int, default=128, help="square input side")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="compute dtype (default: the config's model.dtype)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs (median reported)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def _peak_memory() -> str:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return f"{stats['peak_bytes_in_use'] / 2**20:.0f} MiB (device peak_bytes_in_use)"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return f"{rss / 2**10:.0f} MiB (process peak RSS)"


def run(args) -> int:
    """Time the jitted forward and forward+backward (after warm-up, median of --repeats)."""
    if args.size < 8 or args.batch < 1 or args.repeats < 1:
        raise UsageError("--size must be >= 8, --batch and --repeats >= 1")
    config = load_config(args.config, args.config_overrides)
    if args.dtype:
        config.model.dtype = args.dtype

    c = config.model.copy_and_resolve_references()
    c.zero_init_output = False
    try:
        model = build_model(c, args.seed)
    except ValueError as e:
        raise UsageError(f"bad model config: {e}") from None
    priors = example_priors(c, args.batch)
    lq = jax.random.uniform(jax.random.key(1), (args.batch, args.size, args.size, 3))
    gt = jax.random.uniform(jax.random.key(2), lq.shape)

    @jax.jit
    def fwd(m, x, p):
        return m(x, p)

    @jax.jit
    def fwd_bwd(m, x, p, y):
        return nnx.value_and_grad(lambda m: jnp.mean(jnp.abs(m(x, p) - y)))(m)

    def timed(fn, *a):
        jax.block_until_ready(fn(*a))  # warm-up (compile)
        times = []
        for _ in tqdm(range(args.repeats), desc=fn.__name__, leave=False):
            t = time.perf_counter()
            jax.block_until_ready(fn(*a))
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    t_f = timed(fwd, model, lq, priors)
    t_fb = timed(fwd_bwd, model, lq, priors, gt)
    print(f"config {config.name}: {count_params(model)['total']:,d} params, dtype {c.dtype}, "
          f"batch {args.batch} x {args.size}x{args.size}, device {jax.devices()[0].device_kind}")
    print(f"  forward          {t_f * 1e3:9.1f} ms/batch  (median of {args.repeats})")
    print(f"  forward+backward {t_fb * 1e3:9.1f} ms/batch  (median of {args.repeats})")
    print(f"  peak memory      {_peak_memory()}")
    return 0
