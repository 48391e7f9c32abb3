"""config.train.wandb_project: a run's records in Weights & Biases as well as in metrics.jsonl.

Optional (`pip install -e ".[wandb]"`); with the key set and wandb missing the run does not start
(one `error:` line). Process 0 logs every record metrics.jsonl gets, all keys, with "step" as the
x-axis; the whole config; and loss.png at the end. wandb keeps its files in WORKDIR/wandb:
`WANDB_MODE=offline` logs there alone, without a network or an account (`wandb sync` uploads
later). A resumed run goes on in the same W&B run: its id is kept in WORKDIR/wandb_run_id.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

INSTALL = 'pip install -e ".[wandb]"'


def _run_id(workdir: str) -> str | None:
    """The W&B run id this workdir logs to, made on its first run (None: no local workdir to keep it in)."""
    if "://" in workdir:
        return None
    path = os.path.join(workdir, "wandb_run_id")
    if os.path.exists(path):
        with open(path) as f:
            return f.read().strip()
    run_id = uuid.uuid4().hex[:8]
    with open(path, "w") as f:
        f.write(run_id + "\n")
    return run_id


class WandbRun:
    """One W&B run for a training run (create it on process 0 only)."""

    def __init__(self, project: str, config: Any, workdir: str):
        import wandb

        self._wandb = wandb
        local = "://" not in workdir  # wandb writes through the local file system only
        run_id = _run_id(workdir)
        try:
            self.run = wandb.init(
                project=project, name=os.path.basename(workdir.rstrip("/")), id=run_id, resume="allow",
                dir=workdir if local else None, config=json.loads(config.to_json()),
            )
        except wandb.errors.Error as e:  # no account, no network, a bad project name: the user's to fix
            raise ValueError(f"Weights & Biases did not start ({type(e).__name__}: {e}); run `wandb login`, or "
                             "set WANDB_MODE=offline to log to local files") from None
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        self.last_step = 0

    def log(self, record: dict) -> None:
        self.run.log(record)
        self.last_step = record.get("step", self.last_step)

    def finish(self, loss_curve: str | None) -> None:
        """Logs loss.png (if there is one) and closes the run."""
        if loss_curve is not None:
            self.run.log({"step": self.last_step, "loss_curve": self._wandb.Image(loss_curve)})
        self.run.finish()
