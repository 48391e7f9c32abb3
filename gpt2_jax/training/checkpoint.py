"""Checkpoints with orbax: async saves, keep-N, restore onto any mesh, skip bad checkpoints.

The layout of `WORKDIR/checkpoints/` and every read of it are gpt2_jax/checkpoints.py's; this module
writes it (and records each finished step's file sizes in `<step>.sizes.json`).

Orbax writes each step into a temporary folder and renames it when complete, so a process killed
mid-save leaves a temporary folder, never a step that looks whole. (On Cloud Storage, which has no
rename, it writes the step folder in place and marks it complete with a `commit_success.txt` last;
a step folder without one is a save that never finished, and is ignored the same way.) Restoring
walks back from the newest step and skips (and names) any that is incomplete, truncated or
unreadable. A training run that falls back that way moves each skipped step aside, to
`<step>.corrupt-<UTC time>/` (kept for a look, never deleted), so that its own later saves of those
steps are written normally. A gs:// workdir works the same (gpt2_jax/storage.py).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import sys
import threading
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from gpt2_jax import storage
from gpt2_jax.checkpoints import (  # noqa: F401 - the reader's names, also importable from here
    _COMMITTED,
    ITEMS,
    _sizes_path,
    _steps,
    find_checkpoint_step_dir,
    incomplete_steps,
    newest_meta,
    read,
    read_newest_meta,
    restore_newest_usable,
    restore_params,
    restore_params_at,
    saved_model,
    set_aside,
    verify_step,
)
from gpt2_jax.training import save_failures

# Orbax writes a replicated array "replica-parallel": each replica slices off its part on the device and
# writes it, which pays one compiled slice per array and replica. For arrays whose part is this small (a
# LayerNorm scale, a bias, a step counter) that costs more than one replica writing the whole array, most
# of a small model's save on 8 devices. Larger replicated arrays keep being split.
MIN_REPLICA_PARALLEL_SLICE_BYTES = 1 << 20


@functools.cache  # once per process
def _write_small_replicated_arrays_whole() -> None:
    """Registers orbax's jax.Array handler with MIN_REPLICA_PARALLEL_SLICE_BYTES (the handler is orbax's
    own, with its default array metadata store)."""
    try:
        from orbax.checkpoint._src.metadata.array_metadata_store import Store
    except ImportError:  # another orbax layout: its default handler stays (the same checkpoints, saved slower)
        return
    handler = ocp.type_handlers.ArrayHandler(array_metadata_store=Store(),
                                             min_slice_bytes_for_replica_parallel=MIN_REPLICA_PARALLEL_SLICE_BYTES)
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


class Checkpointer:
    """Saves and restores training checkpoints under `WORKDIR/checkpoints`."""

    def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
        self.directory = storage.absolute(os.path.join(workdir, "checkpoints"))
        incomplete = incomplete_steps(self.directory)
        for name in incomplete:
            logging.warning("checkpoint %s was left incomplete (killed mid-save); it is ignored", name)
        if storage.is_gcs(self.directory) and jax.process_index() == 0:
            # On Cloud Storage orbax writes a step again in the same folder: what a killed save left
            # there would be read as part of the new one (the other processes save steps from now on).
            for name in incomplete:
                storage.rmtree(os.path.join(self.directory, name))
        self._pending: list[int] = []
        self._lock = threading.Lock()
        self._async = async_save
        self._failed = False
        self._warned = False
        self._expected = 0  # bytes the last save started is expected to take
        # How a warning reaches the terminal: the training loop routes it around its progress bar.
        self.say: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)
        self._quiet = save_failures.Quiet()
        self._quiet.install()
        _write_small_replicated_arrays_whole()
        self.manager = ocp.CheckpointManager(
            self.directory,
            item_names=ITEMS,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                create=True,
                enable_async_checkpointing=async_save,
                async_options=ocp.AsyncOptions(post_finalization_callback=self._record_sizes) if async_save else None,
                cleanup_tmp_directories=True,
            ),
        )

    def _record_sizes(self) -> None:
        """Runs after orbax finalises a save (in its thread): records the sizes of finished steps.

        Reads the directory only; calling back into the manager from here would deadlock.
        """
        if jax.process_index() != 0:
            return
        with self._lock:
            self._record_sizes_locked()

    def _record_sizes_locked(self) -> None:
        finished = _steps(self.directory)
        for step in list(self._pending):
            step_dir = os.path.join(self.directory, str(step))
            if step not in finished:
                continue  # still a temporary folder
            sizes = json.dumps(storage.file_sizes(step_dir))
            storage.write_bytes(_sizes_path(self.directory, step), sizes.encode())
            self._pending.remove(step)
        names = storage.listdir(self.directory)
        for name in names:  # size records of steps orbax has deleted
            m = re.fullmatch(r"(\d+)\.sizes\.json", name)
            if m and m.group(1) not in names:
                storage.remove(os.path.join(self.directory, name))

    def poll(self) -> None:
        """Cheap; call once a step: records the sizes of saves that have finished since, and raises
        CheckpointSaveError as soon as one has failed (not at the next save, maybe hours later)."""
        if self._pending and not self.manager.is_saving_in_progress():
            self.wait()

    def _last_size(self) -> int | None:
        """Bytes of the newest checkpoint whose sizes are recorded."""
        steps = [int(m.group(1)) for n in storage.listdir(self.directory)
                 if (m := re.fullmatch(r"(\d+)\.sizes\.json", n))]
        for step in sorted(steps, reverse=True):
            try:
                return sum(json.loads(storage.read_bytes(_sizes_path(self.directory, step))).values())
            except (OSError, ValueError):
                continue
        return None

    def _need(self, state: Any) -> int:
        """What the next checkpoint will take: as much as the last one, or the state's arrays for a first."""
        return self._last_size() or save_failures.state_bytes(state)

    def check_space(self, step: int, state: Any) -> None:
        """Says (once, on stderr) when the disk has less room than a checkpoint of `state` takes."""
        if self._warned or jax.process_index() != 0:
            return
        line = save_failures.space_warning(step, self._need(state), self.directory)
        if line is not None:
            self.say(line)
            self._warned = True

    def _fail(self, step: int, error: BaseException, need: int) -> save_failures.CheckpointSaveError:
        """Marks this checkpointer failed and returns the error naming the step (the oldest unfinished one)."""
        self._failed = True
        with self._lock:
            step = min([*self._pending, step])
            self._pending.clear()
        kept = [s for s in self.manager.all_steps() if s < step]
        return save_failures.failure(step, error, self.directory, need, max(kept) if kept else None)

    def all_steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
        """Starts writing a checkpoint of `state` (a TrainState); returns before it is on disk.

        CheckpointSaveError (one line) if this save, or an earlier one still being written, fails; a
        step that exists is never written over (orbax would rewrite its metadata before refusing).
        """
        if step in self.manager.all_steps():
            raise save_failures.CheckpointSaveError(
                f"checkpoint at step {step} not saved: {os.path.join(self.directory, str(step))} already exists")
        self.check_space(step, state)
        need = self._expected = self._need(state)
        with self._lock:
            self._pending.append(step)
        try:
            saved = self._save(step, state, data_state, meta)
        except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many types
            raise self._fail(step, e, need) from e
        if not saved:
            with self._lock:
                self._pending.remove(step)
        if not self._async:
            self._record_sizes()

    def _save(self, step: int, state: Any, data_state: dict, meta: dict) -> bool:
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                train_state=ocp.args.StandardSave(
                    {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}
                ),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave({**meta, "step": int(step)}),
            ),
            force=True,
        )

    def wait(self) -> None:
        """Blocks until the saves under way are on disk; CheckpointSaveError if one failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._fail(max(self._pending, default=0), e, self._expected) from e
        self._record_sizes()
        if jax.process_index() != 0:  # only process 0 records sizes (and so clears what it waited for)
            with self._lock:
                self._pending.clear()

    def close(self) -> None:
        try:
            if not self._failed:
                self.wait()
                self.manager.close()
                return
            with contextlib.suppress(Exception):  # the failure that ended the run has been raised already
                self.manager.close()
        finally:
            if not self._failed:
                self._quiet.uninstall()

    def read_meta(self, step: int) -> dict:
        return read(self.manager, step, meta=ocp.args.JsonRestore())["meta"]

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict, dict] | None:
        """(state, data_state, meta) of the newest good checkpoint, or None if there is no checkpoint.

        `abstract_state` is a TrainState of jax.ShapeDtypeStruct with shardings: each device reads
        only its own shards, whatever mesh the checkpoint was written from. ValueError if there are
        checkpoints but none is usable.
        """
        steps = self.all_steps()
        if not steps:
            return None
        result, problems = restore_newest_usable(
            self.directory, steps, lambda step: self._restore(step, abstract_state), move_aside=jax.process_index() == 0
        )
        if result is None:
            raise ValueError(f"no usable checkpoint in {self.directory}: " + "; ".join(problems))
        if problems:  # process 0 has moved the skipped steps aside: every process forgets them
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("gpt2_jax: unusable checkpoints moved aside")
            self.manager.reload()
        return result

    def _restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        restored = read(
            self.manager, step,
            params=ocp.args.StandardRestore(abstract_state.params),
            train_state=ocp.args.StandardRestore(
                {"step": abstract_state.step, "opt_state": abstract_state.opt_state, "rng": abstract_state.rng}
            ),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
        )
        ts = restored["train_state"]
        state = abstract_state.replace(
            step=ts["step"], params=restored["params"], opt_state=ts["opt_state"], rng=ts["rng"]
        )
        return state, restored["data"], restored["meta"]


