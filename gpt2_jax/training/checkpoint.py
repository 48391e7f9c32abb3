"""Checkpoints with orbax: async saves, keep-N, restore onto any mesh, skip bad checkpoints.

Layout of `WORKDIR/checkpoints/<step>/` (one orbax CheckpointManager step):
  params/       the model parameters (restorable alone, e.g. by generate.py)
  train_state/  step, optimizer state and RNG
  data/         the data iterator's position (JSON)
  meta/         the model config, the full training config and the step (JSON)
and `WORKDIR/checkpoints/<step>.sizes.json`, written once a save is finalised: the size of every
file, so a truncated file is noticed before orbax reads garbage.

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

import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from gpt2_jax import storage
from gpt2_jax.model.config import ModelConfig
from gpt2_jax.training import save_failures

ITEMS = ("params", "train_state", "data", "meta")


def _sizes_path(directory: str, step: int) -> str:
    return os.path.join(directory, f"{step}.sizes.json")


_COMMITTED = "commit_success.txt"  # orbax's mark of a finished save, where it cannot rename (Cloud Storage)


def _steps(directory: str) -> list[int]:
    """The steps whose folders are in `directory` (on Cloud Storage: whose saves finished)."""
    names = [n for n in storage.listdir(directory) if n.isdigit()]
    if storage.is_gcs(directory):
        names = [n for n in names if storage.exists(os.path.join(directory, n, _COMMITTED))]
    return [int(n) for n in names]


def verify_step(directory: str, step: int) -> str | None:
    """None if the step folder matches its recorded file sizes, else what is wrong."""
    step_dir = os.path.join(directory, str(step))
    sizes_file = _sizes_path(directory, step)
    if not storage.exists(sizes_file):
        return None  # finalised by orbax but killed before the sizes were written: orbax's own check only
    try:
        want = json.loads(storage.read_bytes(sizes_file))
    except (OSError, ValueError) as e:
        return f"its size record {sizes_file} is unreadable ({e})"
    have = storage.file_sizes(step_dir)
    for rel, size in want.items():
        if rel not in have:
            return f"file {rel} is missing"
        if have[rel] != size:
            return f"file {rel} has {have[rel]} bytes, {size} were written"
    return None


def incomplete_steps(directory: str) -> list[str]:
    """Names of temporary step folders left by a save that never finished."""
    if not storage.isdir(directory):
        return []
    names = storage.listdir(directory)
    if storage.is_gcs(directory):
        return sorted(n for n in names if n.isdigit() and not storage.exists(os.path.join(directory, n, _COMMITTED)))
    return sorted(n for n in names if re.search(r"orbax-checkpoint-tmp", n))


def _failure(error: Exception) -> str:
    text = str(error).splitlines()[0][:300] if str(error) else ""
    return f"{type(error).__name__}: {text}"


def _restore_checked(directory: str, step: int, restore: Callable[[int], Any]) -> tuple[Any, str | None]:
    """(restore(step), None), or (None, what is wrong) if the step's files or its restore are bad."""
    problem = verify_step(directory, step)
    if problem is not None:
        return None, problem
    try:
        return restore(step), None
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many types for bad bytes
        return None, _failure(e)


