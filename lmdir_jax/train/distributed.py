"""Multi-process start-up: `jax.distributed.initialize` from the standard environment.

A multi-process run is recognised from the environment, as `jax.distributed.initialize()` does:
- JAX's coordinator variables: `JAX_COORDINATOR_ADDRESS=host:port` with `JAX_NUM_PROCESSES` and
  `JAX_PROCESS_ID` (what `scripts/launch_local.sh` sets; any launcher can);
- a Slurm job with several tasks (`srun`), Open MPI (`mpirun`), a Cloud TPU pod slice: JAX detects
  coordinator, process count and index itself.
On one host none of these is set and nothing happens. `LMDIR_NO_DISTRIBUTED=1` skips the start-up.
On CPU the cross-process collectives use gloo.
"""

from __future__ import annotations

import os
import socket
import time

import jax
from jax._src import distributed as jax_distributed  # the client has no public barrier

from lmdir_jax.errors import UsageError

# Variables that make jax.distributed.initialize() detect a cluster by itself.
_CLUSTER_ENV = (
    "OMPI_MCA_orte_hnp_uri",  # Open MPI (mpirun)
    "TPU_WORKER_HOSTNAMES",  # Cloud TPU pod slice
    "TPU_PROCESS_ADDRESSES",
    "MEGASCALE_COORDINATOR_ADDRESS",
)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"{name}={value!r} is not an integer") from None


def wanted() -> bool:
    """Whether the environment describes a multi-process job."""
    if os.environ.get("LMDIR_NO_DISTRIBUTED"):
        return False
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if (_env_int("SLURM_NTASKS") or 1) > 1 and "SLURM_STEP_NODELIST" in os.environ:
        return True
    return any(os.environ.get(k) for k in _CLUSTER_ENV)


def split_address(address: str) -> tuple[str, int]:
    """'host:port' (or '[v6]:port') -> (host, port); a malformed address is a UsageError."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UsageError(f"JAX_COORDINATOR_ADDRESS={address!r} must have the form host:port")
    return host.strip("[]"), int(port)


def wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Block until a TCP connection to the coordinator succeeds; UsageError after `timeout_s`.

    (A JAX client that cannot reach its coordinator aborts the whole process with a C++ check
    failure, so the other processes probe it first and fail with one line instead.)
    """
    host, port = split_address(address)
    deadline = time.monotonic() + float(timeout_s)
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(2.0, max(0.1, timeout_s))):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise UsageError(
                    f"cannot reach the JAX coordinator at {address} within {timeout_s:g} s ({e.strerror or e}); "
                    "is process 0 running? (train.init_timeout_s sets the wait)"
                ) from None
            time.sleep(0.2)


def initialize(timeout_s: float = 300.0) -> bool:
    """Start multi-process JAX when the environment asks for it; returns whether it did.

    Must run before anything touches a JAX backend. Bad settings (a process id outside the
    process count, an unreachable coordinator) are UsageErrors raised before anything compiles.
    """
    if not wanted():
        return False
    if jax.distributed.is_initialized():
        return True
    timeout = max(1, int(timeout_s))
    address = os.environ.get("JAX_COORDINATOR_ADDRESS", "").strip()
    if not address:  # Slurm, Open MPI, TPU pod: JAX detects everything itself
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # (CPU devices only)
        jax.distributed.initialize(initialization_timeout=timeout)
        return True
    count, index = _env_int("JAX_NUM_PROCESSES"), _env_int("JAX_PROCESS_ID")
    if count is None or index is None:
        raise UsageError(
            "JAX_COORDINATOR_ADDRESS is set: also set JAX_NUM_PROCESSES and JAX_PROCESS_ID (0 .. N-1)"
        )
    if count < 1 or not 0 <= index < count:
        raise UsageError(f"JAX_PROCESS_ID={index} must be in 0..{count - 1} (JAX_NUM_PROCESSES={count})")
    split_address(address)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if index != 0:
        wait_for_coordinator(address, timeout)
    jax.distributed.initialize(
        coordinator_address=address, num_processes=count, process_id=index,
        initialization_timeout=timeout,
    )
    return True


def check_batch(batch_size: int, devices: int, processes: int) -> None:
    """The global batch must split evenly over processes and devices (UsageError otherwise)."""
    if batch_size < 1 or batch_size % processes:
        raise UsageError(
            f"data.batch_size={batch_size} must be a positive multiple of the {processes} processes"
        )
    if batch_size % devices:
        raise UsageError(
            f"data.batch_size={batch_size} must be a multiple of the {devices} devices in the mesh"
        )


def barrier(name: str, timeout_s: float = 3600.0) -> None:
    """Wait until every process reaches `name` (coordination service; no device collective).

    Used after compiling: a process whose step came from the compilation cache must not enter
    the step's collectives while another still compiles (gloo gives up after 30 s).
    """
    if jax.process_count() == 1:
        return
    jax_distributed.global_state.client.wait_at_barrier(name, int(timeout_s * 1000))
