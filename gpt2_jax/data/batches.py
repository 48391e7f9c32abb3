"""Batches: ``make_batch_iterator(tokens, ...)`` cuts a token stream into non-overlapping windows of
``block_size + 1`` tokens, shuffles them afresh every epoch, and yields each process's rows of each global
batch. Global batch ``s`` does not depend on the number of processes, so a run can be resumed on a
different number of hosts and still see the same data.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np


def check_enough_tokens(tokens, block_size: int, global_batch_size: int, name: str = "corpus") -> int:
    """The number of ``block_size + 1``-token windows in ``tokens``; ValueError if < one global batch."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be positive, got {global_batch_size}")
    n = len(tokens)
    if n < block_size + 1:
        raise ValueError(
            f"{name} of {n} tokens is shorter than one window of block_size+1={block_size + 1} tokens"
        )
    # Windows start every block_size tokens and overlap by one token: the last target of a window is the
    # first input of the next, so no token is lost as a target.
    num_windows = (n - 1) // block_size
    if num_windows < global_batch_size:
        raise ValueError(
            f"{name} of {n} tokens gives {num_windows} windows of block_size+1={block_size + 1}, "
            f"fewer than global_batch_size={global_batch_size}"
        )
    return num_windows


def _shuffle_seed(seed: int) -> int:
    # grain's shuffle takes a 32-bit seed and adds the epoch to it; hashing the user's seed first keeps
    # seed=1 from replaying seed=0's second epoch.
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    return int(np.random.SeedSequence(seed).generate_state(1, dtype=np.uint32)[0])


@dataclasses.dataclass(frozen=True, eq=False)
class _ReadLocalRows:
    """Global batch of window ids -> this process's rows, as inputs / targets. Reads only those windows."""

    tokens: Any  # 1-D array-like of token ids: np.ndarray, np.memmap or TokenArray
    block_size: int
    row_start: int
    row_stop: int

    def __call__(self, window_ids: np.ndarray) -> dict[str, np.ndarray]:
        t = self.block_size
        rows = np.stack(
            [np.asarray(self.tokens[w * t : w * t + t + 1]) for w in window_ids[self.row_start : self.row_stop]]
        ).astype(np.int32)  # [B_local, T + 1]
        return {"inputs": np.ascontiguousarray(rows[:, :-1]), "targets": np.ascontiguousarray(rows[:, 1:])}


