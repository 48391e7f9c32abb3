"""A checkpoint that cannot be written: one line saying why, no half-written folder, no flood.

When a save fails (most often a full disk), orbax raises in whichever call next waits for it, and
its threads log each failed write with a traceback; asyncio adds an "Event loop is closed" trace for
every write still in flight. Unless the run is verbose (--verbosity given), those are kept off the
terminal: the error that ends the run says it all, in one line. Free space is also checked before
each save against the size of a checkpoint, so that a disk about to fill up is said early (not on
Cloud Storage, which has no free-space figure and no disk to fill).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import sys
import time
from typing import Any

import jax

from gpt2_jax import storage
from gpt2_jax.checkpoints import incomplete_steps

MB = 1 << 20


class CheckpointSaveError(ValueError):
    """A checkpoint could not be written (the message is the one line to print)."""


def state_bytes(state: Any) -> int:
    """What a checkpoint of `state` (a TrainState) holds: its arrays' global sizes."""
    leaves = jax.tree_util.tree_leaves((state.params, state.opt_state))
    return sum(int(x.size) * x.dtype.itemsize for x in leaves if hasattr(x, "dtype"))


def free_bytes(directory: str) -> int | None:
    """Free bytes where `directory` is; None on Cloud Storage."""
    return storage.free_bytes(directory)


def no_space(error: BaseException) -> bool:
    """Whether `error` (or what caused it) is a full disk: an OSError, or tensorstore's RESOURCE_EXHAUSTED."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(error)
        if "No space left on device" in text or "Disk quota exceeded" in text or "os_error_code='28'" in text:
            return True
        error = error.__cause__ or error.__context__
    return False


def _cause(error: BaseException) -> str:
    """The operating system's reason for a failed write where there is one (tensorstore puts it at the
    end of a long message: `...: File too large [os_error_code='27']`), else the error's first line."""
    if isinstance(error, OSError) and error.strerror:
        reason = f"{error.strerror[:1].lower()}{error.strerror[1:]} (errno {error.errno})"
        return reason + (f" writing {error.filename}" if error.filename else "")
    text = str(error)
    found = re.search(r":\s*([^:\[]+?)\s*\[os_error_code='(\d+)'\]", text)
    if found:
        reason = found.group(1)
        return f"{reason[:1].lower()}{reason[1:]} (errno {found.group(2)})"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def _partial(directory: str) -> list[str]:
    """Temporary step folders; on Cloud Storage, step folders that orbax has not marked complete."""
    return incomplete_steps(directory)


def remove_partial(directory: str, *, settle_s: float = 2.0) -> list[str]:
    """Removes the temporary folders of unfinished saves in `directory`; returns their names.

    When one write of a save fails, orbax stops waiting for the others, which may still create files
    for a moment: the folders are removed again until none comes back (at most `settle_s` seconds).
    """
    removed, deadline = set(), time.monotonic() + settle_s
    while names := _partial(directory):
        removed.update(names)
        for name in names:
            storage.rmtree(os.path.join(directory, name))
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    return sorted(removed)


def failure(step: int, error: BaseException, directory: str, need: int, kept: int | None) -> CheckpointSaveError:
    """The error that ends a run whose save of `step` failed, after removing what it left half-written."""
    if jax.process_index() == 0:
        remove_partial(directory)
    free = free_bytes(directory)
    if no_space(error) and free is not None:
        why = f"no space left on device (needs ~{need / MB:.0f} MB, {free / MB:.0f} MB free in {directory})"
    else:
        why = _cause(error)
    after = f"; the checkpoint at step {kept} is intact and a rerun resumes from it" if kept is not None else \
        "; no earlier checkpoint: a rerun starts again from step 0"
    return CheckpointSaveError(f"checkpoint at step {step} not saved: {why}{after}")


def space_warning(step: int, need: int, directory: str) -> str | None:
    """A line when the free space in `directory` is less than a checkpoint of `need` bytes."""
    free = free_bytes(directory)
    if free is None or free >= need:
        return None
    return (f"warning: {free / MB:.0f} MB free in {directory}, but a checkpoint takes ~{need / MB:.0f} MB: the save "
            f"at step {step} will likely fail (no space left on device)")


def verbose() -> bool:
    """Whether library logs are on the terminal: train.py lowers absl's verbosity to WARNING unless asked."""
    from absl import logging as absl_logging

    return absl_logging.get_verbosity() >= absl_logging.INFO


class _OrbaxErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


class _LeftoverWrites(logging.Filter):
    """asyncio's report, when they are garbage-collected, of the writes a failed save left unfinished."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).split("\n", 1)[0].endswith("exception was never retrieved")


class Quiet:
    """While installed and not verbose: orbax's error logs and asyncio's traces of writes cut short are
    dropped. After a failed save it stays installed: those traces keep coming until the process exits."""

    def __init__(self):
        self._filters = {"absl": _OrbaxErrors(), "asyncio": _LeftoverWrites()}
        self._hook = None

    def install(self) -> None:
        if verbose() or self._hook is not None:
            return
        for name, log_filter in self._filters.items():
            logging.getLogger(name).addFilter(log_filter)
        previous = sys.unraisablehook

        def hook(unraisable):
            if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value):
                return  # a write still in flight when a failed save's event loop closed
            previous(unraisable)

        self._hook = (previous, hook)
        sys.unraisablehook = hook

    def uninstall(self) -> None:
        if self._hook is None:
            return
        for name, log_filter in self._filters.items():
            logging.getLogger(name).removeFilter(log_filter)
        previous, hook = self._hook
        if sys.unraisablehook is hook:
            sys.unraisablehook = previous
        self._hook = None
