"""Joining a multi-process run with JAX's own distributed runtime (no launcher of ours)."""

from __future__ import annotations

import jax


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """On a Cloud TPU VM call with no arguments; elsewhere give all three.

    CPU processes exchange collectives over gloo (the setting only affects the CPU backend).
    A process that dies is noticed by the others through the coordination service's heartbeat,
    and they exit with an error instead of hanging.
    """
    given = [coordinator_address is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise ValueError(
            "--coordinator_address, --num_processes and --process_id go together "
            f"(got coordinator_address={coordinator_address!r}, num_processes={num_processes}, process_id={process_id})"
        )
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"--process_id={process_id} must be in [0, num_processes={num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