class BatchIterator(grain.DatasetIterator):
    """Yields ``{"inputs", "targets"}`` int32 ``[B_local, block_size]`` batches; checkpointable.

    ``get_state()`` / ``set_state()`` use a small JSON dict keyed on the global step, so a state saved with
    one process count restores with another. Being a ``grain.DatasetIterator``, it also works with
    ``grain.checkpoint.CheckpointHandler`` and orbax.
    """

    def __init__(
        self,
        tokens,
        *,
        block_size: int,
        global_batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        num_epochs: int | None = None,
        prefetch_batches: int = 2,
        name: str = "corpus",
    ):
        self._closed = True  # until super().__init__: lets __del__ -> close() pass if validation raises
        if process_count <= 0 or not 0 <= process_index < process_count:
            raise ValueError(f"need 0 <= process_index < process_count, got {process_index} and {process_count}")
        if global_batch_size % process_count:
            raise ValueError(
                f"global_batch_size={global_batch_size} is not divisible by process_count={process_count}"
            )
        if num_epochs is not None and num_epochs <= 0:
            raise ValueError(f"num_epochs must be positive or None (forever), got {num_epochs}")
        self.num_windows = check_enough_tokens(tokens, block_size, global_batch_size, name)
        self.block_size = block_size
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.seed = seed
        self.steps_per_epoch = self.num_windows // global_batch_size
        self.num_steps = None if num_epochs is None else self.steps_per_epoch * num_epochs

        window_ids = (
            grain.MapDataset.range(self.num_windows)
            .shuffle(seed=_shuffle_seed(seed))  # grain reshuffles each epoch: seed + epoch
            [: self.steps_per_epoch * global_batch_size]  # drop the windows of the partial last batch
            .batch(global_batch_size)  # [GB] window ids of one global step; ids only, no tokens yet
            .repeat(num_epochs)
        )
        row_start = process_index * self.local_batch_size
        batches = window_ids.map(_ReadLocalRows(tokens, block_size, row_start, row_start + self.local_batch_size))
        read_options = grain.ReadOptions(num_threads=min(prefetch_batches, 2), prefetch_buffer_size=prefetch_batches)
        super().__init__(batches.to_iter_dataset(read_options).__iter__())
        self._step = 0

    @property
    def step(self) -> int:
        """The global step of the next batch, counted from the start of epoch 0."""
        return self._step

    @property
    def epoch(self) -> int:
        """The epoch of the next batch."""
        return self._step // self.steps_per_epoch

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._parent)
        self._step += 1
        return batch

    def get_state(self) -> dict[str, int]:
        # The identity fields make restoring into a different corpus / batch layout fail loudly.
        return {
            "step": self._step,
            "seed": self.seed,
            "num_windows": self.num_windows,
            "block_size": self.block_size,
            "global_batch_size": self.global_batch_size,
        }

    def set_state(self, state: dict[str, int]) -> None:
        for key in ("seed", "num_windows", "block_size", "global_batch_size"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"data iterator state has {key}={state[key]} but this iterator has {key}={getattr(self, key)}"
                )
        step = int(state["step"])
        if step < 0 or (self.num_steps is not None and step > self.num_steps):
            raise ValueError(f"data iterator state step={step} is outside [0, {self.num_steps}]")
        self._parent.set_state({"next_index": step})
        self._step = step

    def __str__(self) -> str:
        return f"BatchIterator(step={self._step}, steps_per_epoch={self.steps_per_epoch})"


def rebatch_state(state: dict[str, int], global_batch_size: int) -> dict[str, int]:
    """A ``get_state()`` saved with another global batch size, as the state of an iterator over the same
    windows in batches of ``global_batch_size``.

    An epoch's window order does not depend on the batch size, so the new state is in the same epoch,
    at the first batch that holds no window the old batches have already seen (skipping at most
    ``global_batch_size - 1`` windows of that epoch, or its partial last batch).
    """
    old = state["global_batch_size"]
    if old == global_batch_size:
        return dict(state)
    num_windows = state["num_windows"]
    if global_batch_size <= 0 or num_windows < global_batch_size:
        raise ValueError(f"global_batch_size={global_batch_size} must be in [1, {num_windows}] (the windows)")
    epoch, batch = divmod(state["step"], num_windows // old)
    new_steps_per_epoch = num_windows // global_batch_size
    new_batch = -(-batch * old // global_batch_size)  # ceil: never a window twice in one epoch
    if new_batch >= new_steps_per_epoch:
        epoch, new_batch = epoch + 1, 0
    return {**state, "step": epoch * new_steps_per_epoch + new_batch, "global_batch_size": global_batch_size}


def make_batch_iterator(
    tokens,
    *,
    block_size: int,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    prefetch_batches: int = 2,
    name: str = "corpus",
) -> BatchIterator:
    """This process's batches of ``tokens``: see ``BatchIterator``.

    Windows of ``block_size + 1`` tokens start at multiples of ``block_size``. Each epoch visits every
    window once in a fresh order fixed by ``(seed, epoch)`` and drops a partial last batch. Global batch
    ``s`` is windows ``perm[s*GB:(s+1)*GB]`` of its epoch whatever ``process_count`` is; process ``p``
    reads only rows ``[p*B_local, (p+1)*B_local)`` of it. ``num_epochs=None`` runs forever.
    """
    return BatchIterator(
        tokens,
        block_size=block_size,
        global_batch_size=global_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        num_epochs=num_epochs,
        prefetch_batches=prefetch_batches,
        name=name,
    )
