"""`lmdir bench compare-torch`: forward+backward step time of LMDIR in JAX (jit) and in PyTorch.

Both run the same network (the PyTorch side is the exported mirror with the same parameters) on the
same random batch with all priors present, in one process on this machine (PyTorch on its CUDA device
when it has one, like JAX; `--torch-device cpu` to force the CPU). `--dtype float32` (default) or
`bfloat16`: JAX computes in bf16 with float32 parameters (`model.dtype`), PyTorch runs its forward
under `torch.autocast(dtype=torch.bfloat16)`, what a PyTorch user would run. The loss is the
L1 distance to a random target; a step is loss + gradients with respect to all parameters. Times are
medians over --steps timed steps, each block of them after --warmup untimed ones, JAX's first and
then PyTorch's (JAX compile time is reported apart). With --rounds R the two blocks take turns R
times, a pause between blocks, so that a machine whose speed drifts slows both alike; the ratio is
then given per round, and its median over the rounds is the headline. The warm-up before every
block matters: with glibc's malloc, JAX's first step after PyTorch's ran took 7-8.6 s against
5.1-5.8 s for the next (paper config, docs/benchmarks.md), an effect of sharing one process that
neither framework has on its own. On Linux the share of CPU
time the hypervisor stole while each framework was timed is printed too (`lmdir_jax.runtime`).
"""

from __future__ import annotations

import contextlib
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from lmdir_jax.config import load_config
from lmdir_jax.errors import UsageError
from lmdir_jax.export import check
from lmdir_jax.export.convert import flax_to_torch_state, model_config_dict
from lmdir_jax.models import build_model
from lmdir_jax.models.priors import Priors
from lmdir_jax.runtime import compile_cache_note, cpu_times, malloc_note, steal_note


