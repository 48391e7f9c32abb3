"""One train.py per workdir: `WORKDIR/train.lock`, taken at start-up and removed at exit.

Two runs writing one workdir interleave their metrics and break each other's checkpoints, so a
second run is refused before it writes anything, naming the run that holds the lock. The file says
who that is (host, pid, the machine's boot id and the process's start time), and its holder touches
it every HEARTBEAT_S seconds. A lock whose holder is gone is taken over, with one line:
  - on this host: its pid no longer runs, or runs another program (same pid, other start time), or
    the machine has restarted since (another boot id: a power loss);
  - written from another host (a shared filesystem): no heartbeat for STALE_AFTER_S seconds.
The file is written whole before it appears (a hard link of a finished temporary file), so a run
killed while taking the lock never leaves a half-written one (where a filesystem has no hard links,
an empty or unreadable lock is taken over once it is STALE_AFTER_S old).

A gs:// workdir's lock is an object, created with Cloud Storage's "only if absent" precondition
(two runs starting at once: one creates it, the other is refused). The heartbeat rewrites it (the
object's time is its age). A stale one is deleted, if it still holds what was judged stale, and
created anew; with no rename to set it aside, two runs taking over the same stale lock at once are
told apart by that precondition.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import socket
import threading
import time
import uuid

from gpt2_jax import storage

LOCK_NAME = "train.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # ten missed heartbeats: a busy filesystem can delay a few, not ten


class WorkdirBusyError(ValueError):
    """Another run holds the workdir's lock."""


def _read(path: str) -> str | None:
    try:
        if storage.is_gcs(path):
            return storage.read_text(path)
        with open(path) as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


def _boot_id() -> str | None:
    return (_read("/proc/sys/kernel/random/boot_id") or "").strip() or None


def _process_start(pid: int) -> str | None:
    """The start time of process `pid` (clock ticks since boot), with 'Z' for a zombie; None where unknown."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # the name, in parentheses, may hold spaces
    return ("Z" if fields[0] == "Z" else "") + fields[19]


def _pid_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return not (_process_start(pid) or "").startswith("Z")


def _describe(holder: dict, path: str) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder.get("started", 0)))
    return f"host {holder.get('host')}, pid {holder.get('pid')}, since {since}; lock file {path}"


def stale_reason(holder: dict | None, age_s: float) -> str | None:
    """Why the lock `holder` wrote (last touched `age_s` seconds ago) is left over, or None if it is held."""
    if holder is None:  # unreadable: not written by this module
        return None if age_s < STALE_AFTER_S else f"an unreadable lock file, untouched for {age_s:.0f} s"
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname() and isinstance(pid, int):
        if holder.get("boot_id") and _boot_id() and holder["boot_id"] != _boot_id():
            return "the machine has restarted since"
        if not _pid_runs(pid):
            return "that process has ended"
        start = _process_start(pid)
        if holder.get("pid_start") and start and start != holder["pid_start"]:
            return "that pid is now another process"
        return None
    if age_s > STALE_AFTER_S:
        return f"its heartbeat stopped {age_s:.0f} s ago"
    return None


@dataclasses.dataclass
class WorkdirLock:
    """A held lock; `release()` (idempotent) stops the heartbeat and removes the file."""

    path: str
    content: str
    _stop: threading.Event = dataclasses.field(default_factory=threading.Event)

    def start_heartbeat(self) -> None:
        def beat():
            while not self._stop.wait(HEARTBEAT_S):
                try:
                    if not storage.is_gcs(self.path):
                        os.utime(self.path)
                    elif _read(self.path) == self.content:  # an object's time changes when it is written
                        storage.write_bytes(self.path, self.content.encode())
                    else:
                        return
                except OSError:  # removed by hand: nothing to keep alive
                    return

        threading.Thread(target=beat, name="workdir-lock-heartbeat", daemon=True).start()

    def release(self) -> None:
        self._stop.set()
        if _read(self.path) == self.content:  # never remove a lock another run has taken over since
            with contextlib.suppress(FileNotFoundError):
                storage.remove(self.path)


def _create(path: str, content: str) -> bool:
    """Creates `path` holding `content` unless it exists; True if this call created it."""
    if storage.is_gcs(path):
        return storage.create_gcs(path, content.encode())
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "w") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)  # atomic, and fails if the lock exists
        return True
    except FileExistsError:
        return False
    except OSError as e:  # a filesystem without hard links (some FUSE mounts): create-if-absent, then write
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(content)
        return True
    finally:
        os.remove(tmp)


def _remove_stale(path: str, text: str, pid: int) -> bool:
    """Removes the lock file `path` if it still holds `text` (judged stale); False if it changed."""
    if storage.is_gcs(path):
        if _read(path) != text:
            return False
        try:
            storage.remove(path)
        except FileNotFoundError:
            return False
        return True
    # Set the stale file aside under a name of our own, then check that it was the one judged
    # stale: if another run took the lock meanwhile, put its file back.
    aside = f"{path}.{pid}.stale"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    if _read(aside) != text:
        os.rename(aside, path)
        return False
    os.remove(aside)
    return True


def acquire(workdir: str, *, say=print) -> WorkdirLock:
    """Takes `workdir`'s lock (creating the workdir), taking over a stale one with a line through `say`.

    WorkdirBusyError (one line: the workdir, the holder's host and pid) if a live run holds it.
    """
    storage.makedirs(workdir)
    path = os.path.join(workdir, LOCK_NAME)
    pid = os.getpid()
    me = {"host": socket.gethostname(), "pid": pid, "started": time.time(), "boot_id": _boot_id(),
          "pid_start": _process_start(pid), "token": uuid.uuid4().hex}
    content = json.dumps(me)
    took_over = None
    for _ in range(5):  # another run may take or release the lock between two looks
        if _create(path, content):
            if took_over:
                say(took_over)
            lock = WorkdirLock(path, content)
            lock.start_heartbeat()
            return lock
        text = _read(path)
        if text is None:
            continue  # released in the meantime
        try:
            holder = json.loads(text)
            holder = holder if isinstance(holder, dict) else None
        except ValueError:
            holder = None
        try:
            age = time.time() - storage.mtime(path)
        except FileNotFoundError:
            continue
        reason = stale_reason(holder, age)
        if reason is None:
            who = _describe(holder, path) if holder else f"lock file {path}, unreadable"
            raise WorkdirBusyError(
                f"workdir {workdir} is in use by another train.py ({who}): wait for it to end, or give another "
                "--workdir")
        if not _remove_stale(path, text, pid):
            continue
        what = f"train.py pid {holder.get('pid')} on host {holder.get('host')}" if holder else "an unknown run"
        took_over = f"workdir {workdir}: took over the lock of {what}: {reason}"
    raise WorkdirBusyError(f"workdir {workdir}: could not take its lock {path}, other runs keep taking it")
