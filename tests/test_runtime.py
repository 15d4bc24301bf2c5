"""A faster malloc for the `lmdir` command (lmdir_jax.runtime): which, when, and the re-exec."""

import os
import subprocess
import sys

import pytest

from lmdir_jax import runtime

TC = "libtcmalloc_minimal.so.4"
# Prints what the re-executed child got: its LD_PRELOAD, its glibc tunables, and whether a tcmalloc
# is really mapped into it.
CHILD = ("from lmdir_jax import runtime; "
         "runtime.reexec_with_fast_malloc(['-c', 'import os; "
         "print(os.environ.get(\"LD_PRELOAD\", \"-\"), os.environ.get(\"GLIBC_TUNABLES\", \"-\"), "
         "\"tcmalloc\" in open(\"/proc/self/maps\").read())']); "
         "print('not re-executed')")


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", "LD_PRELOAD", runtime.OPT_OUT)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


def test_env_preloads_tcmalloc_where_there_is_one():
    env = runtime.malloc_env({"PATH": "/usr/bin"}, (2, 36), "madvise", TC)
    assert env == {"PATH": "/usr/bin", "LD_PRELOAD": TC,
                   "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}
    env = runtime.malloc_env({"LD_PRELOAD": "libfoo.so", "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": "5"},
                             None, None, TC)  # tcmalloc needs neither glibc nor huge pages
    assert env["LD_PRELOAD"] == f"{TC}:libfoo.so"
    assert env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] == "5"  # the user's own setting


def test_env_adds_the_hugepage_tunable_without_tcmalloc():
    env = runtime.malloc_env({"PATH": "/usr/bin"}, (2, 36), "madvise", None)
    assert env == {"PATH": "/usr/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    env = runtime.malloc_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, (2, 35), "madvise",
                             None)
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


@pytest.mark.parametrize(
    "environ,glibc,thp,tcmalloc",
    [
        ({runtime.OPT_OUT: "0"}, (2, 36), "madvise", TC),  # opted out
        ({runtime.OPT_OUT: "0"}, (2, 36), "madvise", None),
        ({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, (2, 36), "madvise", TC),  # their allocator
        ({"LD_PRELOAD": "libtcmalloc.so.4"}, (2, 36), "madvise", TC),  # e.g. Colab, or re-executed
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, (2, 36), "madvise", None),  # their choice
        ({}, (2, 31), "madvise", None),  # glibc without the tunable
        ({}, None, "madvise", None),  # not glibc
        ({}, (2, 36), "always", None),  # huge pages already
        ({}, (2, 36), "never", None),  # no huge pages to get
        ({}, (2, 36), None, None),  # unknown kernel setting
    ],
)
def test_env_is_none_when_nothing_would_change(environ, glibc, thp, tcmalloc):
    assert runtime.malloc_env(environ, glibc, thp, tcmalloc) is None


def test_find_tcmalloc_takes_the_first_library_found(monkeypatch):
    import ctypes.util

    found = {"tcmalloc": "libtcmalloc.so.4"}
    monkeypatch.setattr(ctypes.util, "find_library", found.get)
    assert runtime.find_tcmalloc() == "libtcmalloc.so.4"
    found["tcmalloc_minimal"] = TC
    assert runtime.find_tcmalloc() == TC
    found.clear()
    assert runtime.find_tcmalloc() is None


