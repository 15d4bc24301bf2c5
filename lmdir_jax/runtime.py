"""Host facts for CPU runs: huge-page malloc for XLA on Linux, and CPU time stolen by a hypervisor.

XLA:CPU allocates its temporary buffers (gigabytes at paper size) afresh for every execution of a
compiled step, and glibc serves allocations that large with a new `mmap` each time, so every step
page-faults all of it in again 4 KiB at a time: 0.79 M minor faults and 3.9 s of kernel time per
paper training step on the 2-core dev box (docs/benchmarks.md). glibc >= 2.35 can ask for
transparent huge pages on those mappings (`glibc.malloc.hugetlb=1`): the faults drop 400x and the
step took 4.35 s instead of 5.9-10 s. glibc reads the setting only at process start, so the `lmdir`
command re-executes itself once with it set; `LMDIR_HUGEPAGES=0` turns that off. A notebook kernel has to be started
with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` in its environment (Colab and Kaggle use tcmalloc,
which does not need it).

On a virtual machine the hypervisor can take CPU time away from this machine ("steal"); the 2-core
dev box lost 5-35% of it while benchmarks ran, and step times drifted by as much. `cpu_times` and
`steal_share` let the benchmarks print how much was stolen while they timed.
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "LMDIR_HUGEPAGES"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
PROC_STAT = "/proc/stat"
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


def hugepage_env(environ: dict[str, str], glibc: tuple[int, int] | None,
                 thp: str | None) -> dict[str, str] | None:
    """The environment to re-execute with, or None when nothing would change or help.

    None when the user opted out (`LMDIR_HUGEPAGES=0`), the tunable is already set, glibc is
    missing or older than 2.35, or the kernel's THP mode is not 'madvise' ('always' needs nothing,
    'never' gives nothing).
    """
    if environ.get(OPT_OUT, "1") == "0" or glibc is None or glibc < (2, 35) or thp != "madvise":
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
    return env


def reexec_with_hugepages(python_args: list[str]) -> None:
    """Replace this process by `python python_args...` with huge-page malloc, where it helps.

    Returns (doing nothing) where `hugepage_env` says there is nothing to gain; call it before
    importing jax. `python_args` are the interpreter's arguments, e.g. ['-m', 'lmdir_jax.cli', ...].
    """
    if not sys.platform.startswith("linux"):
        return
    env = hugepage_env(dict(os.environ), glibc_version(), thp_mode())
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *python_args], env)


def malloc_note() -> str:
    """One phrase for benchmark headers: how this process's large host allocations are backed."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if TUNABLE in tunables:
        return "glibc malloc with huge pages (GLIBC_TUNABLES)"
    if "tcmalloc" in os.environ.get("LD_PRELOAD", ""):
        return "tcmalloc"
    return "default malloc"


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
