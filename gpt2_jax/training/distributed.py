"""Joining a multi-process run with JAX's own distributed runtime (no launcher of ours).

Failure detection. Every process sends heartbeats to the coordination service that process 0
hosts (from a background thread, so a long compile or step does not stop them). When one
process dies:
  * the others usually notice at once: their next collective fails (gloo or NCCL sees the
    connection drop) and train.py exits with that error;
  * whatever they were doing, the service marks the dead process as failed after
    `heartbeat_timeout_s` without a heartbeat and every survivor terminates itself (abort,
    non-zero exit), even one stuck in a collective or a checkpoint barrier;
  * if process 0 itself dies, the others stop reaching the service and terminate after the
    same timeout.
So a survivor exits non-zero within about `heartbeat_timeout_s` (plus a few seconds) of a death,
instead of hanging until the job's wall-clock limit. JAX's defaults are 100 s heartbeat and
300 s shutdown; ours are shorter (see the constants) and still far above any pause a healthy
process has.
"""

from __future__ import annotations

import jax
import numpy as np

# A process silent this long is declared dead and the run is stopped. Heartbeats come from a
# C++ thread, not Python, so only a dead process, a dead host or a cut network goes silent.
HEARTBEAT_TIMEOUT_S = 30
# How long `jax.distributed.initialize` waits for every process to connect: workers of a pod
# slice or of a cluster job may start a few minutes apart (VM boot, pip install, ssh fan-out).
INITIALIZATION_TIMEOUT_S = 300
# At exit, processes meet at a shutdown barrier; this bounds how long a finished process waits
# there for the others (process 0 also writes the loss plot, so they do not finish together).
SHUTDOWN_TIMEOUT_S = 60


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S,
    initialization_timeout_s: int = INITIALIZATION_TIMEOUT_S,
    shutdown_timeout_s: int = SHUTDOWN_TIMEOUT_S,
) -> None:
    """On a Cloud TPU VM (or under SLURM / Open MPI) call with no addresses; elsewhere give all three.

    Given all three, they are taken as they are and every local device is used: JAX's cluster
    auto-detection is off, which under SLURM would otherwise also keep one GPU per process (its
    SLURM_LOCALID). To run one process per GPU, set CUDA_VISIBLE_DEVICES per process.

    Must run before anything touches a JAX device. CPU processes exchange collectives over gloo
    (the setting only affects the CPU backend). The timeouts are in seconds; see the module
    docstring for what each bounds.
    """
    given = [coordinator_address is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise ValueError(
            "--coordinator_address, --num_processes and --process_id go together "
            f"(got coordinator_address={coordinator_address!r}, num_processes={num_processes}, process_id={process_id})"
        )
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"--process_id={process_id} must be in [0, num_processes={num_processes})")
    for name, value in (("heartbeat_timeout_s", heartbeat_timeout_s),
                        ("initialization_timeout_s", initialization_timeout_s),
                        ("shutdown_timeout_s", shutdown_timeout_s)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive number of seconds")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        cluster_detection_method="deactivate" if all(given) else None,
        initialization_timeout=initialization_timeout_s,
        heartbeat_timeout_seconds=heartbeat_timeout_s,
        shutdown_timeout_seconds=shutdown_timeout_s,
    )


def any_process(flag: bool) -> bool:
    """True if `flag` is true on any process, so that all processes stop at the same step."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


def sum_over_processes(n: int) -> int:
    """n summed over the processes (an eval's byte count: well below 2**31)."""
    if jax.process_count() == 1:
        return n
    from jax.experimental import multihost_utils

    return int(np.sum(multihost_utils.process_allgather(np.int32(n))))
