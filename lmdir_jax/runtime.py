"""Host facts for CPU runs: a malloc that keeps XLA's buffers, and CPU time stolen by a hypervisor.

XLA:CPU allocates its temporary buffers (118 MB per quick-start step, 3 GB per paper step) afresh
for every execution of a compiled step. glibc serves allocations that large with a new `mmap` each
time and unmaps them after, so every step page-faults all of it in again and the kernel zeroes
every page: 0.79 M minor faults and 3.9 s of kernel time per paper training step on the 2-core dev
box (docs/benchmarks.md). tcmalloc keeps freed memory for reuse: with it the paper step spent 0.1 s
in the kernel instead of 0.5 s (huge pages) or 3.9 s (plain glibc), and the quick-start step took
131 ms instead of 155 ms. So the `lmdir` command re-executes itself once with tcmalloc preloaded
where the system has it (Debian/Ubuntu: `apt install libtcmalloc-minimal4`), else with glibc's
transparent huge pages (`glibc.malloc.hugetlb=1`, glibc >= 2.35: 400x fewer faults, but every
page is still zeroed). `LMDIR_MALLOC=0` turns both off. A notebook kernel has to be started with
the same environment (`malloc_env` says which); Colab and Kaggle preload tcmalloc already.

On a virtual machine the hypervisor can take CPU time away from this machine ("steal"); the 2-core
dev box lost 5-35% of it while benchmarks ran, and step times drifted by as much. `cpu_times` and
`steal_share` let the benchmarks print how much was stolen while they timed.

Frozen priors in bfloat16 run their matrix products in float32 on CPUs: XLA converts each weight
before its product, and XLA:CPU's default scheduler, which orders work for concurrency, converts them
all up front: a float32 copy of the whole network beside the bf16 one. `schedule_cpu_for_memory`
switches that scheduler to the one that orders work for peak memory (`lmdir priors` commands).

Compiled programs persist between `lmdir` processes (`enable_compile_cache`): a resumed run, a
second `lmdir train` in a notebook or a repeated `lmdir restore` loads its step from XLA's cache
instead of compiling it again (docs/training.md, "Compilation cache").
"""

from __future__ import annotations

import ctypes.util
import importlib.util
import os
import subprocess
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "LMDIR_MALLOC"
TCMALLOC_NAMES = ("tcmalloc_minimal", "tcmalloc")  # ctypes.util.find_library names, best first
# tcmalloc prints a line for every allocation above this (1 GiB by default); a paper step makes
# several of 3 GB on purpose.
TCMALLOC_REPORT = ("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
PROC_STAT = "/proc/stat"
MEMORY_SCHEDULE = "xla_cpu_enable_concurrency_optimized_scheduler"  # an XLA flag; false: memory first
COMPILE_CACHE = "LMDIR_COMPILE_CACHE"  # a folder, or "0" for none; jax's own variable wins
COMPILE_CACHE_BYTES = 2 << 30  # the size lmdir's own cache folder is kept under
MIN_TICKS = 200  # CPU ticks (all CPUs together) below which benchmarks print no stolen share


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the running glibc, or None off glibc."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # e.g. "glibc 2.36"
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, ValueError, OSError):
        return None


def thp_mode(path: str = THP_MODE_FILE) -> str | None:
    """The kernel's transparent-huge-page mode ('always', 'madvise' or 'never'), None if unknown."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def find_tcmalloc() -> str | None:
    """The file name of the system's tcmalloc library (for LD_PRELOAD), or None if it has none."""
    for name in TCMALLOC_NAMES:
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def _preloaded_allocator(environ: dict[str, str]) -> str | None:
    preload = environ.get("LD_PRELOAD", "")
    for name in ("tcmalloc", "jemalloc", "mimalloc"):
        if name in preload:
            return name
    return None


def malloc_env(environ: dict[str, str], glibc: tuple[int, int] | None, thp: str | None,
               tcmalloc: str | None) -> dict[str, str] | None:
    """The environment to re-execute with for a faster host malloc, or None to run as is.

    tcmalloc (`tcmalloc`: the library to preload) where there is one; else glibc's huge pages when
    glibc >= 2.35 and the kernel's THP mode is 'madvise' ('always' needs nothing, 'never' gives
    nothing). None when the user opted out (`LMDIR_MALLOC=0`), already preloads an allocator, has
    set glibc's huge-page tunable themselves, or nothing here would help.
    """
    if environ.get(OPT_OUT, "1") == "0" or _preloaded_allocator(environ):
        return None
    env = dict(environ)
    if tcmalloc:
        preload = environ.get("LD_PRELOAD", "")
        env["LD_PRELOAD"] = f"{tcmalloc}:{preload}" if preload else tcmalloc
        env.setdefault(*TCMALLOC_REPORT)
        return env
    if glibc is None or glibc < (2, 35) or thp != "madvise":
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return None
    env["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
    return env


def reexec_with_fast_malloc(python_args: list[str]) -> None:
    """Replace this process by `python python_args...` with tcmalloc or huge pages, where it helps.

    Returns (doing nothing) where `malloc_env` says there is nothing to gain; call it before
    importing jax. `python_args` are the interpreter's arguments, e.g. ['-m', 'lmdir_jax.cli', ...].
    """
    if not sys.platform.startswith("linux"):
        return
    env = malloc_env(dict(os.environ), glibc_version(), thp_mode(), find_tcmalloc())
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *python_args], env)


