"""SIGTERM / SIGINT during training: finish the step, checkpoint, exit 0. A second signal exits at once."""

from __future__ import annotations

import dataclasses
import os
import signal


@dataclasses.dataclass
class Signals:
    """SIGTERM/SIGINT: finish the step, checkpoint, exit 0. A second signal exits at once."""

    received: int | None = None
    previous: dict = dataclasses.field(default_factory=dict)

    def install(self) -> None:
        def handler(signum, frame):  # noqa: ARG001
            if self.received is not None:
                os._exit(128 + signum)
            self.received = signum
            print(f"\nreceived signal {signum}: finishing this step, then checkpointing", flush=True)

        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, handler)

    def uninstall(self) -> None:
        for sig, old in self.previous.items():
            signal.signal(sig, old)
