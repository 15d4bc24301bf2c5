"""Test set-up: 8 emulated CPU devices (set before JAX initialises) and shared fixtures."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests compile many small programs and run few steps of them: XLA:CPU's cheaper code generation
# (LLVM -O0, no expensive passes) compiles the tiny train step in 26 s instead of 42 s on 2 cores,
# and runs its steps about 25 % slower (docs/benchmarks.md, "Test suite time"). The subprocesses
# and the notebook kernel get the same flags; users' runs keep XLA's defaults.
os.environ.setdefault(
    "LMDIR_TEST_XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
)
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 "
    + os.environ["LMDIR_TEST_XLA_FLAGS"]
).strip()

from pathlib import Path  # noqa: E402

# One persistent XLA compilation cache for the whole run: in-process tests, xdist workers, the
# training subprocesses and the notebook kernel (they inherit the environment) reuse compiled steps.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax-compilation-cache"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

import pytest  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the repository (real photographs; skip if absent)."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data not present")
    return SHARED_DATA


def pytest_collection_modifyitems(config, items) -> None:
    """The tests marked slow (minutes each) first, so that xdist's workers start on them and
    finish together instead of one running a long test alone at the end (a stable sort: the rest
    keep their order)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
