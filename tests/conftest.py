"""Test set-up: 8 emulated CPU devices (set before JAX initialises) and shared fixtures."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests compile many small programs and run few steps of them: XLA:CPU's cheaper code generation
# (docs/development.md). The subprocesses and the notebook kernel get the same
# flags (LMDIR_TEST_XLA_FLAGS); users' runs keep XLA's defaults.


def _cheap_compile_flags() -> str:
    """XLA flags that make XLA:CPU compile faster: LLVM -O0 without expensive passes, and on the
    jaxlibs that still have the switch (0.10; 0.12 removed it), the classic fusion code generator
    instead of the MLIR fusion emitters: the tiny train step compiles in 23 instead of 42 CPU
    seconds, and its steps run up to a third slower. An unknown flag aborts XLA, so the switch is
    probed once in a subprocess; the xdist workers inherit the answer through the environment."""
    import subprocess
    import sys

    flags = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    emitters = "--xla_cpu_use_fusion_emitters=false"
    probe = subprocess.run(
        [sys.executable, "-c", "import jax; jax.devices()"], capture_output=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=emitters),
    )
    return f"{flags} {emitters}" if probe.returncode == 0 else flags


if "LMDIR_TEST_XLA_FLAGS" not in os.environ:
    os.environ["LMDIR_TEST_XLA_FLAGS"] = _cheap_compile_flags()
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


@pytest.fixture(scope="session")
def photos(shared_data) -> list[Path]:
    """Three real photographs (CBSD68, name order)."""
    found = sorted((shared_data / "test" / "CBSD68").glob("*.png"))[:3]
    if len(found) < 3:
        pytest.skip("../shared/data/test/CBSD68 not present")
    return found


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory) -> Path:
    """A tiny random CLIP folder (Hugging Face layout, text width 32, seed 0), written once per run
    by `priors.tiny.save_tiny_clip`, as `lmdir priors make-tiny` writes it."""
    from lmdir_jax.priors.tiny import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "clip", text_dim=32, seed=0)


def pytest_collection_modifyitems(config, items) -> None:
    """The first test that needs the trained fixture (minutes to train; other workers wait for it
    on a lock) first, then the tests marked slow (minutes each), so that xdist's workers start on
    them and finish together instead of one running a long test alone at the end (a stable sort:
    the rest keep their order).

    scripts/test.sh distributes whole files (`--dist loadfile --no-loadscope-reorder`: each file's
    place is that of its first test in this order). With single tests distributed, the workers
    interleave files, and pytest tears a module's fixtures down whenever a worker moves to another
    file: test_train.py's 4-step run was built four times in one suite."""
    first = next((i for i in items if "trained_workdir" in getattr(i, "fixturenames", ())), None)
    items.sort(key=lambda item: 0 if item is first else 1 if item.get_closest_marker("slow") else 2)
