"""Huge-page malloc for the `lmdir` command (lmdir_jax.runtime): when it applies, and the re-exec."""

import os
import subprocess
import sys

import pytest

from lmdir_jax import runtime

CHILD = ("from lmdir_jax import runtime; "
         "runtime.reexec_with_hugepages(['-c', 'import os; print(os.environ[\"GLIBC_TUNABLES\"])']); "
         "print('not re-executed')")


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", runtime.OPT_OUT)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


def test_env_adds_the_tunable_and_keeps_the_rest():
    env = runtime.hugepage_env({"PATH": "/usr/bin"}, (2, 36), "madvise")
    assert env == {"PATH": "/usr/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    env = runtime.hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, (2, 35), "madvise")
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


@pytest.mark.parametrize(
    "environ,glibc,thp",
    [
        ({runtime.OPT_OUT: "0"}, (2, 36), "madvise"),  # opted out
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, (2, 36), "madvise"),  # the user's own choice
        ({}, (2, 31), "madvise"),  # glibc without the tunable
        ({}, None, "madvise"),  # not glibc
        ({}, (2, 36), "always"),  # huge pages already
        ({}, (2, 36), "never"),  # no huge pages to get
        ({}, (2, 36), None),  # unknown kernel setting
    ],
)
def test_env_is_none_when_nothing_would_change(environ, glibc, thp):
    assert runtime.hugepage_env(environ, glibc, thp) is None


def test_thp_mode_reads_the_bracketed_mode(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert runtime.thp_mode(str(f)) == "madvise"
    assert runtime.thp_mode(str(tmp_path / "missing")) is None


def test_reexec_runs_the_child_with_the_tunable_or_not_at_all():
    env = _clean_env()
    expected = runtime.hugepage_env(env, runtime.glibc_version(), runtime.thp_mode())
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == ("not re-executed" if expected is None else "glibc.malloc.hugetlb=1")
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