def test_thp_mode_reads_the_bracketed_mode(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert runtime.thp_mode(str(f)) == "madvise"
    assert runtime.thp_mode(str(tmp_path / "missing")) is None


def test_reexec_runs_the_child_with_the_allocator_or_not_at_all():
    env = _clean_env()
    tcmalloc = runtime.find_tcmalloc()
    expected = runtime.malloc_env(env, runtime.glibc_version(), runtime.thp_mode(), tcmalloc)
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
                         check=True).stdout.strip()
    if expected is None:
        assert out == "not re-executed"
    elif tcmalloc:
        assert out == f"{tcmalloc} - True"  # preloaded and really mapped into the child
    else:
        assert out == "- glibc.malloc.hugetlb=1 False"
    out = subprocess.run([sys.executable, "-c", CHILD], env={**env, runtime.OPT_OUT: "0"},
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "not re-executed"


def test_console_script_reexecs_once_and_runs_main():
    env = _clean_env()
    r = subprocess.run([sys.executable, "-m", "lmdir_jax.cli", "--help"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0 and "usage: lmdir" in r.stdout
    r = subprocess.run([sys.executable, "-m", "lmdir_jax.cli", "bench", "train", "--steps", "0",
                        "--config", "tiny"], env=env, capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_cpu_times_reads_all_and_stolen_ticks(tmp_path):
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text("cpu  100 5 50 800 10 1 2 32 7 0\ncpu0 50 2 25 400 5 0 1 16 3 0\n")
    assert runtime.cpu_times(str(stat)) == (1000, 32)  # guest time is inside user time already
    stat.write_text("intr 1 2 3\n")
    assert runtime.cpu_times(str(stat)) is None
    assert runtime.cpu_times(str(tmp_path / "missing")) is None


def test_steal_share_is_the_stolen_fraction_between_readings():
    assert runtime.steal_share((1000, 32), (1400, 132)) == pytest.approx(0.25)
    assert runtime.steal_share((1000, 32), (1000, 32)) is None  # no time passed
    assert runtime.steal_share(None, (1400, 132)) is None
    assert runtime.steal_share((1000, 32), (1100, 42), min_ticks=200) is None  # too short to say
    assert runtime.steal_note((1000, 32), (1400, 132)) == "25%"
    assert runtime.steal_note((1000, 32), (1100, 42)) == ""


def test_cpu_times_on_this_machine_counts_up():
    first = runtime.cpu_times()
    if first is None:
        pytest.skip("no /proc/stat here")
    sum(i * i for i in range(200_000))
    second = runtime.cpu_times()
    assert second[0] >= first[0] and second[1] >= first[1] and 0 <= second[1] <= second[0]


def test_malloc_note_names_the_allocator_in_use(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", TC)
    assert runtime.malloc_note() == "tcmalloc (LD_PRELOAD)"
    monkeypatch.delenv("LD_PRELOAD")
    monkeypatch.setenv("GLIBC_TUNABLES", runtime.TUNABLE)
    monkeypatch.setattr(runtime, "find_tcmalloc", lambda: None)
    note = runtime.malloc_note()
    if runtime.glibc_version() is not None:
        assert note.startswith("glibc malloc with huge pages") and "apt install" in note


# Compiles 64 products of bf16 weights and prints the program's temporary memory in MiB: XLA converts
# each weight to float32 for its product; scheduled for memory, one converted weight (4 MiB) is alive
# at a time.
SCHEDULE_CHILD = """
import sys
from lmdir_jax import runtime
on = runtime.schedule_cpu_for_memory()
import jax, jax.numpy as jnp
ws = [jnp.full((1024, 1024), i, jnp.bfloat16) for i in range(64)]
def f(ws, x):
    for w in ws:
        x = jnp.tanh(x @ w.astype(jnp.float32))
    return x
m = jax.jit(f).lower(ws, jnp.ones((8, 1024))).compile().memory_analysis()
print(on, m.temp_size_in_bytes / 2**20)
"""


def test_cpu_scheduled_for_memory_converts_one_weight_at_a_time():
    env = {k: v for k, v in _clean_env().items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-c", SCHEDULE_CHILD], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0] == "True"
    assert float(out[1]) <= 16, f"{out[1]} MiB of temporaries: more than a few float32 weights alive at once"


def test_cpu_schedule_leaves_a_users_flag_and_a_started_backend_alone():
    mine = {"XLA_FLAGS": f"--{runtime.MEMORY_SCHEDULE}=true"}
    assert runtime.schedule_cpu_for_memory(mine) is False
    assert mine == {"XLA_FLAGS": f"--{runtime.MEMORY_SCHEDULE}=true"}
    import jax

    jax.devices()  # this process's backend has started: too late to change XLA's flags
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert runtime.schedule_cpu_for_memory(env) is False
    assert env == {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


def test_compile_cache_folder_follows_the_environment():
    """jax's own variable wins; LMDIR_COMPILE_CACHE names a folder or ("0", empty) none; else the
    user's cache folder."""
    jax_dir = {"JAX_COMPILATION_CACHE_DIR": "/j", runtime.COMPILE_CACHE: "/l"}
    assert runtime.compile_cache_dir(jax_dir) == "/j"
    assert runtime.compile_cache_dir({runtime.COMPILE_CACHE: "/l"}) == "/l"
    assert runtime.compile_cache_dir({runtime.COMPILE_CACHE: "0"}) is None
    assert runtime.compile_cache_dir({runtime.COMPILE_CACHE: ""}) is None
    assert runtime.compile_cache_dir({"XDG_CACHE_HOME": "/x"}) == "/x/lmdir/xla"
    # "0", or a folder that cannot be made, leaves the cache off (and jax's setting untouched).
    assert runtime.enable_compile_cache({runtime.COMPILE_CACHE: "0"}) is None
    assert runtime.enable_compile_cache({runtime.COMPILE_CACHE: "/proc/no/such/folder"}) is None


def test_console_script_keeps_compiled_steps_for_the_next_process(tmp_path):
    """`lmdir` (the console script) writes the compiled train step to the user's cache folder and
    says so beside the compile time it prints."""
    env = {k: v for k, v in _clean_env().items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # however fast this machine compiles
    cmd = [sys.executable, "-m", "lmdir_jax.cli", "bench", "train", "--config", "tiny", "--compile-only"]
    folder = tmp_path / "xdg" / "lmdir" / "xla"
    out = subprocess.run(cmd, env={**env, "XDG_CACHE_HOME": str(tmp_path / "xdg")}, check=True,
                         capture_output=True, text=True).stdout
    assert any(p.name.startswith("jit_train_step") for p in folder.iterdir())
    assert f"s of CPU time; compilation cache {folder})" in out
