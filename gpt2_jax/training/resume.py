"""What a resumed run takes from its checkpoint when the config asks for something else, and the
one line that says so.

The learning-rate schedule. A resumed run follows the schedule it was planned with: its length,
warmup, peak and floor are saved in every checkpoint (meta "schedule") and win over config.train.
Extending a run (a larger num_steps) therefore goes on at min_lr after the planned end, instead of
starting a new cosine whose learning rate jumps back up, and an interrupted run resumes exactly.
config.train.resume_schedule='replan' plans the schedule from the config instead, on purpose.
Either way a difference between the config and the checkpoint is named in one line.

The batch. A different global_batch_size is used as asked; the data goes on in the same epoch from
the first window the run has not seen (data/batches.py `rebatch_state`), and one line says so.

The step count. Asking for fewer steps than the checkpoint has done is an error; asking for exactly
as many trains nothing and says so.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from gpt2_jax.data.batches import rebatch_state
from gpt2_jax.model.config import ModelConfig
from gpt2_jax.training.optim import make_schedule
from gpt2_jax.training.run_config import RESUME_SCHEDULES, TrainConfig  # noqa: F401 - also importable from here

# The config.train keys make_schedule reads, besides the schedule's length (num_steps).
SCHEDULE_KEYS = ("learning_rate", "min_lr", "warmup_steps", "lr_schedule", "decay_fraction")
# What checkpoints written before a key existed followed.
_SCHEDULE_DEFAULTS = {"lr_schedule": "cosine"}


@dataclasses.dataclass(frozen=True)
class SchedulePlan:
    train_cfg: Any  # config.train, with the checkpoint's schedule keys where they are kept
    num_steps: int  # the schedule's length
    note: str | None  # the line to print, when the config and the checkpoint differ

    def to_meta(self) -> dict:
        """What a checkpoint records of the schedule, for the next resume."""
        return _schedule_of(self.train_cfg, self.num_steps)


def _schedule_of(train_cfg: Any, num_steps: int) -> dict:
    """The keys that shape a schedule; decay_fraction only where it does (wsd), so a cosine run does not
    differ from its checkpoint by a key it never read."""
    s = {"num_steps": num_steps, **{k: train_cfg[k] for k in SCHEDULE_KEYS}}
    if s["lr_schedule"] != "wsd":
        s.pop("decay_fraction")
    return s


def _normal(saved: dict) -> dict:
    s = {**_SCHEDULE_DEFAULTS, **saved}
    if s["lr_schedule"] != "wsd":
        s.pop("decay_fraction", None)
    return s


def saved_schedule(meta: dict) -> dict | None:
    """The schedule a checkpoint's run followed; for checkpoints older than meta["schedule"], what its
    config says (None when that cannot be known: a run planned in epochs)."""
    if "schedule" in meta:
        return _normal(meta["schedule"])
    train = meta.get("config", {}).get("train")
    if not train or train.get("num_epochs", 0) > 0:
        return None
    return _normal({"num_steps": train["num_steps"], **{k: train[k] for k in SCHEDULE_KEYS if k in train}})


def plan_schedule(saved_meta: dict | None, train_cfg: Any, num_steps: int) -> SchedulePlan:
    """The schedule this run follows: the config's for a new run, else as the module docstring says."""
    train_cfg = TrainConfig.of(train_cfg)  # checked there (run_config.py)
    mode = train_cfg.resume_schedule
    wanted = _schedule_of(train_cfg, num_steps)
    saved = saved_schedule(saved_meta) if saved_meta else None
    if saved is None or saved == wanted:
        return SchedulePlan(train_cfg, num_steps, None)
    step = int(saved_meta["step"])
    kept_cfg = _with(train_cfg, saved)
    lr_kept = float(make_schedule(kept_cfg, saved["num_steps"])(step))
    lr_replanned = float(make_schedule(train_cfg, num_steps)(step))
    keys = list(dict.fromkeys([*wanted, *saved]))
    changes = ", ".join(f"{k} {saved.get(k, '-')} -> {wanted.get(k, '-')}" for k in keys
                        if saved.get(k) != wanted.get(k))
    if mode == "replan":
        return SchedulePlan(train_cfg, num_steps, (
            f"resume: learning-rate schedule re-planned from the config (config.train.resume_schedule='replan'; "
            f"checkpoint -> config: {changes}): lr at step {step + 1} is {lr_replanned:.3g}, the checkpoint's plan "
            f"had {lr_kept:.3g}"
        ))
    floor_from = max(saved["num_steps"], saved["warmup_steps"] + 1) + 1  # the first step logged at min_lr
    after_end = f"; from step {floor_from} on it stays at min_lr={saved['min_lr']:g}" if num_steps >= floor_from else ""
    return SchedulePlan(kept_cfg, saved["num_steps"], (
        f"resume: the learning-rate schedule stays the checkpoint's ({_describe(saved)}), not the config's "
        f"({changes}): lr at step {step + 1} is {lr_kept:.3g}{after_end}. "
        f"config.train.resume_schedule='replan' would re-plan it (lr {lr_replanned:.3g} at step {step + 1})"
    ))


