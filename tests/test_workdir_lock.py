"""The workdir lock: a live holder refuses a second run, a stale one (dead pid, reused pid, a restarted
machine, another host's stopped heartbeat) is taken over with one line, and release removes only our own
lock. train.py meeting it is in test_checkpoint.py (two runs at once, then a SIGKILL and a resume)."""

import errno
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from gpt2_jax.training import workdir_lock


def write_lock(workdir, **holder):
    workdir.mkdir(exist_ok=True)
    path = workdir / workdir_lock.LOCK_NAME
    path.write_text(json.dumps({"host": socket.gethostname(), "started": 0.0, **holder}))
    return path


def test_a_held_lock_refuses_a_second_run_naming_the_holder(tmp_path):
    lock = workdir_lock.acquire(str(tmp_path / "w"))
    with pytest.raises(workdir_lock.WorkdirBusyError) as error:
        workdir_lock.acquire(str(tmp_path / "w"))
    message = str(error.value)
    assert message.startswith(f"workdir {tmp_path / 'w'} is in use by another train.py (host {socket.gethostname()}, "
                              f"pid {os.getpid()}, since ")
    assert f"lock file {tmp_path / 'w' / 'train.lock'}): wait for it to end, or give another --workdir" in message
    lock.release()
    assert os.listdir(tmp_path / "w") == []
    workdir_lock.acquire(str(tmp_path / "w")).release()  # free again


def test_stale_locks_on_this_host_are_taken_over_with_one_line(tmp_path):
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    mine = workdir_lock._process_start(os.getpid())
    cases = {
        "that process has ended": dict(pid=ended.pid),
        "that pid is now another process": dict(pid=os.getpid(), pid_start="1"),  # same pid, started earlier
        "the machine has restarted since": dict(pid=os.getpid(), pid_start=mine, boot_id="another-boot"),
    }
    for reason, holder in cases.items():
        path = write_lock(tmp_path / "w", **holder)
        said = []
        lock = workdir_lock.acquire(str(tmp_path / "w"), say=said.append)
        assert said == [(f"workdir {tmp_path / 'w'}: took over the lock of train.py pid {holder['pid']} on host "
                         f"{socket.gethostname()}: {reason}")]
        assert json.loads(path.read_text())["token"] in lock.content
        lock.release()
        assert not path.exists()


def test_another_hosts_lock_is_taken_over_once_its_heartbeat_stops(tmp_path):
    path = write_lock(tmp_path / "w", host="tpu-vm-7", pid=4242)
    with pytest.raises(workdir_lock.WorkdirBusyError, match="host tpu-vm-7, pid 4242"):
        workdir_lock.acquire(str(tmp_path / "w"))  # its heartbeat is fresh
    old = time.time() - workdir_lock.STALE_AFTER_S - 60
    os.utime(path, (old, old))
    said = []
    workdir_lock.acquire(str(tmp_path / "w"), say=said.append).release()
    assert len(said) == 1 and said[0].startswith(
        f"workdir {tmp_path / 'w'}: took over the lock of train.py pid 4242 on host tpu-vm-7: its heartbeat stopped 3")


def test_the_holder_keeps_its_heartbeat_and_release_spares_a_lock_taken_over(tmp_path, monkeypatch):
    monkeypatch.setattr(workdir_lock, "HEARTBEAT_S", 0.02)
    lock = workdir_lock.acquire(str(tmp_path))
    old = time.time() - 1000
    os.utime(lock.path, (old, old))
    time.sleep(0.3)
    assert time.time() - os.stat(lock.path).st_mtime < 5  # touched again
    with open(lock.path, "w") as f:
        f.write(json.dumps({"host": "elsewhere", "pid": 1}))  # taken over by a run that judged us gone
    lock.release()
    with open(lock.path) as f:
        assert json.load(f)["host"] == "elsewhere"


def test_a_filesystem_without_hard_links_still_gets_one_run(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted", src)

    monkeypatch.setattr(os, "link", no_links)
    lock = workdir_lock.acquire(str(tmp_path))
    with pytest.raises(workdir_lock.WorkdirBusyError, match=f"pid {os.getpid()}"):
        workdir_lock.acquire(str(tmp_path))
    assert os.listdir(tmp_path) == ["train.lock"]  # no temporary file left
    lock.release()
    assert os.listdir(tmp_path) == []