def set_aside(directory: str, step: int) -> str:
    """Renames the step folder (and its size record) to `<step>.corrupt-<UTC time>`; returns the new path.

    Orbax sees only folders named by a number, so the step is free to be saved again. (On Cloud
    Storage a copy, then a deletion: a run killed meanwhile leaves the step to be set aside again.)
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = os.path.join(directory, f"{step}.corrupt-{stamp}")
    n = 1
    while storage.exists(target):  # set aside twice within a second
        n += 1
        target = os.path.join(directory, f"{step}.corrupt-{stamp}-{n}")
    storage.rename(os.path.join(directory, str(step)), target)
    if storage.exists(_sizes_path(directory, step)):
        storage.rename(_sizes_path(directory, step), target + ".sizes.json")
    return target


def restore_newest_usable(directory: str, steps: list[int], restore: Callable[[int], Any], *,
                          move_aside: bool = False) -> tuple[Any, list[str]]:
    """Tries `restore(step)` from the newest step back; returns (result or None, problems met).

    A step whose files do not match their recorded sizes, or whose restore raises, is skipped in
    favour of the previous one; once a step restores, one line on stderr names what was skipped,
    why, and the step used. With `move_aside` the skipped steps are also moved aside (`set_aside`),
    but only once an older step has restored: when none does, nothing is touched.
    """
    problems, skipped = [], []
    for step in sorted(steps, reverse=True):
        result, problem = _restore_checked(directory, step, restore)
        if problem is None:
            if problems:
                done = "skipped"
                if move_aside:
                    done = "moved aside to " + ", ".join(os.path.basename(set_aside(directory, s)) for s in skipped)
                print(f"checkpoint {'; '.join(problems)}: unusable, {done}; using step {step}",
                      file=sys.stderr, flush=True)
            return result, problems
        problems.append(f"step {step} ({problem})")
        skipped.append(step)
    return None, problems


def read_newest_meta(directory: str) -> dict | None:
    """The meta (model, config, schedule, step) of the newest checkpoint in `directory` whose meta
    reads, or None if there is none. Creates nothing; a step that turns out unusable is named later,
    by the restore."""
    if not storage.isdir(directory):
        return None
    steps = sorted(_steps(directory), reverse=True)
    if not steps:
        return None
    options = ocp.CheckpointManagerOptions(create=False)  # read_only=True would log three warnings
    with ocp.CheckpointManager(directory, item_names=ITEMS, options=options) as manager:
        for step in steps:
            if verify_step(directory, step) is not None:
                continue  # a truncated step: the restore names it and walks back past it
            try:
                return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            except Exception:  # noqa: BLE001 - an unreadable step: the restore walks back past it
                continue
    return None


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
            try:
                self.manager.close()
            except Exception:  # noqa: BLE001 - the failure that ended the run has been raised already
                pass
        finally:
            if not self._failed:
                self._quiet.uninstall()

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict, dict] | None:
        """(state, data_state, meta) of the newest good checkpoint, or None if there is no checkpoint.

        `abstract_state` is a TrainState of jax.ShapeDtypeStruct with shardings: each device reads
        only its own shards, whatever mesh the checkpoint was written from. ValueError if there are
        checkpoints but none is usable.
        """
        steps = self.all_steps()
        if not steps:
            return None
        result, problems = restore_newest_usable(self.directory, steps, lambda step: self._restore(step, abstract_state),
                                                 move_aside=jax.process_index() == 0)
        if result is None:
            raise ValueError(f"no usable checkpoint in {self.directory}: " + "; ".join(problems))
        if problems:  # process 0 has moved the skipped steps aside: every process forgets them
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("gpt2_jax: unusable checkpoints moved aside")
            self.manager.reload()
        return result

    def _restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_state.params),
                train_state=ocp.args.StandardRestore(
                    {"step": abstract_state.step, "opt_state": abstract_state.opt_state, "rng": abstract_state.rng}
                ),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        ts = restored["train_state"]
        state = abstract_state.replace(
            step=ts["step"], params=restored["params"], opt_state=ts["opt_state"], rng=ts["rng"]
        )
        return state, restored["data"], restored["meta"]


def find_checkpoint_step_dir(path: str) -> tuple[str, int | None]:
    """Resolves a user's --ckpt path: a workdir, its checkpoints/ folder, or one step folder.

    Returns (checkpoints directory, step or None for "newest good one").
    """
    path = storage.absolute(path)
    if not storage.exists(path):
        raise FileNotFoundError(f"checkpoint path {path} does not exist")
    if not storage.isdir(path):
        raise ValueError(f"checkpoint path {path} is a file, not a training workdir or checkpoint folder")
    if storage.isdir(os.path.join(path, "meta")) and storage.isdir(os.path.join(path, "params")):
        parent, name = os.path.split(path)
        if name.isdigit():
            return parent, int(name)
        raise ValueError(f"{path} looks like a checkpoint but its folder name is not a step number")
    if storage.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    steps = [s for s in _steps(path) if storage.isdir(os.path.join(path, str(s), "params"))]
    if not steps:
        if not storage.listdir(path):
            raise FileNotFoundError(f"checkpoint folder {path} is empty")
        raise ValueError(
            f"{path} is not a checkpoint: expected a training workdir (with checkpoints/), "
            "a checkpoints/ folder or one step folder (with params/ and meta/)"
        )
    return path, None


def newest_meta(path: str) -> tuple[str, int, dict]:
    """(checkpoints directory, step, meta) of the checkpoint a --ckpt-style `path` names: its step
    folder, or the newest step of a workdir whose files check out and whose meta reads."""
    directory, step = find_checkpoint_step_dir(path)
    steps = [step] if step is not None else _steps(directory)
    with _reader(directory) as mngr:

        def read(s: int) -> tuple[int, dict]:
            return s, mngr.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

        result, problems = restore_newest_usable(directory, steps, read)
    if result is None:
        raise ValueError(f"no usable checkpoint in {directory}: " + "; ".join(problems))
    return directory, *result


def saved_model(workdir: str) -> dict | None:
    """The model config (a dict) of a training workdir's newest usable checkpoint; None if it has none."""
    directory = os.path.join(storage.absolute(workdir), "checkpoints")
    if not storage.isdir(directory) or not _steps(directory):
        return None
    return newest_meta(directory)[2]["model"]


