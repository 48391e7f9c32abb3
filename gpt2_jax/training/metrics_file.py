"""metrics.jsonl holds each step once, as valid JSON lines, across interruptions.

A run killed after its last checkpoint has logged steps that the resumed run trains and logs again;
a SIGKILL in the middle of a write can leave a torn last line. Before a run logs anything, the
records past the step it starts from, and any line that is not a JSON object, are dropped: the
file is rewritten whole (a temporary file renamed over it), so a kill during the rewrite leaves
either the old file or the new one. An uninterrupted run's file is never rewritten.
"""

from __future__ import annotations

import json
import os


def _record(line: bytes) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:  # also UnicodeDecodeError: a write cut inside a character
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def keep_through(path: str, step: int) -> str | None:
    """Drops from `path` the records past `step` and lines that do not parse; returns the line that
    says what was dropped, or None when nothing was (and the file is left untouched)."""
    if not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        lines = [line for line in f.read().split(b"\n") if line.strip()]
    records = [_record(line) for line in lines]
    kept = [line for line, r in zip(lines, records) if r is not None and r["step"] <= step]
    if len(kept) == len(lines):
        return None
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(b"".join(line + b"\n" for line in kept))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    later = sum(1 for r in records if r is not None and r["step"] > step)
    torn = len(lines) - len(kept) - later
    parts = ([f"{later} record(s) past step {step} (logged after the checkpoint this run starts from)"] if later else []) \
        + ([f"{torn} unreadable line(s) (a write cut short)"] if torn else [])
    return f"{os.path.basename(path)}: dropped " + " and ".join(parts)
