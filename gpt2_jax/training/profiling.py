"""config.train.profile_start / profile_steps: a jax.profiler trace of chosen training steps.

Steps are numbered as metrics.jsonl numbers them: step N is the N-th optimizer step. The trace of
steps profile_start .. profile_start + profile_steps - 1 goes to WORKDIR/profile (each process of a
multi-process run into WORKDIR/profile/process_<i>), as TensorBoard's profile plugin reads it
(plugins/profile/<run>/<host>.xplane.pb) and as a Perfetto trace (perfetto_trace.json.gz beside it,
for ui.perfetto.dev). The tracer slows the steps it records, so the loop leaves them out of
tokens_per_s and mfu. A resumed run past the window traces nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax


def profile_dir(workdir: str) -> str:
    """Where this process writes its trace."""
    folder = os.path.join(workdir, "profile")
    return folder if jax.process_count() == 1 else os.path.join(folder, f"process_{jax.process_index()}")


class ProfileWindow:
    """Starts the trace before the window's first step and stops it after its last.

    In the loop: `traced = window.begin(step + 1)` before running step + 1, `window.end(step)` after
    it; `traced` says whether the step is inside the window (and so not counted in throughput)."""

    def __init__(self, t: Any, workdir: str, say: Callable[[str], None]):
        self.first = t.profile_start
        self.last = t.profile_start + t.profile_steps - 1 if t.profile_steps > 0 else 0
        self.folder = profile_dir(workdir)
        self.say = say  # prints one line (process 0)
        self.running = False

    def begin(self, step: int) -> bool:
        """Called before `step` runs; True if it is traced."""
        if not self.first <= step <= self.last:
            return False
        if not self.running:
            jax.profiler.start_trace(self.folder, create_perfetto_trace=True)
            self.running = True
            self.started = step
        return True

    def end(self, step: int) -> None:
        """Called after `step` ran (its results fetched, so the trace holds its whole run)."""
        if self.running and step >= self.last:
            self.stop(step)

    def stop(self, step: int) -> None:
        """Ends the trace after `step` (also when the loop ends early inside the window)."""
        if not self.running:
            return
        jax.profiler.stop_trace()
        self.running = False
        steps = f"step {step}" if step == self.started else f"steps {self.started}-{step}"
        each = jax.process_count() > 1
        where = os.path.dirname(self.folder) if each else self.folder
        self.say(f"profile of {steps} written to {where}" + (" (process_<i>/ for each process)" if each else "")
                 + f": tensorboard --logdir {where}, or its perfetto_trace.json.gz in ui.perfetto.dev")