def restore_params_at(directory: str, step: int, abstract_params: Any) -> Any:
    """The parameters of checkpoint `step` in `directory`, restored straight into the shardings of
    `abstract_params` (jax.ShapeDtypeStruct leaves with .sharding), from whatever mesh wrote them."""
    with _reader(directory) as mngr:
        return mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params)))["params"]


def _reader(directory: str) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(directory, item_names=ITEMS, options=ocp.CheckpointManagerOptions(read_only=True))


def restore_params(path: str, *, dtype: str | None = None) -> tuple[ModelConfig, Any]:
    """(ModelConfig, params) from a checkpoint, rebuilt from the checkpoint alone (no config file).

    `path` is a training workdir (newest good checkpoint), its checkpoints/ folder or a step folder.
    Params land on the default device, replicated; `dtype` casts them (e.g. 'bfloat16').
    """
    import jax.numpy as jnp

    from etils import epath

    directory, step = find_checkpoint_step_dir(path)
    options = ocp.CheckpointManagerOptions(create=False)  # reads only; read_only=True would log three warnings
    with ocp.CheckpointManager(directory, item_names=ITEMS, options=options) as mngr:

        def restore(s: int) -> tuple[ModelConfig, Any]:
            meta = mngr.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            # The attention kernel is this machine's choice, not the model's: a run saved with 'splash'
            # on a TPU is read back with 'auto' (same numerics).
            config = ModelConfig.from_dict({**meta["model"], "attention": "auto"})
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            # Shapes and dtypes as saved: tracing the model's init for them took ~0.5 s of generate.py's start.
            saved = ocp.StandardCheckpointHandler().metadata(epath.Path(directory) / str(s) / "params")
            shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), saved.tree)
            params = mngr.restore(s, args=ocp.args.Composite(params=ocp.args.StandardRestore(shapes)))["params"]
            if dtype is not None:
                params = jax.tree_util.tree_map(lambda x: x.astype(jnp.dtype(dtype)), params)
                config = config.replace(dtype=dtype, param_dtype=dtype)
            return config, params

        if step is not None:  # a step folder named on purpose: that step or an error, no fallback
            result, problem = _restore_checked(directory, step, restore)
            if problem is not None:
                raise ValueError(f"checkpoint {os.path.join(directory, str(step))} is unusable: {problem}")
            return result
        result, problems = restore_newest_usable(directory, _steps(directory), restore)
    if result is None:
        raise ValueError(f"no usable checkpoint in {directory}: " + "; ".join(problems))
    return result