def malloc_note() -> str:
    """One phrase for benchmark headers: how this process's large host allocations are backed."""
    preloaded = _preloaded_allocator(dict(os.environ))
    if preloaded:
        return f"{preloaded} (LD_PRELOAD)"
    if glibc_version() is None:
        return "default malloc"
    hint = "" if find_tcmalloc() else "; faster with tcmalloc: apt install libtcmalloc-minimal4"
    if TUNABLE in os.environ.get("GLIBC_TUNABLES", ""):
        return "glibc malloc with huge pages (GLIBC_TUNABLES)" + hint
    return "glibc malloc" + hint


def cpu_times(path: str = PROC_STAT) -> tuple[int, int] | None:
    """(all, stolen) CPU time of the machine so far, in clock ticks, or None where unknown (not Linux).

    From the first ("cpu") line of /proc/stat: user nice system idle iowait irq softirq steal ...;
    guest time is already counted in user time, so only the first eight fields are summed.
    """
    try:
        with open(path) as f:
            fields = f.readline().split()
        if not fields or fields[0] != "cpu":
            return None
        ticks = [int(v) for v in fields[1:9]]
    except (OSError, ValueError):
        return None
    if len(ticks) < 8:
        return None
    return sum(ticks), ticks[7]


def steal_share(before: tuple[int, int] | None, after: tuple[int, int] | None,
                min_ticks: int = 1) -> float | None:
    """Share of the machine's CPU time stolen between two `cpu_times` readings (0..1).

    None when either reading is missing or fewer than `min_ticks` ticks passed: /proc/stat counts
    in ticks of (usually) 10 ms per CPU, too coarse for a share of a short interval.
    """
    if before is None or after is None or after[0] - before[0] < max(1, min_ticks):
        return None
    return (after[1] - before[1]) / (after[0] - before[0])


def steal_note(before: tuple[int, int] | None, after: tuple[int, int] | None) -> str:
    """The stolen share between two readings as text for benchmark output ('' where unknown)."""
    share = steal_share(before, after, MIN_TICKS)
    return "" if share is None else f"{100 * share:.0f}%"


def schedule_cpu_for_memory(environ: dict[str, str] | None = None) -> bool:
    """Make XLA:CPU order each compiled program for low peak memory rather than for concurrency.

    For large frozen models in bf16 on CPUs (module docstring; the prior cache's peak memory in
    docs/benchmarks.md). The flag must be in XLA_FLAGS before jax
    starts its backends, so this acts only before then. A flag the user set stays as it is. An XLA
    flag this XLA does not know aborts the process, so a child process tries it first. Returns
    whether the flag is in effect for programs compiled from now on.
    """
    env = os.environ if environ is None else environ
    flags = env.get("XLA_FLAGS", "")
    if MEMORY_SCHEDULE in flags:
        return f"{MEMORY_SCHEDULE}=false" in flags
    from jax._src import xla_bridge  # no public way to ask whether backends have started

    if xla_bridge.backends_are_initialized():
        return False
    wanted = f"{flags} --{MEMORY_SCHEDULE}=false".strip()
    probe = subprocess.run(
        [sys.executable, "-c", "import jax; jax.devices('cpu')"],
        env={**env, "XLA_FLAGS": wanted, "JAX_PLATFORMS": "cpu"}, capture_output=True, check=False,
    )
    if probe.returncode != 0:
        return False
    env["XLA_FLAGS"] = wanted
    return True


def compile_cache_dir(environ: dict[str, str]) -> str | None:
    """The folder `enable_compile_cache` uses: jax's own `JAX_COMPILATION_CACHE_DIR` when set,
    else `LMDIR_COMPILE_CACHE` ("0" or empty: none), else `$XDG_CACHE_HOME/lmdir/xla`
    (`~/.cache/lmdir/xla`)."""
    if environ.get("JAX_COMPILATION_CACHE_DIR"):
        return environ["JAX_COMPILATION_CACHE_DIR"]
    path = environ.get(COMPILE_CACHE)
    if path is not None:
        return None if path.strip() in ("", "0") else path
    home = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(home, "lmdir", "xla")


def enable_compile_cache(environ: dict[str, str] | None = None) -> str | None:
    """Keep XLA's compiled programs (those that took >= 1 s to compile) in `compile_cache_dir` so
    that the next process with the same program, shapes, jax version and flags skips compiling it.
    The folder is made here; one that cannot be made leaves the cache off. lmdir's own folder is
    kept under 2 GiB (least recently used entries go first). Returns the folder."""
    env = dict(os.environ) if environ is None else environ
    path = compile_cache_dir(env)
    if path is None:
        return None
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    if not env.get("JAX_COMPILATION_CACHE_DIR") and importlib.util.find_spec("filelock") is not None:
        # lmdir's own folder (not one the user gave jax) stays under COMPILE_CACHE_BYTES.
        jax.config.update("jax_compilation_cache_max_size", COMPILE_CACHE_BYTES)
    return path


def compile_cache_note() -> str:
    """'compilation cache DIR' or 'no compilation cache', for benchmark lines that time a compile
    (a program found in the cache skips XLA's compilation)."""
    import jax

    path = jax.config.jax_compilation_cache_dir
    return f"compilation cache {path}" if path else "no compilation cache"