def register(bsub) -> None:
    """Add `lmdir bench compare-torch`."""
    p = bsub.add_parser(
        "compare-torch",
        help="JAX vs PyTorch forward+backward step time of the same network",
        description=__doc__.split("\n", 1)[1].strip(),
    )
    p.add_argument("--config", required=True, metavar="CFG", help="config name or path")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps before each timed block (default 2)")
    p.add_argument("--rounds", type=int, default=1,
                   help="blocks of --steps steps per framework, taken in turn (default 1)")
    p.add_argument("--compile", action="store_true", help="wrap the PyTorch model in torch.compile")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute dtype: JAX model.dtype, PyTorch autocast (default float32)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (default 0: torch's own default)")
    p.add_argument("--torch-device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where PyTorch runs (default auto: cuda when available, else cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


PAUSE_S = 1.0  # between blocks, so that one framework's last step does not run into the other's


class _Timer:
    """Step times of one framework over its timed blocks, and the CPU time stolen meanwhile."""

    def __init__(self, fn, label: str):
        self.fn, self.label = fn, label
        self.blocks: list[list[float]] = []
        self.ticks = [0, 0]  # all, stolen

    def block(self, steps: int, warmup: int = 0) -> None:
        """Time `steps` calls of the step function as one block, after `warmup` untimed calls."""
        for _ in range(warmup):
            self.fn()
        before = cpu_times()
        times = []
        for _ in tqdm(range(steps), desc=self.label, leave=False):
            t0 = time.perf_counter()
            self.fn()
            times.append(time.perf_counter() - t0)
        after = cpu_times()
        self.blocks.append(times)
        # One line per block as it ends: a run stopped by a time limit still leaves its numbers.
        print(f"  {self.label} block {len(self.blocks)}: median {self.median(-1):.4f} s/step", flush=True)
        if before is not None and after is not None:
            self.ticks = [self.ticks[0] + after[0] - before[0], self.ticks[1] + after[1] - before[1]]

    def median(self, block: int | None = None) -> float:
        """Median step seconds over all blocks, or over one."""
        times = self.blocks[block] if block is not None else sum(self.blocks, [])
        return float(np.median(times))

    def steal(self) -> str:
        """The stolen share of CPU time while this framework was timed, as text ('' if unknown)."""
        return steal_note((0, 0), (self.ticks[0], self.ticks[1]))


def run(args) -> int:
    """Handler: build both models, time them, print one table with the ratio."""
    if args.size < 8 or args.batch < 1 or args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        raise UsageError("need --size >= 8, --batch >= 1, --steps >= 1, --warmup >= 0, --rounds >= 1")
    try:
        import torch
    except ImportError:
        raise UsageError("compare-torch needs torch: pip install 'lmdir-jax[export]'") from None
    if args.torch_device != "cpu" and torch.cuda.is_available():
        # JAX takes 75% of GPU memory up front by default, which leaves PyTorch out of memory.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    from lmdir_jax.export.torch_model import LMDIRTorch  # torch: an optional dependency

    config = load_config(args.config, list(args.config_overrides))
    with config.unlocked():
        config.model.dtype = args.dtype  # float32 parameters either way
    if args.threads:
        torch.set_num_threads(args.threads)
    use_cuda = args.torch_device == "cuda" or (
        args.torch_device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise UsageError("--torch-device cuda: this PyTorch sees no CUDA device")
    tdev = torch.device("cuda" if use_cuda else "cpu")
    if use_cuda:
        # JAX's default float32 matmul/conv precision on NVIDIA GPUs is TF32; let PyTorch use it too.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    with nnx.use_eager_sharding(False):
        model = build_model(config.model, args.seed)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    inputs = check.random_inputs(
        int(config.model.text_dim), batch=args.batch, height=args.size, width=args.size,
        text_len=int(config.priors.max_text_len), ref_size=int(config.priors.ref_size),
        seed=args.seed,
    )
    gt = np.random.default_rng(args.seed + 1).random(inputs["lq"].shape, dtype=np.float32)

    # JAX: jitted value_and_grad over the parameters.
    graphdef, params = nnx.split(model, nnx.Param)
    priors = Priors(**{k: jnp.asarray(v) for k, v in inputs.items() if k != "lq"})
    lq_j, gt_j = jnp.asarray(inputs["lq"]), jnp.asarray(gt)

    @jax.jit
    def jax_step(params, lq, gt, priors):
        def loss_fn(p):
            return jnp.mean(jnp.abs(nnx.merge(graphdef, p)(lq, priors) - gt))

        return jax.value_and_grad(loss_fn)(params)

    t0 = time.perf_counter()
    jax.block_until_ready(jax_step(params, lq_j, gt_j, priors))
    jax_compile = time.perf_counter() - t0
    print(f"  jax first step (compile): {jax_compile:.1f} s ({compile_cache_note()})", flush=True)
    jax_timer = _Timer(lambda: jax.block_until_ready(jax_step(params, lq_j, gt_j, priors)), "jax")
    # Each framework is timed in blocks of steps, JAX first, with a pause between: JAX steps taken
    # in turn with PyTorch's one by one ran up to 1.8x slower on a 2-core CPU (docs/benchmarks.md).
    jax_timer.block(args.steps, args.warmup)

    # PyTorch: the mirror with the same parameters.
    tm = LMDIRTorch(model_config_dict(config.model))
    state = flax_to_torch_state(nnx.to_pure_dict(params))
    tm.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()}, strict=True)
    tm.to(tdev).train()
    fwd = torch.compile(tm) if args.compile else tm
    t_in = {k: torch.from_numpy(np.ascontiguousarray(v)).to(tdev) for k, v in inputs.items()}
    gt_t = torch.from_numpy(gt).to(tdev)

    autocast = (torch.autocast(device_type=tdev.type, dtype=torch.bfloat16)
                if args.dtype == "bfloat16" else contextlib.nullcontext())

    def torch_step():
        with autocast:
            out = fwd(**t_in)
        loss = (out.float() - gt_t).abs().mean()
        loss.backward()
        tm.zero_grad(set_to_none=True)
        if use_cuda:
            torch.cuda.synchronize()
        return loss

    time.sleep(PAUSE_S)
    t0 = time.perf_counter()
    torch_step()
    torch_first = time.perf_counter() - t0
    print(f"  pytorch first step{' (torch.compile)' if args.compile else ''}: {torch_first:.1f} s",
          flush=True)
    torch_timer = _Timer(torch_step, "torch")
    torch_timer.block(args.steps, args.warmup)
    for _ in range(args.rounds - 1):
        for timer in (jax_timer, torch_timer):
            time.sleep(PAUSE_S)
            timer.block(args.steps, args.warmup)
    jax_s, torch_s = jax_timer.median(), torch_timer.median()

    print(f"compare-torch  config={config.get('name', args.config)}  params={n_params:,}  "
          f"batch={args.batch}  size={args.size}x{args.size}  {args.dtype}  all priors on")
    where = (f"cuda ({torch.cuda.get_device_name()}, TF32 allowed)" if use_cuda
             else f"cpu, {torch.get_num_threads()} threads")
    print(f"  devices: jax {jax.devices()[0].platform} ({jax.devices()[0].device_kind}) | "
          f"torch {where}{', torch.compile' if args.compile else ''}"
          f"{', bf16 autocast' if args.dtype == 'bfloat16' else ''} | host memory: {malloc_note()}")
    stolen = (jax_timer.steal(), torch_timer.steal())
    steal = all(stolen)
    print(f"  {'framework':<10} {'first step s':>13} {'step s (median)':>16} {'images/s':>9}"
          + (f" {'cpu stolen':>11}" if steal else ""))
    for name, first, step, share in (("jax (jit)", jax_compile, jax_s, stolen[0]),
                                     ("pytorch", torch_first, torch_s, stolen[1])):
        print(f"  {name:<10} {first:>13.2f} {step:>16.4f} {args.batch / step:>9.2f}"
              + (f" {share:>11}" if steal else ""))
    ratio, how = torch_s / jax_s, "step time"
    if args.rounds > 1:
        ratios = [torch_timer.median(r) / jax_timer.median(r) for r in range(args.rounds)]
        print(f"  ratio per round ({args.rounds} rounds of {args.steps} steps each): "
              + " ".join(f"{r:.2f}x" for r in ratios))
        ratio, how = float(np.median(ratios)), "step time, median over rounds"
    print(f"  ratio pytorch/jax {how}: {ratio:.2f}x "
          f"({'JAX faster' if ratio > 1 else 'PyTorch faster'})")
    return 0