def check_optimizer(saved_meta: dict, train_cfg: Any, directory: str) -> None:
    """ValueError if the checkpoint's optimizer is not config.train.optimizer: its state (Muon's
    momentum or AdamW's moments) cannot carry over. Checkpoints from before the key were AdamW."""
    saved = saved_meta.get("config", {}).get("train", {}).get("optimizer", "adamw")
    if saved != train_cfg.optimizer:
        raise ValueError(
            f"cannot resume: the checkpoint in {directory} was trained with optimizer {saved!r}, but "
            f"config.train.optimizer={train_cfg.optimizer!r}; its optimizer state cannot carry over. Give another "
            f"--workdir with --config.model.init_from={os.path.dirname(directory)} to keep only its weights"
        )


def data_state_for(saved_state: dict, global_batch_size: int) -> tuple[dict, str | None]:
    """The checkpoint's data position for batches of `global_batch_size`, and a line when that changed."""
    old = saved_state.get("global_batch_size", global_batch_size)
    if old == global_batch_size:
        return saved_state, None
    state = rebatch_state(saved_state, global_batch_size)
    epoch_steps = state["num_windows"] // global_batch_size
    epoch, batch = divmod(state["step"], epoch_steps)
    return state, (
        f"resume: global_batch_size {old} -> {global_batch_size} (checkpoint -> config): the data goes on at "
        f"window {batch * global_batch_size} of epoch {epoch}'s order, in batches of {global_batch_size}"
    )


def check_steps(start_step: int, num_steps: int, train_cfg: Any, directory: str) -> str | None:
    """ValueError if the checkpoint is past num_steps; the line to print if it is exactly there."""
    asked = (f"config.train.num_epochs={train_cfg.num_epochs} ({num_steps} steps)" if train_cfg.num_epochs > 0
             else f"config.train.num_steps={num_steps}")
    if start_step > num_steps:
        raise ValueError(
            f"the checkpoint in {directory} is at step {start_step}, past {asked}: nothing to train. "
            f"Ask for more steps to go on with this run, or give another --workdir for a new one"
        )
    if start_step == num_steps:
        return f"nothing to train: the checkpoint in {directory} is already at step {start_step} ({asked})"
    return None


def _with(train_cfg: Any, schedule: dict) -> TrainConfig:
    """config.train with the schedule's keys (and num_steps) set from `schedule`."""
    return TrainConfig.of(train_cfg).replace(**schedule)


def _describe(s: dict) -> str:
    shape = f"wsd with decay_fraction {s['decay_fraction']:g}, " if s["lr_schedule"] == "wsd" else ""
    return (f"{shape}{s['num_steps']} steps, warmup {s['warmup_steps']}, learning_rate {s['learning_rate']:g} "
            f"to min_lr {s['min_lr']:g}")


# Keys that may differ between a checkpoint and the config resuming it: they change how the
# model is computed, not what its parameters are.
RESUMABLE_MODEL_CHANGES = frozenset({"dropout", "dtype", "remat", "scan_layers", "attention", "zero_init_proj",
                                      "loss_chunk"})


def check_model_matches(saved: dict, config: ModelConfig) -> None:
    current = config.to_dict()
    differing = sorted(
        k for k in set(saved) | set(current)
        if k not in RESUMABLE_MODEL_CHANGES and saved.get(k) != current.get(k)
    )
    if differing:
        detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs config {current.get(k)!r}" for k in differing)
        raise ValueError(f"cannot resume: the model in the checkpoint differs from config.model in {detail}")
