"""metrics.jsonl holds each step once, as valid JSON lines, across interruptions.

A run killed after its last checkpoint has logged steps that the resumed run trains and logs again;
a SIGKILL in the middle of a write can leave a torn last line. Before a run logs anything, the
records past the step it starts from, and any line that is not a JSON object, are dropped: the
file is rewritten whole (a temporary file renamed over it), so a kill during the rewrite leaves
either the old file or the new one. An uninterrupted run's file is never rewritten.

`Writer` adds the records. Cloud Storage has no append: in a gs:// workdir the writer keeps the
file's lines in memory and uploads the whole object (which replaces the old one at once, so it is
never torn) at each checkpoint, every FLUSH_EVERY_S seconds and at the end. A run killed loses at
most the records since its last upload, all of them logged after its last checkpoint: the ones a
resumed run drops and logs again anyway.
"""

from __future__ import annotations

import json
import os
import time

from gpt2_jax import storage

FLUSH_EVERY_S = 30.0


def _record(line: bytes) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:  # also UnicodeDecodeError: a write cut inside a character
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def keep_through(path: str, step: int) -> str | None:
    """Drops from `path` the records past `step` and lines that do not parse; returns the line that
    says what was dropped, or None when nothing was (and the file is left untouched)."""
    if not storage.exists(path):
        return None
    lines = [line for line in storage.read_bytes(path).split(b"\n") if line.strip()]
    records = [_record(line) for line in lines]
    kept = [line for line, r in zip(lines, records) if r is not None and r["step"] <= step]
    if len(kept) == len(lines):
        return None
    storage.write_bytes(path, b"".join(line + b"\n" for line in kept))
    later = sum(1 for r in records if r is not None and r["step"] > step)
    torn = len(lines) - len(kept) - later
    parts = [f"{later} record(s) past step {step} (logged after the checkpoint this run starts from)"] if later else []
    parts += [f"{torn} unreadable line(s) (a write cut short)"] if torn else []
    return f"{os.path.basename(path)}: dropped " + " and ".join(parts)


class Writer:
    """Adds records to metrics.jsonl: appended at once to a local file, uploaded in batches to a
    gs:// one (module docstring)."""

    def __init__(self, path: str):
        self.path = path
        self._remote = storage.is_gcs(path)
        self._lines: list[bytes] = []  # gs://: the whole file
        self._dirty = False
        self._flushed = time.monotonic()
        if self._remote and storage.exists(path):
            self._lines = [line + b"\n" for line in storage.read_bytes(path).split(b"\n") if line.strip()]

    def write(self, record: dict) -> None:
        line = json.dumps(record) + "\n"
        if not self._remote:
            with open(self.path, "a") as f:
                f.write(line)
            return
        self._lines.append(line.encode())
        self._dirty = True
        if time.monotonic() - self._flushed > FLUSH_EVERY_S:
            self.flush()

    def flush(self) -> None:
        """Uploads what was written since the last upload (gs:// only; a local file is always current)."""
        if self._dirty:
            storage.write_bytes(self.path, b"".join(self._lines))
            self._dirty = False
        self._flushed = time.monotonic()
