"""The run's config blocks as typed, frozen dataclasses: `TrainConfig` (config.train), `MeshConfig`
(config.mesh) and `DataConfig` (config.data), as `ModelConfig` is config.model.

Each is built once from its ml_collections block (`TrainConfig.of(config.train)`; a block already typed
is returned as it is) and checked there by its one `validate()`, which holds every check of that block
alone and raises ValueError naming the key, its value and the rule. Checks that need more than the
block stay where that is known: the batch against the mesh (sharding.py), the mesh against the devices
(sharding.make_mesh), document masking against the vocabulary (run.py), the step count of a run by
epochs (trainer.py). The fields and their defaults are the schema: configs/base.py builds its blocks
from them, so the two cannot disagree. Fields read as attributes or, as ml_collections blocks did, by
key (`t["learning_rate"]`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

from gpt2_jax.training import wandb_log

OPTIMIZERS = ("adamw", "muon")
LR_SCHEDULES = ("cosine", "wsd")
RESUME_SCHEDULES = ("keep", "replan")
# Peak learning rates of the AdamW groups besides learning_rate (None = learning_rate), and Muon's.
GROUP_RATE_KEYS = ("embed_learning_rate", "head_learning_rate", "scalar_learning_rate", "muon_learning_rate")


class _Block:
    """What the three blocks share: built from a block, read by key, copied with changes."""

    @classmethod
    def of(cls, block: Any):
        """The typed, checked block: from an ml_collections ConfigDict, a dict, or one already typed."""
        if isinstance(block, cls):
            return block
        values = block.to_dict() if hasattr(block, "to_dict") else dict(block)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names}).validate()

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def __contains__(self, key: str) -> bool:
        return key in {f.name for f in dataclasses.fields(self)}

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes).validate()


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def check_document_mask_flag(value: Any) -> None:
    """config.data.document_mask must be a bool (DataConfig, and build_run's own argument)."""
    _need(isinstance(value, bool), f"config.data.document_mask={value!r} must be True or False")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class TrainConfig(_Block):
    """config.train: the optimizer, its schedule, the loop's cadence, and watching a run."""

    num_steps: int = 1000  # optimizer steps; ignored when num_epochs > 0
    num_epochs: int = 0  # > 0: train this many passes over the training windows instead
    global_batch_size: int = 8  # sequences per optimizer step, over all devices and hosts
    grad_accum_steps: int = 1  # micro-batches per step: each is global_batch_size / grad_accum_steps
    optimizer: str = "adamw"  # 'adamw' (GPT-2) | 'muon': Muon on the blocks' matrices, AdamW on the rest
    learning_rate: float = 6e-4  # peak, reached after warmup (AdamW's, for every group left at None below)
    min_lr: float = 6e-5  # end of the decay; every group's rate shrinks by the same factor min_lr / learning_rate
    warmup_steps: int = 100
    lr_schedule: str = "cosine"  # 'cosine' | 'wsd' (warmup, stable at the peak, linear decay at the end)
    decay_fraction: float = 0.2  # wsd only: the decay takes this last fraction of the steps
    # Peak rates of the AdamW groups (training/optim.py); None = learning_rate.
    embed_learning_rate: float | None = None  # wte, wpe
    head_learning_rate: float | None = None  # an untied lm_head
    scalar_learning_rate: float | None = None  # biases, norm gains
    # optimizer='muon': the blocks' q, k/v, attention out and MLP kernels, each orthogonalised as the
    # matrix it is (layers, and k apart from v, are separate matrices).
    muon_learning_rate: float = 0.02
    muon_momentum: float = 0.95  # Nesterov momentum before the orthogonalisation
    muon_weight_decay: float = 0.0  # decoupled, times muon_learning_rate (AdamW groups use weight_decay)
    muon_split_heads: bool = False  # True: orthogonalise each head's slice of q, k, v and out on its own
    weight_decay: float = 0.1  # on matmul kernels and embeddings only (not biases, not LayerNorm)
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clipping; 0 disables
    seed: int = 0  # params init, data order and dropout all derive from it
    eval_every: int = 200  # steps; 0 disables periodic eval
    eval_steps: int = 20  # global batches per eval, run as grad_accum_steps micro-batches each
    log_every: int = 10  # steps between metrics.jsonl records
    checkpoint_every: int = 500  # steps; a checkpoint is also written at the end
    keep_checkpoints: int = 3
    skip_nonfinite_updates: bool = False  # True: a NaN/Inf loss skips the update instead of stopping
    peak_flops_per_device: float = 0.0  # for MFU; 0 = known TPU/GPU peak, or a fixed CPU reference (trainer.py)
    sample_tokens: int = 64  # tokens sampled from the model at the end of training; 0 disables
    sample_prompt: str = ""  # '' = the first line of the training data
    # On resume: 'keep' follows the checkpoint's learning-rate schedule (length, warmup, peak, floor),
    # so a longer num_steps goes on at min_lr; 'replan' plans it from this config (training/resume.py).
    resume_schedule: str = "keep"
    # Watching a run (README "Watching a run"); each is off by default.
    profile_start: int = 0  # the first step of a jax.profiler trace into WORKDIR/profile (steps count from 1)
    profile_steps: int = 0  # how many steps it traces, left out of tokens_per_s and mfu; 0 = no trace
    hellaswag: str = ""  # HellaSwag's validation jsonl: hellaswag_acc / hellaswag_acc_norm at each eval; '' = off
    hellaswag_examples: int = 0  # score its first N examples (10,042 in all; ~1000 is a cheap signal); 0 = all
    wandb_project: str = ""  # log to this Weights & Biases project too (pip install -e ".[wandb]"); '' = off


    def validate(self) -> TrainConfig:
        """Returns self, or raises ValueError naming the key, its value and the rule it broke."""
        # The learning-rate schedule (training/optim.py). warmup_steps > num_steps is allowed: a short
        # (smoke-test) run then ends inside the warmup.
        _need(_is_int(self.warmup_steps) and self.warmup_steps >= 0,
              f"config.train.warmup_steps={self.warmup_steps!r} must be a non-negative integer")
        peak, floor = float(self.learning_rate), float(self.min_lr)
        _need(peak > 0, f"config.train.learning_rate={peak} must be > 0")
        _need(0.0 <= floor <= peak, f"config.train.min_lr={floor} must be in [0, learning_rate={peak}]")
        _need(self.lr_schedule in LR_SCHEDULES,
              f"config.train.lr_schedule={self.lr_schedule!r} must be one of {LR_SCHEDULES}")
        _need(0.0 < self.decay_fraction <= 1.0, f"config.train.decay_fraction={self.decay_fraction} must be in (0, 1]")
        for key in GROUP_RATE_KEYS:
            rate = self[key]
            _need(rate is None or float(rate) >= 0, f"config.train.{key}={rate} must be >= 0 (None = learning_rate)")
        # The optimizer.
        _need(self.grad_clip >= 0, f"config.train.grad_clip={self.grad_clip} must be >= 0 (0 disables clipping)")
        _need(self.optimizer in OPTIMIZERS, f"config.train.optimizer={self.optimizer!r} must be one of {OPTIMIZERS}")
        _need(0.0 <= self.muon_momentum < 1.0, f"config.train.muon_momentum={self.muon_momentum} must be in [0, 1)")
        # The batch, resuming, and watching a run (each module's check, run here).
        _need(_is_int(self.grad_accum_steps) and self.grad_accum_steps >= 1,
              f"config.train.grad_accum_steps={self.grad_accum_steps!r} must be a positive integer")
        _need(self.resume_schedule in RESUME_SCHEDULES,
              f"config.train.resume_schedule={self.resume_schedule!r} must be one of {RESUME_SCHEDULES}")
        # Watching a run: the profiler's window (profiling.py), HellaSwag at each eval, W&B.
        for key in ("profile_start", "profile_steps"):
            _need(_is_int(self[key]) and self[key] >= 0,
                  f"config.train.{key}={self[key]!r} must be an integer >= 0 (0 = no profile)")
        _need(self.profile_steps == 0 or self.profile_start >= 1,
              f"config.train.profile_start={self.profile_start} must be >= 1 (the first step to trace; steps "
              f"count from 1) when profile_steps={self.profile_steps}")
        n = self.hellaswag_examples
        _need(_is_int(n) and n >= 0,
              f"config.train.hellaswag_examples={n!r} must be an integer >= 0 (0 = every example)")
        if self.hellaswag:
            _need(os.path.isfile(self.hellaswag),
                  f"config.train.hellaswag={self.hellaswag!r}: no such file (HellaSwag's validation jsonl)")
            _need(self.eval_every > 0 and self.eval_steps > 0,
                  f"config.train.hellaswag is scored at each eval, but eval_every={self.eval_every}, "
                  f"eval_steps={self.eval_steps} runs none: set both > 0")
        project = self.wandb_project
        _need(isinstance(project, str), f"config.train.wandb_project={project!r} must be a W&B project name ('' = off)")
        _need(not project or importlib.util.find_spec("wandb") is not None,
              f"config.train.wandb_project={project!r} needs wandb, which is not installed: {wandb_log.INSTALL}, "
              "or set config.train.wandb_project=''")
        return self


@dataclasses.dataclass(frozen=True)
class MeshConfig(_Block):
    """config.mesh: data x fsdp x tensor must equal the device count (-1 = all remaining)."""

    data: int = -1  # replicate parameters, split the batch
    fsdp: int = 1  # shard parameters and optimizer state (ZeRO-3), split the batch
    tensor: int = 1  # split attention heads and MLP columns
    # TPU slices joined by the data-centre network (multi-slice): data, fsdp and tensor above are per
    # slice, and the data axis also spans the slices (only data parallelism crosses the slow link).
    # `train.py --preflight --topology v5e-16 --slices 2` compiles such a run.
    slices: int = 1

    def validate(self) -> MeshConfig:
        _need(_is_int(self.slices) and self.slices >= 1,
              f"config.mesh.slices={self.slices!r} must be a positive integer (TPU slices joined by the "
              "data-centre network; 1 = one slice)")
        for axis in ("data", "fsdp", "tensor"):
            size = self[axis]
            _need(_is_int(size) and (size >= 1 or size == -1),
                  f"config.mesh.{axis}={size!r} must be a positive integer or -1 (all remaining devices)")
        fill = [axis for axis in ("data", "fsdp", "tensor") if self[axis] == -1]
        shown = " x ".join(f"{axis}={self[axis]}" for axis in ("data", "fsdp", "tensor"))
        _need(len(fill) <= 1, f"config.mesh: at most one axis may be -1, got {shown} ({', '.join(fill)} are -1)")
        return self


@dataclasses.dataclass(frozen=True)
class DataConfig(_Block):
    """config.data: where the training and validation tokens come from."""

    # 'builtin:shakespeare' | a .txt file | a .jsonl or .parquet file (its "text" field) | a folder or glob
    # of those | a `datasets` save_to_disk folder | llm.c/modded-nanogpt .bin token shards | a folder
    # `python -m gpt2_jax.data.prepare` wrote; local or gs:// (gpt2_jax/data/sources.py)
    source: str = "builtin:shakespeare"
    val_source: str = ""  # optional separate validation source; '' = hold out val_fraction of source
    val_fraction: float = 0.05
    cache_dir: str = "~/.cache/gpt2_jax"  # prepared (tokenised) corpora are kept here and reused
    # True: a window's tokens attend only to earlier tokens of their own document, and positions restart at
    # 0 at each document's <|endoftext|> (which begins it); training and evaluation alike. Needs the GPT-2
    # vocabulary (the EOT id). See gpt2_jax/data/documents.py.
    document_mask: bool = False

    def validate(self) -> DataConfig:
        check_document_mask_flag(self.document_mask)
        _need(bool(self.val_source) or 0.0 < self.val_fraction < 1.0,
              f"config.data.val_fraction={self.val_fraction} must be in (0, 1) when no val_source is set")
        return self
