"""`lmdir bench train --config CFG [--steps N] [--peak-tflops X] [--compile-only]`: compile time,
XLA memory analysis (temp/argument/output bytes of the compiled step), train-step time, images/s, MFU.

Runs the real jitted, sharded train step on synthetic batches (no data pipeline, no CLIP: masked
priors) for the config's model, batch and patch size. FLOPs come from the lowered step's
`cost_analysis()`; MFU = FLOPs per step / step time / peak (given, or known for the device).
"""

from __future__ import annotations

import statistics
import time

import jax
import numpy as np

from lmdir_jax.axes import DATA, FSDP
from lmdir_jax.config import load_config
from lmdir_jax.errors import UsageError
from lmdir_jax.models.backend import kernels_of
from lmdir_jax.runtime import compile_cache_note, cpu_times, malloc_note, steal_note
from lmdir_jax.train import mesh as mesh_lib
from lmdir_jax.train import state as state_lib
from lmdir_jax.train import step as step_lib

# Dense bf16 peak TFLOP/s per device (vendor figures) for MFU when --peak-tflops is not given.
PEAK_TFLOPS = {
    "h100": 989.0,
    "h200": 989.0,
    "a100": 312.0,
    "l4": 121.0,
    "a10": 125.0,
    "v100": 125.0,
    "tpu v4": 275.0,
    "tpu v5 lite": 197.0,
    "tpu v5e": 197.0,
    "tpu v5p": 459.0,
    "tpu v6": 918.0,
}


def register(bsub) -> None:
    """Add `lmdir bench train`."""
    p = bsub.add_parser("train", help="train-step time, images/s and MFU")
    p.add_argument("--config", required=True, help="config file or name")
    p.add_argument("--steps", type=int, default=5, help="timed steps after warm-up")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s per device")
    p.add_argument("--compile-only", action="store_true",
                   help="stop after compilation (compile time and XLA memory analysis only)")
    p.set_defaults(func=run)


def known_peak(device_kind: str) -> float | None:
    """Peak TFLOP/s for a device kind string (None when unknown, e.g. CPU)."""
    kind = device_kind.lower()
    for key, value in PEAK_TFLOPS.items():
        if key in kind:
            return value
    return None


def memory_line(compiled) -> str:
    """XLA's memory analysis of a compiled program, per device: temp, argument, output bytes."""
    stats = compiled.memory_analysis()
    if isinstance(stats, list | tuple):
        stats = stats[0] if stats else None
    if stats is None:
        return "XLA memory analysis: n/a on this backend"
    mib = 2.0**20
    return (f"XLA memory analysis (per device): temp {stats.temp_size_in_bytes / mib:.1f} MiB, "
            f"argument {stats.argument_size_in_bytes / mib:.1f} MiB, "
            f"output {stats.output_size_in_bytes / mib:.1f} MiB "
            f"(aliased {stats.alias_size_in_bytes / mib:.1f} MiB)")


def run(args) -> int:
    """Compile the step, time it, print step time, images/s, FLOPs and MFU."""
    if args.steps < 1:
        raise UsageError("--steps must be >= 1")
    config = load_config(args.config, args.config_overrides)
    with config.unlocked():
        config.priors.clip = ""
    mesh = mesh_lib.mesh_from_config(config)
    b, p = int(config.data.batch_size), int(config.data.patch_size)
    if b % mesh.size:
        raise UsageError(f"data.batch_size={b} must be a multiple of the {mesh.size} devices")
    rng = np.random.default_rng(0)
    gt = rng.random((b, p, p, 3), dtype=np.float32)
    local = {"gt": gt, "lq": np.clip(gt + 0.1 * rng.standard_normal(gt.shape), 0, 1).astype(np.float32)}
    batch = mesh_lib.global_batch(local, mesh)

    m = config.model
    print(f"config: {config.name}  batch {b} x {p}x{p}  dtype {m.dtype}  "
          f"scan_blocks {m.get('scan_blocks', False)} ({m.get('scan_unroll', 'auto')})  "
          f"remat {m.get('remat', 'none')}  "
          f"kernels {kernels_of(m)}", flush=True)
    t0 = time.perf_counter()
    setup = state_lib.make_setup(config, mesh)
    state = state_lib.init_state(config, setup)
    jax.block_until_ready(state)
    # Each line as soon as it is known: a run stopped by a time limit still leaves its numbers.
    print(f"init {time.perf_counter() - t0:.1f} s  params {state_lib.param_count(state):,}", flush=True)
    step_fn = step_lib.make_train_step(config, setup)
    t0, c0 = time.perf_counter(), time.process_time()
    lowered = step_fn.lower(state, batch, None)
    compiled = lowered.compile()
    t_compile, c_compile = time.perf_counter() - t0, time.process_time() - c0
    # FLOPs of the program as written: the compiled program's count misses convolutions that
    # become library calls (cuDNN on GPUs), which made GPU MFU look 3.7x too small.
    cost = lowered.cost_analysis()
    if isinstance(cost, list):
        cost = cost[0] if cost else {}
    flops = float((cost or {}).get("flops", float("nan")))
    print(f"compile {t_compile:.1f} s ({c_compile:.1f} s of CPU time; {compile_cache_note()})")
    print(memory_line(compiled), flush=True)
    if args.compile_only:
        return 0
    for _ in range(max(0, args.warmup)):
        state, m = compiled(state, batch, None)
    jax.block_until_ready(state)
    times = []
    ticks = cpu_times()
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, m = compiled(state, batch, None)
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t0)
    stolen = steal_note(ticks, cpu_times())
    step_s = statistics.median(times)
    dev = jax.devices()[0]
    peak = args.peak_tflops if args.peak_tflops is not None else known_peak(dev.device_kind)
    # cost_analysis of an SPMD program reports per-device FLOPs.
    total_flops = flops * mesh.size
    print(f"devices: {mesh.size} x {dev.device_kind}  mesh {DATA}={mesh.shape[DATA]} "
          f"{FSDP}={mesh.shape[FSDP]}  host memory: {malloc_note()}")
    print(f"step time: {step_s * 1e3:.1f} ms (median of {len(times)}; min {min(times) * 1e3:.1f}, "
          f"max {max(times) * 1e3:.1f})"
          + (f"; cpu stolen by the hypervisor meanwhile: {stolen}" if stolen else ""))
    print(f"images/s: {b / step_s:.1f}")
    peak_mem = (dev.memory_stats() or {}).get("peak_bytes_in_use") if hasattr(dev, "memory_stats") else None
    if peak_mem:
        print(f"device memory peak (allocator): {peak_mem / 2**30:.2f} GiB")
    print(f"FLOPs/step: {total_flops / 1e9:.2f} GFLOP ({total_flops / step_s / 1e12:.3f} TFLOP/s achieved)")
    if peak:
        mfu = total_flops / step_s / (peak * 1e12 * mesh.size)
        print(f"MFU: {100 * mfu:.2f}% of {peak:g} TFLOP/s per device")
    else:
        print("MFU: n/a (unknown peak for this device; pass --peak-tflops)")
    print(f"final loss: {float(m['loss']):.4f}")
    return 0
